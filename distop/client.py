"""Run one distop job from the command line: scatter range(SIZE) over the servers, print the result.

Pairs with distop/callee.py, the servers offering the op; start them before or after this script
(the chunks wait in the durable work queue). Guarantee: the result is exact and complete, or the
script says in one line why not (a server's op raised, a poison chunk, the broker, the timeout).

    python distop/client.py                                   # pow over range(30), 3 chunks
    python distop/client.py --op pow --param esp=3 --size 1000 --chunks 8
    python distop/client.py rabbit.example --op plusone --timeout 10

The job, step by step (the calls are in DistOp, distop/dist_op.py):

1. call() splits range(SIZE) into CHUNKS chunks and publishes each one, persistent and confirmed
   by the broker, to the work queue "distop.chunks", which the servers share; each server takes
   one chunk at a time. call() returns the job id at once.
2. Each server publishes its partial result to this client's reply queue (reply_to: a queue the
   broker named for this connection), tagged with the chunk's correlation_id, "JOB_ID:START".
3. get_result() waits until one partial per chunk has arrived. The progress bar counts them:
   one tick per partial result taken off the reply queue. Then gather() joins them in order.
4. A chunk that every server taking it dies on is dead-lettered after 5 deliveries; the dead
   letter comes back to this same reply queue, and get_result() raises PoisonChunkError.

Exit status: 0 with the result as JSON on stdout, 1 when the job fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from tqdm import tqdm

from distop.errors import DistOpError
from distop.ops import DistOp


class ConcatOp(DistOp):
    """The op named on the command line; its partial results are lists, concatenated in order."""

    def __init__(self, op_name: str, data: list[Any], chunks: int, rabbit_host: str | None) -> None:
        self.OP_NAME = op_name  # the servers' method to run: chosen at run time, so set on the object
        super().__init__(data, chunks, rabbit_host)

    def gather(self, partials: dict[int, Any]) -> list[Any]:
        # {start index: partial result}, already in order of start index.
        result: list[Any] = []
        for part in partials.values():
            result.extend(part if isinstance(part, list) else [part])
        return result


def run_job(args: argparse.Namespace) -> Any:
    """Scatter range(SIZE) as CHUNKS chunks, then gather their partial results, counting them on a bar."""
    with ConcatOp(args.op, list(range(args.size)), args.chunks, args.rabbit_host) as op:
        op.call(**dict(args.param))  # one persistent message per chunk on the work queue; returns at once
        # One tick per partial result arrived on our reply queue. disable=None: only on a terminal.
        with tqdm(total=op.group_size, unit="partial", disable=True if args.quiet else None) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total  # fewer chunks than asked when the data is shorter
                bar.update(done - bar.n)

            return op.get_result(timeout=args.timeout, progress=progress)  # waits for every partial


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rabbit_host", nargs="?", help="host name or amqp(s):// URL (default: AMQP_URL)")
    parser.add_argument("--op", default="pow", help="the op to run (default: pow)")
    parser.add_argument("--size", type=positive, default=30, help="data is range(SIZE) (default: 30)")
    parser.add_argument(
        "--chunks", type=positive, default=3, help="number of chunks, one per server (default: 3)"
    )
    parser.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="keyword argument for the op, e.g. esp=2 (repeatable)",
    )
    parser.add_argument("--timeout", type=positive_float, default=60.0, help="seconds to wait (default: 60)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    try:
        result = run_job(args)
    except (DistOpError, TimeoutError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("client: interrupted", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
