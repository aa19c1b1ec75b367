"""Run one distop job from the command line: scatter range(SIZE) over the servers, print the result.

    python distop/client.py                                   # plusone over range(30): [1, 2, ..., 30]
    python distop/client.py --op pow --param esp=3 --size 1000 --chunks 8
    python distop/client.py rabbit.example --op plusone --timeout 10

The pika calls behind it are distop/call_one.py's, for many chunks (DistOp). Pairs with distop/callee.py, the
servers; start them before or after this script: the chunks wait in the durable work queue. Guarantee: the
result is exact and complete, or one line says why not (a server's op raised, a poison chunk, the broker, the
timeout). Exit status 0 with the result as JSON on stdout, 1 when the job fails, 2 on bad arguments.

run_job() below is the job as RabbitMQ sees it: call() publishes the chunks and returns the job id,
get_result() waits for one reply per chunk on our reply queue, then gathers them. DistOp
(distop/dist_op.py) makes the pika calls. The plumbing is at the end: the op class and the command line;
the progress bar (RepliesBar, counting replies) is in distop/cli.py.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from distop.cli import (
    MAX_COUNT,
    RepliesBar,
    op_name,
    parse_param,
    parser_with_broker,
    positive,
    positive_float,
    setup_logging,
)
from distop.errors import DistOpError
from distop.ops import DistOp


def run_job(
    op_name: str,
    data: list[int],
    chunks: int,
    *,
    params: dict[str, Any],
    timeout: float,
    rabbit_host: str | None,
    bar: RepliesBar,
) -> Any:
    """Scatter ``data`` as ``chunks`` chunks to the servers that run ``op_name``; gather their results."""
    # Nothing connects yet: the first call() opens the connection (rabbit_host, else AMQP_URL, else
    # localhost) and declares our reply queue: exclusive, named by the broker ("amq.gen-...").
    with ConcatOp(op_name, data, chunks, rabbit_host) as op:
        # call() hands the chunks to DistOp's I/O thread and returns the job id at once. That thread
        # publishes each chunk to the work queue "distop.chunks": persistent, reply_to = our reply queue,
        # correlation_id = "JOB_ID:START"; and again (after a nack, a return, a lost connection) until
        # its result is in.
        job_id = op.call(**params)
        # Blocks until our reply queue has given one reply per chunk, whichever server sent it; each one
        # ticks the bar. Then gather() by START. A chunk that kept killing servers comes back
        # dead-lettered through the same queue instead: PoisonChunkError, a DistOpError.
        return op.get_result(job_id, timeout=timeout, progress=bar.counter(job_id, op.group_size))
    # Leaving the block closes the connection: the broker deletes the reply queue with it.


# The op class and the command line (the progress bar is in distop/cli.py) ---------


class ConcatOp(DistOp):
    """The op named on the command line; its partial results are lists, concatenated in order."""

    def __init__(self, op_name: str, data: list[Any], chunks: int, rabbit_host: str | None) -> None:
        self.OP_NAME = op_name  # DistOp's op name, usually a class attribute: here chosen at run time
        super().__init__(data, chunks, rabbit_host)

    def gather(self, partials: dict[int, Any]) -> list[Any]:
        # {start index: partial result}, already in order of start index.
        result: list[Any] = []
        for part in partials.values():
            result.extend(part if isinstance(part, list) else [part])
        return result


def main() -> int:
    parser = parser_with_broker(__doc__.split("\n\n")[0])
    parser.add_argument("--op", type=op_name, default="plusone", help="the op to run (default: plusone)")
    parser.add_argument(
        "--size", type=positive, default=30, help=f"data is range(SIZE), up to {MAX_COUNT:,} (default: 30)"
    )
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
        with RepliesBar(shown=not args.quiet) as bar:
            result = run_job(
                args.op,
                list(range(args.size)),
                args.chunks,
                params=dict(args.param),
                timeout=args.timeout,
                rabbit_host=args.rabbit_host,
                bar=bar,
            )
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
