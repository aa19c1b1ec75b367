"""A distop server: it takes chunks off the work queue, runs the op they name, and replies.

Pairs with distop/client.py and distop/caller.py; start one or more servers, before or after them
(chunks wait in the queue). Guarantee: a chunk is acked only after its reply is published, so a
server that dies mid-chunk loses nothing: the broker gives the chunk to another server.

    python distop/callee.py                  # broker from AMQP_URL, else localhost
    python distop/callee.py rabbit.example   # or a host name / amqp(s):// URL

What happens to each chunk (the calls are in OpExecutor, distop/op_executor.py):

1. The server declares the work queue WORK_QUEUE, "distop.chunks": durable, a quorum queue
   with a delivery limit, so a chunk that kills every server that takes it is dead-lettered.
   Every server declares and consumes the same queue, so they share its chunks.
2. It consumes with prefetch 1: the broker hands it one unacked chunk at a time, so a free server
   gets the next chunk (fair dispatch).
3. A chunk is a JSON message {"op": "pow", "chunk": [4, 5, 6], "params": {"esp": 2}}; its
   properties say where the answer goes: reply_to, the client's private reply queue, and
   correlation_id, "JOB_ID:START" (the job, and where the chunk starts in the job's data).
   A malformed one is rejected without requeue: the broker moves it to the queue "distop.dead".
4. The op is the method of that name below; it runs on a worker thread, so that the connection
   (a BlockingConnection) keeps answering heartbeats during a long op.
5. The server publishes {"result": ...} (or {"error": ...} if the op raised) to reply_to, with
   the same correlation_id, and only then acks the chunk: the broker forgets it.

The server is a PipelinedOpExecutor (distop/pipelined.py): the same, except that while ops take
under 5 ms it takes the next chunk ahead through a second consumer (1.4 times as fast on 1,000
short chunks), and gives that chunk back to the queue as soon as an op runs longer.

Each chunk is one log line: "chunk JOB_ID:START: pow on 4 items in 0.000 s". Ctrl-C or SIGTERM
stops it after the chunk in hand (a second one at once; the chunk then goes back to the queue).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from distop.errors import BrokerError
from distop.ops import WORK_QUEUE, OpExecutor, PipelinedOpExecutor


class SampleExecutor(PipelinedOpExecutor):
    """Three ops. A method's name is the op's name: the client's OP_NAME picks it."""

    # The queue every server of these ops consumes from (the default, shown here): servers on one
    # queue share its chunks, so all must offer the same ops. Clients publish to the same QUEUE.
    # Each chunk from it is acked once its reply, a result or an error, is published; a server
    # that dies first leaves it unacked, and the broker hands it to another server.
    QUEUE = WORK_QUEUE

    def nop(self, chunk: list[Any]) -> list[Any]:
        return chunk

    # Keyword arguments given to the client's call(esp=2) arrive as keyword arguments.
    def pow(self, chunk: list[float], esp: float = 1) -> list[float]:
        return [x**esp for x in chunk]

    def plusone(self, chunk: list[float]) -> list[float]:
        return [x + 1 for x in chunk]


# --------------------------------------------------------------------------
# Command line and logging
# --------------------------------------------------------------------------


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
        executor_class(args.rabbit_host).run()  # serves until Ctrl-C or SIGTERM
    except BrokerError as exc:
        print(f"callee: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return serve(SampleExecutor, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
