"""Publish messages to the durable queue ``pc`` and wait for the broker's confirms, surviving failures.

Pairs with pc/consumer.py; run it before or after the consumer: the queue keeps the messages until a
consumer takes them.

    python pc/producer.py my awesome message     # one message
    python pc/producer.py --count 10000 batch    # 'batch 1' .. 'batch 10000'

Guarantee: exit status 0 means the broker has taken every message into ``pc``, persistent, on disk
(publisher confirms). After a lost connection or a nack the unconfirmed ones are published again: a
consumer may see one twice, never miss one. Anything else ends in one line and exit status 1
(docs/pc.md lists them).

Read pc/send_many.py first: its ``SendMany`` is the whole RabbitMQ story (a channel in confirm mode, the
declarations, basic_publish with ``mandatory``, up to WINDOW messages in flight, the confirms counted by
delivery tag). ``Publisher`` below is that class, extended: each method here is one that SendMany has
too, changed for one reason, or one it does not have. The one rule it adds is RabbitMQ's contract for
publishers: a message the broker has not confirmed may not be in the queue, so after a lost connection
or a nack it is published again, on a new connection (run). What goes wrong, and where it is handled
(docs/pc.md has the whole table, with its tests):

    a lost connection       on_closed, then run: reconnect (each node in turn), publish the unconfirmed again
    a nack                  on_nack: start over the same way; give up after NACKS_FOR s of nacks
    pc deleted              SendMany.on_returned, or the passive declare after a reconnect: one line, exit 1
    a refused command       on_channel_closed: one line that says which, exit 1
    a memory or disk alarm  on_blocked: wait, up to BLOCKED_FOR
    no broker answers       on_open_error: the next node, then one line, exit 1
    a broker that goes      pc/watchdog.py: no confirm for 10 s, reconnect; our close unanswered, drop it
      silent (3.10)

Why a SelectConnection, not a BlockingConnection: confirms are pipelined, up to WINDOW messages in
flight, rather than one network round trip per message as in pc/send_one.py. How long run() waits
between connections, and when it gives up, is in pc/publisher_plumbing.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method

from pc.broker import BrokerError, redact, resolve
from pc.publisher_plumbing import NACKS_FOR, Nodes, Recovery, channel_error
from pc.send_many import SendMany
from pc.watchdog import Watchdog
from pc.workqueue import QUEUE

LOGGER = logging.getLogger("pc.producer")

# A broker short of memory or disk stops reading from publishers (an alarm): give up after this long
# (``?blocked_connection_timeout=SECONDS`` in AMQP_URL overrides it).
BLOCKED_FOR = 60.0


class Publisher(SendMany):
    """SendMany (pc/send_many.py), publishing again after a lost connection or a nack; ``run()`` raises
    BrokerError when it cannot go on."""

    # The broker confirms persistent messages in batches, as it writes them to disk: a window of a few
    # thousand, not SendMany's 1,000, keeps us publishing meanwhile (docs/performance.md).
    WINDOW = 5000

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        super().__init__(url, bodies)
        self.nodes = Nodes(url, BLOCKED_FOR)  # AMQP_URL's addresses (a cluster's nodes), in turn
        self.recovery = Recovery(url, self.nodes)  # how long to wait before starting over; when to give up
        self.blocked = False  # by a memory or disk alarm

    def run(self) -> None:
        """SendMany.run, on a new connection each time one is lost, until every body is confirmed."""
        while self.confirmed < len(self.bodies):
            self.node = self.nodes.next()  # the first node, then each in turn
            super().run()  # connect and publish, until the connection closes
            if self.error:
                raise BrokerError(self.error)
            if self.unconfirmed:
                # No confirm will come for these now: they may or may not be in pc. Publish them again,
                # first, in order: a consumer may see one twice, but never misses one.
                self.todo.extend(sorted(self.unconfirmed.values(), reverse=True))
            if self.confirmed < len(self.bodies):
                self.recovery.wait_to_reconnect(len(self.unconfirmed))  # or BrokerError: time to give up
            self.unconfirmed.clear()

    def connect(self, node: pika.ConnectionParameters) -> pika.SelectConnection:
        connection = super().connect(node)
        # A broker short of memory or disk blocks publishers until it recovers (on_blocked).
        connection.add_on_connection_blocked_callback(self.on_blocked)
        connection.add_on_connection_unblocked_callback(self.on_unblocked)
        Watchdog(connection, self)  # no wait lasts for ever on RabbitMQ 3.10 (pc/watchdog.py)
        return connection

    def on_open(self, connection: pika.SelectConnection) -> None:
        self.recovery.connected()  # a later loss is a new outage, with its own time budget
        self.blocked = False
        super().on_open(connection)

    def on_declared(self, frame: Method) -> None:
        # From now on, declare pc passive: only check that it is there. If pc is deleted while we are
        # away, a plain declare would create it empty, and the messages it had confirmed would be gone
        # without a word; passive, the broker answers 404 (on_channel_closed) and we exit 1.
        self.passive = True
        super().on_declared(frame)

    def on_nack(self, refused: int) -> None:
        # The broker did not take them (a queue at its length limit, an internal error). The contract is
        # to publish them again: start over, as after a lost connection (a new channel, not this one:
        # see Recovery.on_nack).
        if self.recovery.on_nack(refused, self.confirmed):  # logs, and sets the pause
            self.connection.close()  # then on_closed, and run() starts over
        else:  # nacks and nothing else for NACKS_FOR seconds
            self.stop(f"the broker refused every message for {NACKS_FOR:.0f} s; giving up")

    def on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        # As SendMany, with a line that says which command failed: a queue declared otherwise (406), or
        # the passive declare finding pc deleted (404). Retrying the same command would fail alike.
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.stop(str(channel_error(reason)))

    def on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        # This node did not answer: run() tries the next. None ever did: one line saying why.
        failure = self.nodes.failed(error)
        self.error = self.error or (str(failure) if failure else "")
        connection.ioloop.stop()

    def on_closed(self, connection: pika.SelectConnection, reason: Exception) -> None:
        # Not SendMany's failure: run() reconnects, unless we are stopping or were blocked too long.
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):
            timeout = connection.params.blocked_connection_timeout
            self.error = self.error or (
                f"the broker blocked this connection for {timeout:g} s (memory or disk alarm); giving up"
            )
        elif not self.error and not isinstance(reason, pika.exceptions.ConnectionClosedByClient):
            LOGGER.warning("connection closed: %s", reason)  # not closed by us (after a nack, or done)
        connection.ioloop.stop()  # back to run()

    def on_blocked(self, connection: pika.SelectConnection, frame: Method) -> None:
        # A memory or disk alarm: the broker stops reading from us until it recovers, and pika
        # closes the connection after blocked_connection_timeout (on_closed).
        self.blocked = True
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm); waiting up to %g s",
            frame.method.reason,
            connection.params.blocked_connection_timeout,
        )

    def on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self.blocked = False
        LOGGER.info("the broker has unblocked this connection")


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
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)

    text = " ".join(args.words)
    texts = [text] if args.count is None else [f"{text} {i}" for i in range(1, args.count + 1)]
    try:
        bodies = [t.encode() for t in texts]
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        parser.error("the message text is not UTF-8")

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
