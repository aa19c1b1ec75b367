"""Run one distop job from the command line: scatter range(SIZE) over the servers, print the result.

    python distop/client.py                                   # pow over range(30), 3 chunks
    python distop/client.py --op pow --param esp=3 --size 1000 --chunks 8
    python distop/client.py rabbit.example --op plusone --timeout 10

Pairs with distop/callee.py, the servers; start them before or after this script: the chunks wait in
the durable work queue. Guarantee: the result is exact and complete, or one line says why not (a
server's op raised, a poison chunk, the broker, the timeout). Exit status 0 with the result as JSON
on stdout, 1 when the job fails, 2 on bad arguments.

run_job() below is the job as RabbitMQ sees it: call() publishes the chunks and returns the job id, the
progress bar counts the replies as they come off our reply queue, get_result() gathers them. DistOp
(distop/dist_op.py) makes the pika calls; the command line is at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
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
        # call() hands the chunks to DistOp's I/O thread and returns the job id at once. That thread
        # publishes each chunk to the work queue "distop.chunks": persistent, reply_to = our exclusive
        # reply queue ("amq.gen-..."), correlation_id = "JOB_ID:START", again until the broker confirms it.
        job_id = op.call(**dict(args.param))
        with replies_bar(job_id, op.group_size, shown=not args.quiet) as count_replies:
            # Blocks until our reply queue has given one reply per chunk, whichever server sent it; each
            # one ticks the bar. Then gather() by START. A chunk that kept killing servers comes back
            # dead-lettered through the same queue instead: PoisonChunkError, a DistOpError.
            return op.get_result(job_id, timeout=args.timeout, progress=count_replies)


# Command line ---------------------------------------------------------------


@contextlib.contextmanager
def replies_bar(job_id: str, chunks: int, shown: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar, on a terminal only, of the replies in for the job; yields get_result's progress()."""
    with tqdm(total=chunks, desc=f"job {job_id[:8]}", unit="reply", disable=None if shown else True) as bar:

        def count_replies(done: int, total: int) -> None:
            bar.total = total  # fewer chunks than asked when the data is shorter
            bar.update(done - bar.n)

        yield count_replies


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
