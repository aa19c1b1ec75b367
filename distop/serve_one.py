"""The simplest distop server: take chunks off the work queue one at a time, run the op, reply, ack.

    python distop/serve_one.py     # serves plusone until Ctrl-C; try python distop/call_one.py plusone 1 2 3

Guarantee: a chunk is acked only after its reply is published, so a server that dies mid-chunk loses nothing:
the broker gives the chunk to another server. It answers DistOp (distop/dist_op.py) and call_one.py alike.
A BlockingConnection: each chunk is a plain function call, top to bottom.
Left out, and done by OpExecutor (distop/op_executor.py): ops run on a worker thread, so that pika keeps
answering the broker's heartbeats (here an op longer than the heartbeat timeout, 60 s, loses the connection);
reconnection.
"""

import argparse
import logging
import socket
import sys
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from distop import codec
from distop.broker import BrokerError, connect, resolve
from distop.protocol import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    JSON,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    error_text,
    parse_request,
)

OPS = {"plusone": lambda chunk: [x + 1 for x in chunk]}  # an op takes a chunk and returns its result


class UnknownOpError(Exception):
    """The chunk names an op this server does not have (OpExecutor's error of the same name)."""


def serve() -> None:
    """Serve chunks until Ctrl-C (KeyboardInterrupt); BrokerError if the broker cancels our consumer."""
    # connect(), in broker.py: pika.BlockingConnection(pika.URLParameters(url)), first node up.
    connection = connect(resolve())  # AMQP_URL, else localhost
    channel = connection.channel()
    # Where the work queue sends a chunk it gives up on, declared first: a headers exchange, and a queue
    # (names of exchanges and queues do not clash) bound to get every dead chunk, for a person to look at.
    channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
    channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
    channel.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
    # Declared exactly as the clients declare it (or the broker refuses): the first to come makes it.
    channel.queue_declare(WORK_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
    # One unacked chunk at a time: a free server gets the next (fair dispatch), a crash strands one.
    channel.basic_qos(prefetch_count=1)
    # Every server consumes the same queue: the broker gives each chunk to one of them.
    channel.basic_consume(WORK_QUEUE, on_chunk)
    print(f"serving {', '.join(OPS)} on {WORK_QUEUE!r}; Ctrl-C to stop")
    channel.start_consuming()  # calls on_chunk for each chunk; returns if the broker cancels us
    connection.close()
    raise BrokerError(f"the broker cancelled our consumer: was {WORK_QUEUE!r} deleted?")


def on_chunk(channel: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
    try:
        request = parse_request(props, body)  # checks reply_to is a broker-named "amq.gen-..." queue
    except (ValueError, RecursionError) as exc:
        print(f"rejected a malformed message ({len(body)} bytes): {error_text(exc)[:200]}", file=sys.stderr)
        # Requeueing it would only bring it back: without requeue, the broker dead-letters it (distop.dead).
        channel.basic_reject(method.delivery_tag, requeue=False)
        return
    # repr(), cut: the id and the op name come from the network; escaped, they cannot break or forge the line.
    print(f"chunk {props.correlation_id[:80]!r}: {request['op'][:80]!r} on {len(request['chunk'])} items")
    # To the client's own queue, through the default exchange, quoting the chunk's correlation_id. No confirm:
    # a reply is lost only with the client's connection (its queue goes too); DistOp then resends the chunk.
    reply_props = BasicProperties(content_type=JSON, correlation_id=props.correlation_id)
    channel.basic_publish("", props.reply_to, run_op(request), reply_props)
    # Only now: a server that dies before this line leaves the chunk unacked, for another server.
    channel.basic_ack(method.delivery_tag)


def run_op(request: dict[str, Any]) -> bytes:
    """The reply to ``request``: {"result": ...}, or {"error": ...} as OpExecutor sends them."""
    try:
        if request["op"] not in OPS:
            raise UnknownOpError(f"no op {request['op'][:80]!r} here; this server offers: {', '.join(OPS)}")
        return codec.dumps({"result": OPS[request["op"]](request["chunk"], **request["params"])})
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": error_text(exc), "host": socket.gethostname()}
        return codec.dumps({"error": error})


# Command line ---------------------------------------------------------------


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help; no arguments
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # a lost connection: our one line, not pika's log
    try:
        serve()
    except KeyboardInterrupt:
        # Ctrl-C can land in the middle of a pika call, so we exit without closing (a close could wait
        # for an answer pika has lost). The broker sees the connection go and requeues an unacked chunk.
        return 0
    except (BrokerError, pika.exceptions.AMQPError) as exc:
        print(f"serve_one: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
