"""Publish many messages to the queue ``pc``, confirms pipelined: pc/send_one.py's lesson, asynchronous.

    python pc/send_many.py 10000 batch     # 'batch 1' .. 'batch 10000'

Why a SelectConnection: send_one.py's BlockingConnection waits for each confirm, one network round trip per
message. Here up to WINDOW messages are in flight at once, and the broker's confirms arrive as callbacks.
Guarantee: exit status 0 means the broker confirmed every message (in ``pc``, on disk). Limits: nothing is
retried. A nack, a return, a refused declaration, a lost connection, 60 s blocked by a memory or disk
alarm, or 10 s without a confirm (RabbitMQ 3.10 may fall silent when pc is deleted) ends it in one line
and exit status 1, and the messages not yet confirmed may or may not be in the queue.
pc/producer.py is this story plus publishing those again, on a new connection or channel, until all are
confirmed.
"""

import argparse
import sys

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic

from pc.broker import BrokerError, explain, parameters, resolve
from pc.watchdog import Watchdog
from pc.workqueue import DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE_ARGUMENTS, QUEUE, QUEUE_ARGUMENTS

PERSISTENT = pika.BasicProperties(content_type="text/plain", delivery_mode=pika.DeliveryMode.Persistent)
WINDOW = 1000  # messages published and not yet confirmed, at most
MAX_COUNT = 1_000_000  # messages in one run, at most


class SendMany:
    """Each method is a callback. pika calls the first few in order, each once the broker has answered the
    one before (open, channel, declare); then on_confirm and on_returned whenever the broker sends one."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self.url = url
        self.bodies = bodies
        self.connection: pika.SelectConnection | None = None  # set once open (on_open)
        self.channel: Channel  # set once open (on_channel)
        self.published = 0
        self.unconfirmed: set[int] = set()  # delivery tags: 1, 2, 3... in the order we publish on the channel
        self.confirmed = 0
        self.error = ""  # why it stopped early
        self.ioloop = IOLoop()
        # Each address of the URL (a cluster's nodes) in turn, until one answers. blocked_for: a broker short
        # of memory or disk stops reading from publishers; give up after 60 s of that (on_closed).
        nodes = parameters(url, blocked_for=60)
        pika.SelectConnection.create_connection(nodes, self.on_open, custom_ioloop=self.ioloop)

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
        Watchdog(connection, self)  # RabbitMQ 3.10: so that no wait lasts for ever (pc/watchdog.py)
        connection.channel(on_open_callback=self.on_channel)

    def on_channel(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        # mandatory: a message no queue takes comes back (basic.return) instead of vanishing.
        channel.add_on_return_callback(lambda *_: self.stop(f"no queue {QUEUE!r} took a message"))
        # From now on the broker acks (or nacks) each message published on this channel.
        channel.confirm_delivery(self.on_confirm)
        # As send_one.py declares them: pc.dead first, then pc; a callback on the last only, since
        # the broker takes a channel's commands in order.
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
        channel.queue_declare(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS, callback=self.publish)

    def publish(self, _frame: Method | None = None) -> None:
        # Pipelined: publish until WINDOW are unconfirmed; each confirm makes room for more.
        while self.published < len(self.bodies) and len(self.unconfirmed) < WINDOW and not self.error:
            self.channel.basic_publish("", QUEUE, self.bodies[self.published], PERSISTENT, mandatory=True)
            self.published += 1
            self.unconfirmed.add(self.published)  # this message's delivery tag

    def on_confirm(self, frame: Method) -> None:
        method = frame.method
        # multiple: this confirm covers every tag up to delivery_tag, not only that one.
        if method.multiple:
            tags = {tag for tag in self.unconfirmed if tag <= method.delivery_tag}
        else:
            tags = {method.delivery_tag}
        self.unconfirmed -= tags
        if isinstance(method, Basic.Nack):  # the broker could not take them
            self.stop(f"the broker refused {len(tags)} message(s)")
        elif not self.error:  # after a return, its ack means "dropped": not counted
            self.confirmed += len(tags)
            if self.confirmed == len(self.bodies):
                self.stop("")  # all confirmed: done
            self.publish()

    @property
    def in_flight(self) -> int:  # for the Watchdog
        return len(self.unconfirmed)

    def on_silence(self, why: str) -> None:  # the Watchdog: no confirm for a while (was pc deleted?)
        self.stop(f"{why} (was queue {QUEUE!r} deleted?)")

    def on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        # The broker closes a channel on a command it refuses, such as a declaration with other arguments.
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.stop(f"the broker closed the channel: {reason}")

    def stop(self, error: str) -> None:
        self.error = self.error or error
        if self.connection is None:
            self.ioloop.stop()  # never opened
        elif self.connection.is_open:
            self.connection.close()  # then on_closed

    def on_closed(self, _connection: pika.SelectConnection, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):  # blocked 60 s, or the URL's timeout
            self.error = self.error or "the broker blocked the connection (memory or disk alarm); gave up"
        if self.confirmed < len(self.bodies):
            self.error = self.error or f"lost the connection: {reason}"
        self.ioloop.stop()  # back to run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int, help="how many messages: 'TEXT 1' .. 'TEXT COUNT'")
    parser.add_argument("words", nargs="*", default=["message"], help="the message text")
    args = parser.parse_args()
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"count must be 1 to {MAX_COUNT:,} (every message is held in memory until confirmed)")
    text = " ".join(args.words)
    try:
        bodies = [f"{text} {i}".encode() for i in range(1, args.count + 1)]
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        parser.error("the message text is not UTF-8")
    except KeyboardInterrupt:  # Ctrl-C while a large count is being made ready
        print("send_many: interrupted before publishing anything", file=sys.stderr)
        return 1
    sender: SendMany | None = None
    try:
        sender = SendMany(resolve(), bodies)
        sender.run()
    except BrokerError as exc:  # a malformed AMQP_URL
        print(f"send_many: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: those confirmed are in pc; the others may or may not be
        confirmed = sender.confirmed if sender is not None else 0
        print(f"send_many: interrupted ({confirmed} of {len(bodies)} confirmed)", file=sys.stderr)
        return 1
    if sender.confirmed < len(bodies):
        print(f"send_many: {sender.error} ({sender.confirmed} of {len(bodies)} confirmed)", file=sys.stderr)
        return 1
    print(f"sent {len(bodies)} messages to {QUEUE!r}, all confirmed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
