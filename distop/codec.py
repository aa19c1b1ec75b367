"""JSON on the wire, fast: orjson where it gives the json module's answer, the json module where not.

Every message distop sends is JSON, readable by any client in any language.
Encoding and decoding 100,000 numbers with the json module takes tens of
milliseconds; orjson does it several times faster. Where the two differ,
these functions give the json module's answer: NaN and infinities are refused
(orjson would write null), integers beyond 64 bits stay exact (orjson refuses
to write them, and reads them as floats), and keys need not be strings.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# Types that orjson would write but the json module refuses: refused here too.
_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# 19 digits in a row may be an integer beyond 64 bits.
_LONG_NUMBER = re.compile(rb"\d{19}")


def dumps(value: Any) -> bytes:
    """``value`` as JSON; TypeError or ValueError for what ``json.dumps(allow_nan=False)`` refuses, and
    ValueError for text that UTF-8 cannot carry."""
    try:
        body = orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError:
        body = b"null"  # e.g. an integer beyond 64 bits: let the json module write it, or say why not
    if b"null" in body:  # a None, or a NaN or infinity that orjson wrote as null
        # ensure_ascii=False: half a UTF-16 pair ("\ud800") raises UnicodeEncodeError, a ValueError, as in
        # orjson; escaped, it would go out as JSON that orjson, on the other side, cannot read.
        return json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    return body


def loads(body: bytes) -> Any:
    """The value in ``body``; ValueError if it is not JSON, RecursionError if nested too deep."""
    if _LONG_NUMBER.search(body):
        return json.loads(body)
    return orjson.loads(body)
