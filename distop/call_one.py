"""The simplest distop call: send one chunk to the servers, wait for its one reply, print the result.

    python distop/call_one.py plusone 1 2 3     # [2, 3, 4], from python distop/callee.py or serve_one.py

Guarantee: the chunk is on the work queue (persistent, confirmed) before we wait; the result printed is the
reply to our chunk, or the error the server's op raised. Limits: no reply within --timeout (30 s) ends it
(exit 1); the chunk stays queued, and its late reply goes to a queue gone with our connection.
A BlockingConnection: each call waits for the broker's answer, so the RPC reads top to bottom.
Left out, and done by DistOp (distop/dist_op.py): many chunks in flight, gathered in order; reconnection,
sending unanswered chunks again; dead-lettered chunks coming back as PoisonChunkError.
"""

import argparse
import json
import math
import sys
import time
import uuid

import pika

from distop import codec
from distop.broker import BrokerError, connect, resolve
from distop.cli import op_name, positive_float
from distop.errors import RemoteError
from distop.protocol import JSON, WORK_QUEUE, WORK_QUEUE_ARGUMENTS, decode_reply


def call(op: str, numbers: list[float], timeout: float) -> object:
    """The server's result for ``op`` on ``numbers``; RemoteError if its op raised, TimeoutError."""
    # connect(), in broker.py: pika.BlockingConnection(pika.URLParameters(url)), first node up.
    # blocked_for: a broker short of memory or disk stops reading from publishers; give up after 60 s.
    with connect(resolve(), blocked_for=60) as connection:  # AMQP_URL, else localhost
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now returns once the broker has the chunk safe
        # Declared exactly as the servers declare it (or the broker refuses): the first to come creates it.
        # Its dead-letter exchange and queue (distop.dead) we leave to the servers, which reject chunks.
        channel.queue_declare(WORK_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        # Our reply queue: exclusive, named by the broker ("amq.gen-..."), deleted with this connection.
        # Declared before we publish, so that the reply has somewhere to wait, however fast it comes.
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        # "JOB_ID:START", as DistOp makes them: which job, and where this chunk starts in its data.
        correlation_id = f"{uuid.uuid4().hex}:0"
        properties = pika.BasicProperties(
            content_type=JSON,
            delivery_mode=pika.DeliveryMode.Persistent,  # on disk: it survives a broker restart
            reply_to=reply_queue,  # where the server sends the answer
            correlation_id=correlation_id,  # what the answer quotes back, to say what it answers
        )
        body = codec.dumps({"op": op, "chunk": numbers, "params": {}})
        # mandatory: if no queue takes it, UnroutableError, not a silent drop.
        channel.basic_publish("", WORK_QUEUE, body, properties, mandatory=True)
        # consume(): basic_consume as a generator, which also yields (None, None, None) after
        # inactivity_timeout seconds of silence: waiting for one reply with a deadline, without a callback.
        # auto_ack: a reply's only destination is this process's memory.
        deadline = time.monotonic() + timeout
        for _method, props, reply in channel.consume(reply_queue, auto_ack=True, inactivity_timeout=0.5):
            if props is not None and props.correlation_id == correlation_id:  # else not an answer to us
                answer = decode_reply(reply)  # {"result": ...} or {"error": ...}
                if isinstance(answer, RemoteError):
                    raise answer
                return answer.result
            # Checked at each message or half second of silence: other messages must not keep us waiting.
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no reply within {timeout:g} s: is a server running (python distop/callee.py)?"
                )
    raise BrokerError("the broker cancelled our consumer: was our reply queue deleted?")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def number(text: str) -> float:
    if text.lstrip("-").isdigit():
        return int(text)  # exact
    value = float(text)
    if not math.isfinite(value):  # float() takes "nan", "inf" and 1e999; JSON has no such numbers
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", type=op_name, help="the op the servers run: plusone, pow, nop")
    parser.add_argument("numbers", nargs="+", type=number, help="the chunk: numbers")
    parser.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait (default: 30)")
    args = parser.parse_args()
    try:
        # As JSON, like distop/client.py: the result comes from the network, and JSON escapes what a
        # terminal would act on (and text that is not UTF-8).
        print(json.dumps(call(args.op, args.numbers, args.timeout)))
    except (BrokerError, RemoteError, TimeoutError, ValueError, pika.exceptions.AMQPError) as exc:
        if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):  # blocked_for (or the URL's) ran out
            exc = "the broker blocked the connection (memory or disk alarm); gave up"
        elif isinstance(exc, pika.exceptions.NackError):  # basic.nack: a full queue, a cluster in trouble
            exc = "the broker refused the chunk (a nack)"
        print(f"call_one: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the chunk may or may not be queued; no result
        print("call_one: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
