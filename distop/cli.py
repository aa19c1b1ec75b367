"""The command-line plumbing of distop's scripts: arguments, logging, a progress bar. No RabbitMQ here."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from tqdm import tqdm


def parser_with_broker(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose first, optional argument is the broker."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("rabbit_host", nargs="?", help="host name or amqp(s):// URL (default: AMQP_URL)")
    return parser


def setup_logging(level: int = logging.WARNING) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    # pika logs expected disconnections as errors, with tracebacks.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


# The most a count may be: --size 10**12 would ask for a list of 10**12 numbers, more memory than any machine
# has. A million numbers make 7 MB of chunks, plenty for a demonstration.
MAX_COUNT = 1_000_000


def utf8(text: str) -> str:
    """``text`` if it is UTF-8; the shell may pass bytes that are not, which Python holds as surrogates."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not UTF-8: {text!r}") from None
    return text


def op_name(text: str) -> str:
    """The name of an op: not empty, and UTF-8, as it must be in a JSON chunk."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return utf8(text)


def parse_param(text: str) -> tuple[str, Any]:
    """``esp=2`` -> ("esp", 2); values are JSON when they parse as JSON, else strings."""
    name, sep, value = utf8(text).partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return name, value
    try:
        json.dumps(parsed, allow_nan=False)  # NaN and 1e999 (infinity) parse, but JSON cannot carry them
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: JSON cannot carry NaN or infinity") from None
    return name, parsed


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:,}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # float() takes "inf" and "nan"
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


class RepliesBar:
    """A progress bar, on a terminal only, of the replies in for a job; closed on leaving ``with``."""

    def __init__(self, shown: bool) -> None:
        self._shown = shown
        self._bar: tqdm[Any] | None = None

    def counter(self, job_id: str, chunks: int) -> Callable[[int, int], None]:
        """get_result's progress(done, total), ticking a bar named after the job."""
        disable = None if self._shown else True  # None: shown on a terminal only
        bar = self._bar = tqdm(total=chunks, desc=f"job {job_id[:8]}", unit="reply", disable=disable)

        def count_replies(done: int, total: int) -> None:
            bar.total = total  # fewer chunks than asked when the data is shorter
            bar.update(done - bar.n)

        return count_replies

    def __enter__(self) -> RepliesBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
