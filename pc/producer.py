"""Publish messages to the durable queue ``pc`` and wait for the broker's confirms.

Pairs with pc/consumer.py; run it before or after the consumer: the queue keeps the messages until a
consumer takes them. Read pc/send_many.py first, the same story with nothing retried.

    python pc/producer.py my awesome message     # one message
    python pc/producer.py --count 10000 batch    # 'batch 1' .. 'batch 10000'

Guarantee: exit status 0 means the broker has taken every message into ``pc``, persistent, on disk
(publisher confirms). After a lost connection or a nack the unconfirmed ones are published again: a
consumer may see one twice, never miss one. Anything else ends in one line and exit status 1
(docs/pc.md lists them).

Why a SelectConnection (callbacks), not a BlockingConnection: confirms are pipelined, up to WINDOW
messages in flight, rather than one network round trip per message as in pc/send_one.py. ``Publisher``
is the story: send_many.py's, plus one rule: after a lost connection or a nack, start over on a new
connection and publish every unconfirmed message again. How long to wait, and when to give up, is in
pc/publisher_plumbing.py. Tested against RabbitMQ 3.10.
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
from pc.outbox import Nodes, Outbox
from pc.publisher_plumbing import NACKS_FOR, Recovery, channel_error, close_connection
from pc.workqueue import DEAD_LETTER_QUEUE, DEAD_LETTER_QUEUE_ARGUMENTS, QUEUE, QUEUE_ARGUMENTS

LOGGER = logging.getLogger("pc.producer")
# We closed the connection ourselves (after a nack, or the confirm timeout did), and said why at the time.
CLOSED_BY_US = pika.exceptions.ConnectionClosedByClient

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


class Publisher:
    """Publish ``bodies`` in order, confirms pipelined; ``run()`` raises BrokerError if it cannot.

    The story, in the order it happens; pika calls each method when the broker has answered the one before:

        run, _connect           pika.SelectConnection(...)        connect; its ioloop calls us back
        _on_connection_open     connection.channel(...)           open a channel
        _on_channel_open        channel.confirm_delivery(...)     publisher confirms on
                                channel.queue_declare("pc.dead")  the dead-letter queue
                                channel.queue_declare("pc")       durable (passive after the first time)
        _on_declared, _publish  channel.basic_publish(...)        mandatory; up to WINDOW unconfirmed
        _on_confirm             (basic.ack or basic.nack)         ack: settled; nack: start over
        _on_returned            (basic.return)                    no queue took it: fail

    What goes wrong, and what the code does (docs/pc.md has the whole table, with its tests):

        a lost connection       run(): reconnect, publish every unconfirmed message again
        a nack                  _on_confirm: start over the same way
        a return (pc deleted)   _on_returned: one line, exit 1
        a refused command       _on_channel_closed: one line, exit 1
        a memory or disk alarm  _on_blocked: wait, up to BLOCKED_FOR
        no broker answers       _on_open_error: the next node, then one line, exit 1

    Two timeouts, so that no wait lasts for ever (publisher_plumbing.py; both were needed on RabbitMQ
    3.10, when pc was deleted under a running publisher):

        no confirm for CONFIRMS_DUE      Recovery.watch_confirms: reconnect, as after a lost connection
        our close not answered           close_connection: drop the connection after CLOSE_DUE

    And one choice of this example, not a rule of RabbitMQ's: after the first time, pc is declared
    *passive*, so that a pc deleted under us (with messages it had confirmed) ends in exit 1, not exit 0.
    """

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self._outbox = Outbox(bodies, WINDOW)  # each message: to send, in flight (by delivery tag), confirmed
        self._nodes = Nodes(url, BLOCKED_FOR)  # AMQP_URL's addresses (a cluster's nodes), in turn
        self._recovery = Recovery(url, self._outbox, self._nodes)  # back-off, giving up, the confirm timeout
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None  # this connection's, once open
        self._failure: BrokerError | None = None  # set: stop, and run() raises it
        self.passive = False  # True once pc is declared: after that, only check that it is there

    @property
    def confirmed(self) -> int:
        """How many messages the broker has confirmed so far."""
        return self._outbox.confirmed

    def run(self) -> None:
        """Connect and publish until every body is confirmed; after a lost connection, again."""
        while not self._outbox.done:
            self._connect(self._nodes.next())
            assert self._connection is not None
            # A SelectConnection does nothing until its ioloop runs: the loop reads what the broker
            # sends and calls our methods below, until one of them stops it.
            self._connection.ioloop.start()
            if self._failure is not None:
                raise self._failure
            if not self._outbox.done:
                # Lost, or closed by us after a nack: wait, then publish the unconfirmed again (or give up).
                self._recovery.wait_to_reconnect()

    def _connect(self, node: pika.URLParameters) -> None:
        self._connection = pika.SelectConnection(
            node,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._connection.add_on_connection_blocked_callback(self._on_blocked)  # an alarm: see below
        self._connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        self._recovery.connected(connection)  # a later loss is a new outage, with its own time budget
        # A channel: the session we declare, publish and receive confirms on.
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._outbox.new_channel()  # its delivery tags start from 1
        channel.add_on_close_callback(self._on_channel_closed)  # the broker refused a command
        channel.add_on_return_callback(self._on_returned)  # a mandatory message no queue took
        # No callback until the last command: the broker takes a channel's commands in order.
        # Publisher confirms: the broker now acks (or nacks) every message we publish, numbered 1, 2, 3...
        channel.confirm_delivery(self._on_confirm)
        # Where pc sends a message over its delivery limit (pc/workqueue.py).
        channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
        # Durable quorum queue, declared alike by the consumer: whoever starts first creates it. Passive
        # after the first time: a pc deleted under us took confirmed messages with it; don't hide that.
        channel.queue_declare(
            QUEUE, durable=True, arguments=QUEUE_ARGUMENTS, passive=self.passive, callback=self._on_declared
        )

    def _on_declared(self, _frame: Method) -> None:
        self.passive = True
        self._publish()

    def _publish(self) -> None:
        assert self._channel is not None
        # Up to WINDOW messages in flight; each confirm makes room for more.
        while (body := self._outbox.next_body()) is not None:
            # The default exchange ("") routes by queue name. mandatory: if no queue takes the
            # message, the broker returns it rather than confirm it into the void.
            self._channel.basic_publish("", QUEUE, body, PROPERTIES, mandatory=True)

    def _on_confirm(self, frame: Method) -> None:
        assert self._connection is not None
        if self._failure is not None or not self._connection.is_open:
            return  # failed already (the ack after a return: see _on_returned), or starting over
        method = frame.method
        if isinstance(method, pika.spec.Basic.Ack):
            # The broker has them safe: every tag up to this one (multiple), or this one.
            self._outbox.settle(method.delivery_tag, method.multiple)
            if self._outbox.done:
                self._connection.close()  # all confirmed: run() returns
            else:
                self._publish()  # room in the window: send the next ones
            return
        # A nack: the broker did not take them (a queue at its length limit, an internal error). The
        # contract is to publish them again: we start over, as after a lost connection (run()).
        refused = self._outbox.covered(method.delivery_tag, method.multiple)
        if self._recovery.on_nack(refused):  # logs, and sets the pause before reconnecting
            close_connection(self._connection)
        else:  # nacks and nothing else for NACKS_FOR seconds
            self._fail(BrokerError(f"the broker refused every message for {NACKS_FOR:.0f} s; giving up"))

    def _on_returned(self, _channel: Channel, _method: object, _props: object, _body: bytes) -> None:
        # No queue took a mandatory message (pc deleted). RabbitMQ's order, any version: the return, then
        # an ack that means "dealt with" (dropped), not "queued". So fail here; _on_confirm ignores that ack.
        self._fail(BrokerError(f"the broker could not route a message to queue {QUEUE!r}"))

    # What goes wrong, and what we do ------------------------------------------

    def _on_blocked(self, connection: pika.SelectConnection, frame: Method) -> None:
        # A memory or disk alarm: the broker stops reading from us until it recovers, and pika
        # closes the connection after blocked_connection_timeout (_on_connection_closed).
        self._recovery.blocked = True  # the confirm timeout leaves a blocked connection alone
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm); waiting up to %g s",
            frame.method.reason,
            connection.params.blocked_connection_timeout,
        )

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self._recovery.blocked = False
        LOGGER.info("the broker has unblocked this connection")

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        # The broker closed the channel on an error in a command: the same command would fail
        # alike. One line, exit 1; channel_error says which (a queue declared otherwise, pc deleted).
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self._fail(channel_error(reason))

    def _fail(self, error: BrokerError) -> None:
        """Stop: close the connection, and run() raises ``error`` (the first failure wins)."""
        self._failure = self._failure or error
        assert self._connection is not None
        if self._connection.is_open:
            close_connection(self._connection)  # then _on_connection_closed stops the loop
        elif self._connection.is_closed:
            self._connection.ioloop.stop()  # closed already, between two connections: back to run()

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        # This node did not answer: run() tries the next. None ever did: one line saying why.
        self._failure = self._failure or self._nodes.failed(error)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout):  # blocked too long: give up
            timeout = connection.params.blocked_connection_timeout
            self._failure = self._failure or BrokerError(
                f"the broker blocked this connection for {timeout:g} s (memory or disk alarm); giving up"
            )
        elif not self._outbox.done and self._failure is None and not isinstance(reason, CLOSED_BY_US):
            LOGGER.warning("connection closed: %s", reason)  # run() reconnects
        connection.ioloop.stop()  # back to run()


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
    bodies = [t.encode() for t in texts]

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
