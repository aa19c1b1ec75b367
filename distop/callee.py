"""A distop server: the ops it offers; OpExecutor (distop/op_executor.py) serves them over RabbitMQ.

    python distop/callee.py                  # broker from AMQP_URL, else localhost
    python distop/callee.py rabbit.example   # or a host name / amqp(s):// URL

Start one or more, before or after the clients (distop/client.py, distop/caller.py): chunks wait in
the queue. Ctrl-C or SIGTERM stops a server after the chunk in hand; a second one at once, and that
chunk goes back to the queue. distop/serve_one.py is a server at its simplest, with the same pika calls
in one function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from distop.errors import BrokerError
from distop.ops import WORK_QUEUE, OpExecutor


# A server, in RabbitMQ terms, is one more consumer of the work queue: an OpExecutor subclass with one
# method per op. For ops of a millisecond or less, subclass PipelinedOpExecutor (distop/pipelined.py)
# instead: it takes the next chunk ahead.
class SampleExecutor(OpExecutor):
    """Three ops. A method's name is the op's name: the client's OP_NAME picks it."""

    # The work queue, "distop.chunks" (the default, shown here). Every server declares it as the clients
    # do (queue_declare: durable, quorum, dead chunks to distop.dead) and consumes it one chunk at a time
    # (basic_qos(prefetch_count=1), basic_consume): the broker gives each chunk to one of the servers, so
    # all servers on one queue must offer the same ops.
    QUEUE = WORK_QUEUE

    # A chunk is a message on QUEUE, {"op": "pow", "chunk": [4, 5, 6], "params": {"esp": 2}} for a client's
    # call(esp=2), with properties reply_to and correlation_id. OpExecutor calls self.pow([4, 5, 6], esp=2)
    # and publishes {"result": [16, 25, 36]} to reply_to (basic_publish, quoting the correlation_id), then
    # acks the chunk (basic_ack). An op that raises: {"error": {...}} is the reply, RemoteError at the client.
    # A malformed chunk never gets here: it is rejected without requeue (basic_reject), into distop.dead.
    def pow(self, chunk: list[float], esp: float = 1) -> list[float]:  # esp: the exponent
        return [x**esp for x in chunk]

    # Each op gets the chunk's items, a list, and returns the partial result: anything JSON can hold.
    # An op may run twice for one chunk (at-least-once: its server died before the ack, or the client
    # published it again after a lost connection): make it safe to repeat, as these are.
    def plusone(self, chunk: list[float]) -> list[float]:
        return [x + 1 for x in chunk]

    def nop(self, chunk: list[Any]) -> list[Any]:
        return chunk


def main() -> int:
    return serve(SampleExecutor, __doc__.split("\n\n")[0])


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
        # Connects, declares, consumes until Ctrl-C or SIGTERM; reconnects if the broker restarts.
        executor_class(args.rabbit_host).run()
    except BrokerError as exc:  # not serving 60 s after a loss, refused credentials, queue declared otherwise
        print(f"callee: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
