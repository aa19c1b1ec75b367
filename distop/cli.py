"""The command-line plumbing of distop's scripts: arguments and logging. Nothing here is about RabbitMQ."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any


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
