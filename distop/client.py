"""Run one distop job from the command line: scatter range(SIZE) over the servers, print the result.

    python distop/client.py                                   # pow over range(30), 3 chunks
    python distop/client.py --op pow --param esp=3 --size 1000 --chunks 8
    python distop/client.py rabbit.example --op plusone --timeout 10

Pairs with distop/callee.py, the servers; start them before or after this script: the chunks wait in
the durable work queue. Guarantee: the result is exact and complete, or one line says why not (a
server's op raised, a poison chunk, the broker, the timeout). Exit status 0 with the result as JSON
on stdout, 1 when the job fails, 2 on bad arguments.

The job on the wire, in run_job() below (DistOp, distop/dist_op.py, makes the pika calls):

    call()        returns the job id at once; DistOp's I/O thread publishes one message per chunk to the
                  work queue "distop.chunks" (basic_publish: persistent, reply_to = our exclusive reply
                  queue, correlation_id = "JOB_ID:START"), again until the broker confirms it
    the bar       one tick per reply taken off our reply queue (basic_consume), whichever server sent it
    get_result()  returns once every chunk's reply is in, gathered by START; a chunk that kept killing
                  servers comes back dead-lettered instead, through our reply queue: PoisonChunkError
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tqdm import tqdm

from distop.cli import parse_param, parser_with_broker, positive, positive_float, setup_logging
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
        # Hands the chunks to DistOp's I/O thread, which publishes them, and returns the job id at once.
        op.call(**dict(args.param))
        # One tick per partial result on our reply queue. disable=None: shown only on a terminal.
        with tqdm(total=op.group_size, unit="partial", disable=True if args.quiet else None) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total  # fewer chunks than asked when the data is shorter
                bar.update(done - bar.n)

            # Waits for every partial, then gather()s them in order; PoisonChunkError is a DistOpError.
            return op.get_result(timeout=args.timeout, progress=progress)


# Command line ---------------------------------------------------------------


def main() -> int:
    parser = parser_with_broker(__doc__.split("\n\n")[0])
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
    setup_logging()

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
