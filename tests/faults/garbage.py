"""Malformed deliveries, for consumers that must reject them and keep serving.

``malformed(count, valid, wrong_types, props)`` returns ``count`` deliveries
(label, body, properties) cycling through kinds of garbage: binary, empty,
truncated JSON, JSON of the wrong shape, JSON nested too deep to parse, a
10 MB body, bodies in other encodings under other content types. ``valid`` is
a good body for the consumer (truncated to make garbage), ``wrong_types`` are
well-formed JSON bodies that its schema must refuse, ``props`` are properties
every delivery carries (e.g. reply_to); a kind may override them.
"""

from __future__ import annotations

import gzip
import itertools
import json
import pickle
import random
from collections.abc import Iterator
from typing import Any

HUGE = 10 * 1024 * 1024

Delivery = tuple[str, bytes, dict[str, Any]]


def _kinds(valid: bytes, wrong_types: list[Any], props: dict[str, Any]) -> Iterator[Delivery]:
    rng = random.Random(4242)
    json_type = {**props, "content_type": "application/json"}
    yield "huge binary", bytes(rng.getrandbits(8) for _ in range(1024)) * (HUGE // 1024), props
    # CPython's json module raises RecursionError, not ValueError, on this.
    yield "nested too deep", b"[" * 100_000, json_type
    yield (
        "pickle",
        pickle.dumps({"text": "x", "op": "nop"}),
        {**props, "content_type": "application/x-pickle"},
    )
    yield "gzip", gzip.compress(valid), {**json_type, "content_encoding": "gzip"}
    yield "plain text", b"hello, world", {**props, "content_type": "text/plain"}
    yield "empty", b"", json_type
    yield "invalid utf-8", valid.replace(b'"', b'"\xff', 1), json_type
    yield "nan", b"NaN", json_type
    for value in wrong_types:
        yield f"wrong type {json.dumps(value)[:30]}", json.dumps(value).encode(), json_type
    for n in itertools.count(1):
        yield (
            "binary",
            rng.randbytes(rng.randint(1, 512)),
            {**props, "content_type": "application/octet-stream"},
        )
        yield "truncated json", valid[: n % len(valid) or 1], json_type
        yield "json with garbage after", valid + b"}", json_type


def malformed(
    count: int, valid: bytes, wrong_types: list[Any], props: dict[str, Any] | None = None
) -> list[Delivery]:
    return list(itertools.islice(_kinds(valid, wrong_types, props or {}), count))


# Well-formed JSON that is not a message of any example.
NOT_AN_OBJECT: list[Any] = [None, True, 5, 1.5, "text", [], ["op", "nop"], [{"text": "x"}]]


def nested(depth: int) -> dict[str, Any]:
    """A header table ``depth`` tables deep: legal AMQP, and pika 1.4's decoder recursed until it failed."""
    table: dict[str, Any] = {}
    for _ in range(depth):
        table = {"a": table}
    return table


# Properties a broken or hostile peer may send: correlation ids and reply_to
# odd or missing, headers of the wrong types or nested hundreds deep.
ODD_PROPERTIES: list[dict[str, Any]] = [
    {"headers": nested(400)},
    {},
    {"correlation_id": "x:²", "reply_to": "amq.gen-"},
    {"correlation_id": "", "reply_to": ""},
    {"correlation_id": "\x00:0", "reply_to": "nowhere"},
    {"correlation_id": "9" * 255, "reply_to": "amq.gen-does-not-exist"},
    {"correlation_id": "job:-1", "reply_to": "amq.default"},
    {"headers": {"x-death": "forged", "x-first-death-reason": 5}},
    {"headers": {"x-death": [{"count": "many"}], "distop-client": 35}},
    {"headers": {"a": [1, {"b": None}], "c": True}},
    {"priority": 9, "expiration": "60000", "type": "odd", "message_id": "m", "timestamp": 0},
]


def with_odd_properties(deliveries: list[Delivery], keep: tuple[str, ...] = ()) -> list[Delivery]:
    """The same deliveries, each also carrying one of ODD_PROPERTIES in turn, except the ``keep`` keys."""
    varied = []
    for i, (label, body, props) in enumerate(deliveries):
        odd = {k: v for k, v in ODD_PROPERTIES[i % len(ODD_PROPERTIES)].items() if k not in keep}
        varied.append((f"{label}, odd properties {i % len(ODD_PROPERTIES)}", body, {**props, **odd}))
    return varied
