"""Publish messages to the durable queue ``pc`` and wait for the broker's confirms.

Pairs with pc/consumer.py; run it before or after the consumer: the queue keeps the messages until a
consumer takes them.

    python pc/producer.py my awesome message     # one message
    python pc/producer.py --count 10000 batch    # 'batch 1' .. 'batch 10000'

Guarantee: exit status 0 means the broker has taken every message into ``pc``, persistent, on disk
(publisher confirms). After a lost connection or a nack the unconfirmed ones are published again: a
consumer may see one twice, never miss one. Anything else ends in one line and exit status 1.

Read pc/send_many.py first. ``Publisher`` tells its ``SendMany``'s story, in the same order: it comes
first below, with a one-line hook here and there for what goes wrong (the loop in run, watch, passive). Then,
in a section of its own, what goes wrong, and what the code does (docs/pc.md has the whole table, with its
tests):

    a lost connection       on_closed, then run: a new connection publishes every unconfirmed message again
    a nack                  on_nack: start over the same way; after NACKS_FOR s of nothing but nacks, exit 1
    a return (pc deleted)   on_returned: one line, exit 1
    a refused command       on_channel_closed: one line, exit 1 (a 404 after a reconnect: pc was deleted)
    a memory or disk alarm  on_blocked: wait, up to BLOCKED_FOR, then exit 1
    no broker answers       on_open_error: the next node, then one line, exit 1

How long run() waits before it starts over, and when it gives up, is in pc/publisher_plumbing.py; two
timeouts that RabbitMQ 3.10 needs, so that no wait lasts for ever, are in pc/watchdog.py. Why a
SelectConnection, not a BlockingConnection: confirms are pipelined, up to WINDOW messages in flight,
rather than one network round trip per message as in pc/send_one.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import deque

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic

from pc.broker import BrokerError, redact, resolve
from pc.publisher_plumbing import NACKS_FOR, Nodes, Recovery, channel_error
from pc.watchdog import Watchdog
from pc.workqueue import DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE_ARGUMENTS, QUEUE, QUEUE_ARGUMENTS

LOGGER = logging.getLogger("pc.producer")

PROPERTIES = pika.BasicProperties(
    content_type="text/plain",  # plain UTF-8 text, readable by any client in any language
    delivery_mode=pika.DeliveryMode.Persistent,  # written to disk: survives a broker restart
)
# Unconfirmed messages in flight, at most: the broker confirms persistent messages in batches, as it
# writes them to disk, and a window of a few thousand keeps us publishing meanwhile.
WINDOW = 5000
# A broker short of memory or disk stops reading from publishers (an alarm): give up after this long
# (``?blocked_connection_timeout=SECONDS`` in AMQP_URL overrides it).
BLOCKED_FOR = 60.0
MAX_COUNT = 1_000_000  # messages in one run, at most (--count)


class Publisher:
    """Publish ``bodies`` in order, confirms pipelined; ``run()`` raises BrokerError if it can't.

    The conversation with the broker, in the order it happens on each connection; each method is a
    callback that pika calls once the broker has answered the one before:

        run, connect    pika.SelectConnection          a connection to the next node; its ioloop runs
        on_open         connection.channel()           one channel
        on_channel      confirm_delivery(on_confirm)   the broker will ack (or nack) each message
                        queue_declare(pc.dead, pc)     durable quorum queues, as the consumer declares them
        on_declared     (the broker answered)          pc is there: publish
        publish         basic_publish, up to WINDOW    persistent, mandatory; numbered 1, 2, 3...
        on_confirm      basic.ack (or basic.nack)      the broker has them (or refused them): publish more
    """

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.todo = deque(range(len(bodies)))  # the indexes of the bodies still to publish, in order
        self.unconfirmed: dict[int, int] = {}  # delivery tag -> index of its body, on this channel
        self.next_tag = 1  # the delivery tag of the next message published on this channel
        self.confirmed = 0
        self.passive = False  # True once pc is declared: after that, only check that it is there
        self.connection: pika.SelectConnection  # this pass's, once connect() has made it
        self.channel: Channel  # this connection's, once open
        # For what goes wrong (below):
        self.failure: BrokerError | None = None  # set: stop, and run() raises it
        self.nodes = Nodes(url, BLOCKED_FOR)  # AMQP_URL's addresses (a cluster's nodes), in turn
        self.recovery = Recovery(url, self.nodes)  # how long to wait before starting over; when to give up

    # The story: send_many.py's, in the same order ------------------------------------

    def run(self) -> None:
        """Connect and publish until every body is confirmed; after a lost connection or a nack, again.

        send_many.py's run() connects once; this one is a loop, for what goes wrong (below).
        """
        while self.confirmed < len(self.bodies):
            self.connect()
            self.watch(self.connection)  # for what goes wrong: alarms, and no wait lasting for ever (below)
            # A SelectConnection does nothing until its ioloop runs: the loop reads what the broker
            # sends and calls the story's methods, until one of them stops it.
            self.connection.ioloop.start()
            if self.failure is not None:
                raise self.failure
            if self.unconfirmed:
                # No confirm will come for these now: they may or may not be in pc. Publish them again,
                # first, in order: a consumer may see one twice, but never misses one.
                self.todo.extendleft(sorted(self.unconfirmed.values(), reverse=True))
            if self.confirmed < len(self.bodies):
                self.recovery.wait_to_reconnect(len(self.unconfirmed))  # or BrokerError: time to give up
            self.unconfirmed.clear()

    def connect(self) -> None:
        # A SelectConnection's calls return at once; pika calls the methods below as the broker answers.
        # One node at a time, not pika's create_connection over all of them as in send_many.py: run()'s loop
        # moves to the next node after any failure, at the start or later.
        self.connection = pika.SelectConnection(
            self.nodes.next(),  # the first node of AMQP_URL; after a lost connection, the next
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_closed,
        )

    def on_open(self, connection: pika.SelectConnection) -> None:
        self.recovery.connected()  # for what goes wrong: a later loss is a new outage, with its own budget
        connection.channel(on_open_callback=self.on_channel)

    def on_channel(self, channel: Channel) -> None:
        self.channel = channel
        self.next_tag = 1  # a new channel numbers its messages from 1
        channel.add_on_close_callback(self.on_channel_closed)  # the broker refused a command
        channel.add_on_return_callback(self.on_returned)  # a mandatory message no queue took
        # pika sends each command at once; only the last declare asks to hear back: the broker answers a
        # channel's commands in order, so once the last is answered, all are (a refusal: on_channel_closed).
        # Publisher confirms: the broker now acks (or nacks) every message we publish, numbered 1, 2, 3...
        channel.confirm_delivery(self.on_confirm)
        # Where pc sends a message over its delivery limit (pc/workqueue.py).
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
        # Durable quorum queue, declared alike by the consumer: whoever starts first creates it.
        # passive, after the first time: only check that pc is there (on_declared says why).
        channel.queue_declare(
            QUEUE, durable=True, arguments=QUEUE_ARGUMENTS, passive=self.passive, callback=self.on_declared
        )

    def on_declared(self, _frame: Method) -> None:
        # Our choice: a pc deleted while we are away took the messages it had confirmed with it; declared
        # again, it would come back empty, and we would exit 0 all the same. Passive, the broker answers 404
        # instead (on_channel_closed): exit 1.
        self.passive = True
        self.publish()

    def publish(self) -> None:
        # Pipelined: publish until WINDOW are unconfirmed; each confirm makes room for more.
        while self.todo and len(self.unconfirmed) < WINDOW:
            index = self.todo.popleft()
            # The default exchange ("") routes by queue name. mandatory: if no queue takes the
            # message, the broker returns it rather than confirm it into the void.
            self.channel.basic_publish("", QUEUE, self.bodies[index], PROPERTIES, mandatory=True)
            # basic_publish returns nothing: we number the messages as the broker does, to read its confirms.
            self.unconfirmed[self.next_tag] = index  # its confirm will name it by this tag
            self.next_tag += 1

    def on_confirm(self, frame: Method) -> None:
        if self.failure is not None or not self.connection.is_open:
            return  # failed already (the ack after a return: see on_returned), or starting over
        method = frame.method
        # multiple: this confirm covers every tag up to delivery_tag, not only that one.
        if method.multiple:
            tags = [tag for tag in self.unconfirmed if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag]
        if isinstance(method, Basic.Nack):
            self.on_nack(len(tags))  # the broker did not take them: below
            return
        for tag in tags:  # an ack: the broker has them safe
            del self.unconfirmed[tag]
        self.confirmed += len(tags)
        if self.confirmed == len(self.bodies):
            self.connection.close()  # all confirmed: run() returns
        else:
            self.publish()  # room in the window: send the next ones

    # What goes wrong, and what the code does ----------------------------------------

    def on_nack(self, refused: int) -> None:
        # The broker did not take them (a queue at its length limit, an internal error). Any version:
        # publish them again; on a healthy broker, the same channel would do.
        # RabbitMQ 3.10: we do it on a new connection (run starts over): a 3.10 cluster can leave a channel
        # nacking everything (Recovery.on_nack; fixed in 3.12.5).
        if self.recovery.on_nack(refused, self.confirmed):  # logs, and sets the pause
            self.connection.close()  # then on_closed, and run() starts over
        else:  # nacks and nothing else for NACKS_FOR seconds
            self.stop(BrokerError(f"the broker refused every message for {NACKS_FOR:.0f} s; giving up"))

    def on_returned(self, _channel: Channel, _method: object, _props: object, _body: bytes) -> None:
        # No queue took a mandatory message (pc deleted). RabbitMQ's order, any version: the return, then
        # an ack that means "dealt with" (dropped), not "queued". So fail here; on_confirm ignores that ack.
        self.stop(BrokerError(f"the broker could not route a message to queue {QUEUE!r}"))

    def on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        # The broker closed the channel on an error in a command: the same command would fail alike.
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.stop(channel_error(reason))  # says which: a queue declared otherwise, pc deleted

    def on_closed(self, connection: pika.SelectConnection, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):  # blocked too long: give up
            timeout = connection.params.blocked_connection_timeout
            self.failure = self.failure or BrokerError(
                f"the broker blocked this connection for {timeout:g} s (memory or disk alarm); giving up"
            )
        elif self.failure is None and not isinstance(reason, pika.exceptions.ConnectionClosedByClient):
            LOGGER.warning("connection closed: %s", reason)  # not by us (we said why when we closed it)
        connection.ioloop.stop()  # back to run(), which starts over unless there is a failure

    def on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        # This node did not answer: run() tries the next. None ever did: one line saying why.
        self.failure = self.failure or self.nodes.failed(error)
        connection.ioloop.stop()

    def watch(self, connection: pika.SelectConnection) -> None:
        # A broker short of memory or disk blocks publishers until it recovers (on_blocked).
        connection.add_on_connection_blocked_callback(self.on_blocked)
        connection.add_on_connection_unblocked_callback(self.on_unblocked)
        Watchdog(connection, self)  # RabbitMQ 3.10: so that no wait lasts for ever (pc/watchdog.py)

    def on_blocked(self, connection: pika.SelectConnection, frame: Method) -> None:
        # A memory or disk alarm: the broker stops reading from us until it recovers, and pika
        # closes the connection after blocked_connection_timeout (on_closed).
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm); waiting up to %g s",
            frame.method.reason,
            connection.params.blocked_connection_timeout,
        )

    def on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        LOGGER.info("the broker has unblocked this connection")

    def on_silence(self, why: str) -> None:
        # RabbitMQ 3.10 may stop answering a publisher whose quorum queue was deleted (pc/watchdog.py):
        # close, and run() reconnects; its passive declare then finds pc gone, or publishes again.
        LOGGER.warning("%s; reconnecting to check on queue %r", why, QUEUE)
        self.connection.close()  # then on_closed

    def stop(self, error: BrokerError) -> None:
        """Stop: close the connection, and run() raises ``error`` (the first failure wins)."""
        self.failure = self.failure or error
        if self.connection.is_open:
            self.connection.close()  # then on_closed stops the loop
        elif self.connection.is_closed:
            self.connection.ioloop.stop()  # closed already, between two connections: back to run()

    @property
    def in_flight(self) -> int:
        """How many messages are published and not yet confirmed (for pc/watchdog.py)."""
        return len(self.unconfirmed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", default=["Hello", "World!"], help="the message text")
    parser.add_argument(
        "-n",
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="publish N numbered messages: 'TEXT 1' .. 'TEXT N'",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    if args.count is not None and not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count must be 1 to {MAX_COUNT:,} (every message is held in memory until confirmed)")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)

    text = " ".join(args.words)
    try:
        texts = [text] if args.count is None else [f"{text} {i}" for i in range(1, args.count + 1)]
        bodies = [t.encode() for t in texts]
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        parser.error("the message text is not UTF-8")
    except KeyboardInterrupt:  # Ctrl-C while a large --count is being made ready
        print("producer: interrupted before publishing anything", file=sys.stderr)
        return 1

    url = resolve()
    started = time.perf_counter()
    publisher: Publisher | None = None
    try:
        publisher = Publisher(url, bodies)  # BrokerError here if AMQP_URL is malformed
        publisher.run()
    except (BrokerError, KeyboardInterrupt) as exc:
        why = exc if isinstance(exc, BrokerError) else "interrupted"
        confirmed = publisher.confirmed if publisher is not None else 0
        print(f"producer: {why} ({confirmed} of {len(bodies)} confirmed)", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if args.count is None:
        LOGGER.info("sent %r to %r at %s (confirmed)", text, QUEUE, redact(url))
    else:
        LOGGER.info(
            "sent %d messages to %r at %s in %.2f s (%.0f msg/s, all confirmed)",
            len(bodies),
            QUEUE,
            redact(url),
            elapsed,
            len(bodies) / elapsed,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
