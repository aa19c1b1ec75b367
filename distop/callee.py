"""A distop server offering three sample ops: ``nop``, ``pow`` and ``plusone``.

Start one or more (each takes one chunk at a time), before or after a client:

    python distop/callee.py                  # broker from AMQP_URL, else localhost
    python distop/callee.py rabbit.example   # or a host name / amqp(s):// URL

Ctrl-C or SIGTERM stops it after the chunk in hand (a second one at once; the
chunk then goes back to the queue). Pairs with distop/caller.py and
distop/client.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from distop.errors import BrokerError
from distop.ops import OpExecutor


class SampleExecutor(OpExecutor):
    """Each method is an op; its name is the client's OP_NAME."""

    def nop(self, chunk: list[Any]) -> list[Any]:
        return chunk

    def pow(self, chunk: list[float], esp: float = 1) -> list[float]:
        return [x**esp for x in chunk]

    def plusone(self, chunk: list[float]) -> list[float]:
        return [x + 1 for x in chunk]


def serve(executor_class: type[OpExecutor], description: str) -> int:
    """Parse the command line, then run ``executor_class`` until stopped; return the exit status."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("rabbit_host", nargs="?", help="host name or amqp(s):// URL (default: AMQP_URL)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        executor_class(args.rabbit_host).run()
    except BrokerError as exc:
        print(f"callee: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return serve(SampleExecutor, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
