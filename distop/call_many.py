"""Many chunks in flight, answered in any order, gathered by correlation id: call_one.py, asynchronous.

    python distop/call_many.py plusone 1 2 3 4 5 6 --chunks 3     # [2, 3, 4, 5, 6, 7]

Why a SelectConnection: call_one.py's BlockingConnection publishes one chunk and waits. Here every chunk is
published at once, the broker's confirms and the servers' replies arrive as callbacks, in any order, and
each reply's correlation_id says which chunk it answers. A chunk that kills the servers comes back too:
the work queue dead-letters it to the headers exchange distop.dead, and our binding on our client id brings
it to our reply queue. Guarantee: the result printed is every chunk's reply, gathered in order. Limits:
nothing is retried. A nack, a return, a refused declaration, a lost connection, an op that raised, a dead
chunk, or --timeout without every reply ends it in one line and exit status 1. DistOp (distop/dist_op.py) is
this story plus call() returning at once (an I/O thread), jobs side by side, and publishing again, on a new
connection, every chunk not yet answered.
"""

import argparse
import json
import sys
import uuid
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from distop import codec
from distop.broker import BrokerError, explain, parameters, resolve
from distop.call_one import number
from distop.cli import op_name, positive, positive_float
from distop.errors import RemoteError, printable
from distop.protocol import (
    CLIENT_HEADER,
    DEAD_LETTER_EXCHANGE,
    JSON,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    dead_letter_error,
    decode_reply,
    split,
)


