"""A distop server: the ops it offers; OpExecutor (distop/op_executor.py) serves them over RabbitMQ.

    python distop/callee.py                  # broker from AMQP_URL, else localhost
    python distop/callee.py rabbit.example   # or a host name / amqp(s):// URL

Start one or more, before or after the clients (distop/client.py, distop/caller.py): chunks wait in
the queue. What each server does, and the pika call behind each step (OpExecutor's methods):

    at start    queue_declare("distop.chunks", durable)  the work queue all servers share (_declare): a
                                                         quorum queue with a delivery limit, whose dead
                                                         chunks go to the exchange and queue distop.dead
                basic_qos(prefetch_count=1)              one chunk at a time: a free server gets the next
                basic_consume("distop.chunks")           the broker pushes chunks to us (_consume)
    a chunk     {"op": "pow", "chunk": [4, 5, 6], "params": {"esp": 2}}, with reply_to and correlation_id
                -> SampleExecutor.pow([4, 5, 6], esp=2)  the method named by "op" (_run)
                basic_publish(reply_to, correlation_id)  {"result": [16, 25, 36]} to the client (_finish)
                basic_ack(delivery_tag)                  only now may the broker forget the chunk
    op raised   {"error": {"type": "ValueError", ...}} is the reply, then the ack: RemoteError there
    garbage     basic_reject(requeue=False)              the broker dead-letters it to distop.dead

Guarantee: a chunk is acked only after its reply is published, so a chunk whose server dies runs on
another (it may run twice). Ctrl-C or SIGTERM stops a server after the chunk in hand; a second one at
once, and that chunk goes back to the queue.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from distop.errors import BrokerError
from distop.ops import WORK_QUEUE, OpExecutor


# The plain OpExecutor, as in the lesson. For ops of a millisecond or less, subclass
# PipelinedOpExecutor (distop/pipelined.py) instead: it takes the next chunk ahead.
class SampleExecutor(OpExecutor):
    """Three ops. A method's name is the op's name: the client's OP_NAME picks it."""

    # The work queue these servers consume, shown here though it is the default. The broker gives each
    # chunk to one server, so all servers on one queue must offer the same ops; clients publish to it too.
    QUEUE = WORK_QUEUE

    # Each op gets the chunk's items, a list, and returns the partial result: JSON, sent to reply_to.
    def nop(self, chunk: list[Any]) -> list[Any]:
        return chunk

    # esp is the exponent. Keyword arguments of the client's call() arrive as keyword arguments:
    # call(esp=2) sends chunks such as {"op": "pow", "chunk": [4, 5, 6], "params": {"esp": 2}}.
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
