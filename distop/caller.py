"""A distop client with two jobs in flight at once: call() returns at once, get_result() waits.

    python distop/caller.py [RABBIT_HOST]

Pairs with distop/callee.py (start servers before or after: chunks wait in the durable work queue).
Guarantee: each job's result is every chunk's reply, gathered in order; otherwise one exception says why (a
server's op raised, a chunk was dead-lettered, the broker was lost for a minute, the timeout). run() below
says, at each step, what goes over the wire; DistOp (distop/dist_op.py) makes the pika calls, as
distop/call_one.py makes them for one chunk, at its simplest. The command line is at the end.
"""

from __future__ import annotations

import sys
from typing import Any

from distop.cli import parser_with_broker, setup_logging
from distop.errors import DistOpError
from distop.ops import DistOp

TIMEOUT = 60.0


class PowOp(DistOp):
    """Raise every item to a power, on the servers: the op is SampleExecutor.pow in callee.py."""

    OP_NAME = "pow"

    def gather(self, partials: dict[int, list[Any]]) -> list[Any]:
        # {start index: partial result}, in order: concatenate them.
        return [x for part in partials.values() for x in part]


def start_job(op: DistOp, name: str, **params: Any) -> str:
    """Publish a job's chunks and return its id at once, without waiting for any result."""
    # Returns at once. DistOp's I/O thread publishes each chunk to the work queue: basic_publish("",
    # "distop.chunks", chunk, persistent, mandatory, reply_to="amq.gen-...", correlation_id="JOB_ID:START",
    # headers={"distop-client": our id}, which brings the chunk back to us if it is dead-lettered),
    # published again (after a nack, a return or a lost connection) until its result is in.
    job_id = op.call(**params)
    # Each chunk's reply will carry correlation_id "JOB_ID:START": this job, and where its chunk starts.
    print(f"{name}: job {job_id[:8]}... started; its chunks go to {op.QUEUE!r}")
    return job_id


def run(rabbit_host: str | None) -> None:
    # Nothing connects yet: the first call() opens the connection and declares our reply queue,
    # queue_declare("", exclusive=True): named by the broker ("amq.gen-..."), deleted with our connection.
    with PowOp(data=list(range(10)), group_size=3, rabbit_host=rabbit_host) as op:
        # 3 chunks for the durable work queue, published by DistOp's I/O thread: pow(chunk, esp=2).
        squares = start_job(op, "squares", esp=2)
        # Same reply queue: the replies of the two jobs are told apart by their correlation_id.
        cubes = start_job(op, "cubes", esp=3)
        # The servers work while this process does something else.
        print(f"meanwhile, here: sum(range(10**6)) = {sum(range(10**6))}")
        # Each server takes a chunk, publishes its result to reply_to quoting the correlation_id; the
        # replies of both jobs arrive on our one reply queue (basic_consume), each filed by JOB_ID and START.
        print("squares:", op.get_result(squares, timeout=TIMEOUT))  # blocks for 3 replies, then gathers
        print("cubes:  ", op.get_result(cubes, timeout=TIMEOUT))
    # Leaving the block closes the connection: the broker deletes the reply queue with it.


# Command line ---------------------------------------------------------------


def main() -> int:
    args = parser_with_broker(__doc__.split("\n\n")[0]).parse_args()
    setup_logging()
    try:
        run(args.rabbit_host)
    except (DistOpError, TimeoutError) as exc:
        print(f"caller: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("caller: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
