"""The command-line plumbing of distop's scripts: arguments, logging, a progress bar. No RabbitMQ here."""

from __future__ import annotations

import argparse
import json
import logging
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


def parse_param(text: str) -> tuple[str, Any]:
    """``esp=2`` -> ("esp", 2); values are JSON when they parse as JSON, else strings."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
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