class CallMany:
    """Each method is a callback. pika calls the first few in order, each once the broker has answered the
    one before (open, channel, declare, reply queue, confirm mode); then on_confirm and on_reply whenever
    the broker sends one."""

    def __init__(self, url: str, op: str, numbers: list[float], chunks: int, timeout: float) -> None:
        self.url = url
        self.job_id = uuid.uuid4().hex  # the correlation_id of each chunk is "JOB_ID:START"
        self.client_id = uuid.uuid4().hex  # our dead chunks come back to us on this header
        self.requests = {
            start: {"op": op, "chunk": chunk, "params": {}} for start, chunk in split(numbers, chunks)
        }
        self.partials: dict[int, Any] = {}  # start index -> the server's result for that chunk
        self.connection: pika.SelectConnection | None = None  # set once open (on_open)
        self.channel: Channel  # set once open (on_channel)
        self.error = ""  # why it stopped early
        self.ioloop = IOLoop()
        # Each address of the URL (a cluster's nodes) in turn, until one answers. blocked_for: a broker short
        # of memory or disk stops reading from publishers; give up after 60 s of that (on_closed).
        nodes = parameters(url, blocked_for=60)
        pika.SelectConnection.create_connection(nodes, self.on_open, custom_ioloop=self.ioloop)
        self.ioloop.call_later(timeout, lambda: self.stop(f"not every reply within {timeout:g} s"))

    def run(self) -> None:
        # A SelectConnection does nothing until its ioloop runs: the loop reads what the broker sends and
        # calls the methods below, until on_closed (or stop) stops it.
        self.ioloop.start()

    def on_open(self, connection: pika.SelectConnection | AMQPConnectionWorkflowFailed) -> None:
        if isinstance(connection, AMQPConnectionWorkflowFailed):  # no address answered
            self.stop(str(explain(self.url, *connection.exceptions)))
            return
        self.connection = connection
        connection.add_on_close_callback(self.on_closed)
        connection.channel(on_open_callback=self.on_channel)

    def on_channel(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        # mandatory: a chunk no queue takes comes back (basic.return) instead of vanishing.
        channel.add_on_return_callback(lambda *_: self.stop(f"no queue {WORK_QUEUE!r} took a chunk"))
        # As the servers declare them: the dead-letter exchange, then the work queue that names it. A callback
        # on the last only, since the broker takes a channel's commands in order.
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
        channel.queue_declare(WORK_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        # Our reply queue: "" lets the broker name it; exclusive: ours alone, gone with this connection.
        channel.queue_declare("", exclusive=True, callback=self.on_reply_queue)

    def on_reply_queue(self, frame: Method) -> None:
        reply_queue = frame.method.queue  # the name the broker chose
        # A dead chunk keeps its headers, ours among them: this binding brings it back to our reply queue.
        bind = {"x-match": "all", CLIENT_HEADER: self.client_id}
        self.channel.queue_bind(reply_queue, DEAD_LETTER_EXCHANGE, arguments=bind)
        # auto_ack: a reply's only destination is this process's memory.
        self.channel.basic_consume(reply_queue, self.on_reply, auto_ack=True)
        # From now on the broker acks (or nacks) each chunk published on this channel.
        self.channel.confirm_delivery(self.on_confirm, callback=lambda _frame: self.publish(reply_queue))

    def publish(self, reply_queue: str) -> None:
        # Scatter: every chunk at once; the servers share them out, one each.
        for start, request in self.requests.items():
            properties = BasicProperties(
                content_type=JSON,
                delivery_mode=pika.DeliveryMode.Persistent,  # on disk: it survives a broker restart
                reply_to=reply_queue,  # where the server sends the answer
                correlation_id=f"{self.job_id}:{start}",  # what the answer quotes: our job, this chunk
                headers={CLIENT_HEADER: self.client_id},  # brings the chunk back to us if it dies
            )
            self.channel.basic_publish("", WORK_QUEUE, codec.dumps(request), properties, mandatory=True)

    def on_confirm(self, frame: Method) -> None:
        if isinstance(frame.method, Basic.Nack):  # the broker could not take one (or more, with multiple)
            self.stop("the broker refused a chunk (a nack)")

    def on_reply(self, _ch: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        # Gather: the correlation_id says which chunk a reply answers; anything else is not ours.
        # "JOB_ID:START"; bytes, not str, if the one a peer sent is not UTF-8.
        correlation_id = props.correlation_id if isinstance(props.correlation_id, str) else ""
        job_id, _, start = correlation_id.partition(":")
        index = int(start) if start.isascii() and start.isdigit() else -1
        if job_id != self.job_id or index not in self.requests:
            return
        headers = props.headers if isinstance(props.headers, dict) else {}
        if method.exchange == DEAD_LETTER_EXCHANGE and "x-death" in headers:
            # Not a reply: our chunk itself, dead-lettered (past the delivery limit, or rejected by a server).
            self.stop(str(dead_letter_error(self.job_id, index, headers)))
            return
        try:
            answer = decode_reply(body)  # {"result": ...} or {"error": ...}
        except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
            self.stop(f"a malformed reply for chunk {index}: {printable(str(exc))[:200]}")
            return
        if isinstance(answer, RemoteError):
            self.stop(str(answer))
            return
        self.partials[index] = answer.result
        if len(self.partials) == len(self.requests):
            self.stop("")  # every chunk answered: done

    def on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        # The broker closes a channel on a command it refuses, such as a declaration with other arguments.
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.stop(f"the broker closed the channel: {reason}")

    def stop(self, error: str) -> None:
        if self.error or (error and len(self.partials) == len(self.requests)):
            return  # stopped already, or done: the first reason stands
        self.error = error
        if self.connection is None:
            self.ioloop.stop()  # never opened
        elif self.connection.is_open:
            self.connection.close()  # then on_closed

    def on_closed(self, _connection: pika.SelectConnection, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):  # blocked 60 s, or the URL's timeout
            self.error = self.error or "the broker blocked the connection (memory or disk alarm); gave up"
        if len(self.partials) < len(self.requests):
            self.error = self.error or f"lost the connection: {reason}"
        self.ioloop.stop()  # back to run()

    def result(self) -> list[Any]:
        """The partials, gathered in order: each chunk's list of results, one after the other."""
        gathered: list[Any] = []
        for start in sorted(self.partials):
            partial = self.partials[start]
            gathered += partial if isinstance(partial, list) else [partial]
        return gathered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", type=op_name, help="the op the servers run on each number: plusone, pow, nop")
    parser.add_argument("numbers", nargs="+", type=number, help="the data: numbers")
    parser.add_argument("--chunks", type=positive, default=3, help="how many chunks (default: 3)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait (default: 30)")
    args = parser.parse_args()
    caller: CallMany | None = None
    try:
        caller = CallMany(resolve(), args.op, args.numbers, args.chunks, args.timeout)
        caller.run()
    except BrokerError as exc:  # a malformed AMQP_URL
        print(f"call_many: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the chunks may or may not be queued; no result
        print("call_many: interrupted", file=sys.stderr)
        return 1
    if caller.error or len(caller.partials) < len(caller.requests):
        answered = f"{len(caller.partials)} of {len(caller.requests)} chunks answered"
        print(f"call_many: {caller.error} ({answered})", file=sys.stderr)
        return 1
    # As JSON, like call_one.py: the result comes from the network, and JSON escapes what a terminal acts on.
    print(json.dumps(caller.result()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
