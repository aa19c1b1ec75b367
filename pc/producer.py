"""Publish messages to the durable queue ``pc`` and wait for the broker's confirms.

Pairs with pc/consumer.py; run it before or after the consumer, as often as
you like: the queue keeps the messages until a consumer takes them.

    python pc/producer.py my awesome message     # one message
    python pc/producer.py --count 10000 batch    # 'batch 1' .. 'batch 10000'

Guarantee: exit status 0 means the broker has taken every message into ``pc``,
persistent, on disk (publisher confirms). After a lost connection or a nack the
unconfirmed ones are published again: a consumer may see one twice, never miss
one. Anything else ends in one line and exit status 1 (docs/pc.md lists them).

Why SelectConnection (callbacks) rather than BlockingConnection: confirms are
pipelined, up to WINDOW messages in flight at once, rather than one network
round trip per message as pc/send_one.py does. The callbacks below run in the
order things happen: connection open -> channel open -> confirms on -> queues
declared -> publish -> confirm.
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
from pc.outbox import Nodes, Outbox, Patience
from pc.workqueue import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    QUEUE,
    QUEUE_ARGUMENTS,
    inequivalent,
)

LOGGER = logging.getLogger("pc.producer")

# Persistent: written to disk, so it survives a broker restart. Plain UTF-8
# text, readable by any client in any language.
PROPERTIES = pika.BasicProperties(content_type="text/plain", delivery_mode=pika.DeliveryMode.Persistent)
# Unconfirmed messages allowed in flight; bounds memory on both sides, and
# what goes round again after a reconnect. The broker confirms persistent
# messages once they are on disk, in batches: a window of a few thousand keeps
# us publishing while it writes.
WINDOW = 5000
# A broker short of memory or disk stops reading from publishers until it
# recovers; give up after this long, rather than wait silently for ever
# (``?blocked_connection_timeout=SECONDS`` in AMQP_URL overrides it).
BLOCKED_FOR = 60.0
# After losing the broker mid-run, keep trying this long before giving up.
RECONNECT_FOR = 30.0
# Seconds with messages in flight and no confirm: then reconnect, and so check that the queue is there.
CONFIRMS_DUE = 10.0


class Publisher:
    """Publish ``bodies`` in order with pipelined publisher confirms.

    ``run()`` blocks until every body is confirmed, and raises BrokerError if
    that cannot happen. Bodies still unconfirmed when a connection is lost are
    published again on the next one.
    """

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self._url = url
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._outbox = Outbox(bodies, WINDOW)  # to send, in flight, confirmed (pc/outbox.py)
        self._declared = False  # pc declared on this channel
        self._declared_before = False  # on any channel, since we started
        # After a nack, a new channel after 0.1 s, doubling to 2 s; 30 s of nacks with no ack: give up.
        self._nacks = Patience(first=0.1, most=2.0, budget=30.0)
        self._nodes: Nodes  # the broker's addresses, tried in turn (run)
        self._failure: BrokerError | None = None  # set: stop, and run() raises it
        self._blocked = False  # by a memory or disk alarm (_on_blocked)

    @property
    def confirmed(self) -> int:
        """How many messages the broker has confirmed so far."""
        return self._outbox.confirmed

    # The story, in the order things happen ---------------------------------

    def _connect(self, node: pika.URLParameters) -> None:
        """Open a connection; each step below is the callback of the one before."""
        self._connection = pika.SelectConnection(
            node,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._connection.add_on_connection_blocked_callback(self._on_blocked)
        self._connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        self._nodes.connected()
        self._blocked = False
        # A channel: the session we declare, publish and receive confirms on.
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._outbox.new_channel()
        channel.add_on_close_callback(self._on_channel_closed)
        # A mandatory message the broker cannot route comes back here (basic.return).
        channel.add_on_return_callback(self._on_returned)
        # Publisher confirms: the broker now acks (or nacks) every message we
        # publish on this channel, numbered 1, 2, 3... as we publish them.
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._declare())

    def _declare(self) -> None:
        assert self._channel is not None
        self._declared = False
        # Where pc sends a message over its delivery limit (pc/workqueue.py).
        self._channel.queue_declare(
            DEAD_LETTER_QUEUE,
            durable=True,
            arguments=DEAD_LETTER_QUEUE_ARGUMENTS,
            callback=self._declare_queue,
        )

    def _declare_queue(self, _frame: Method) -> None:
        assert self._channel is not None
        # Durable quorum queue, declared alike by the consumer (pc/workqueue.py):
        # whichever starts first creates it. Passive after a reconnect: only
        # check it is there, since a deleted queue took our confirmed messages
        # with it, and creating it afresh would hide that loss.
        self._channel.queue_declare(
            QUEUE,
            durable=True,
            arguments=QUEUE_ARGUMENTS,
            passive=self._declared_before,
            callback=self._on_declared,
        )

    def _on_declared(self, _frame: Method) -> None:
        self._declared = self._declared_before = True
        self._watch_confirms(self._channel, self._outbox.confirmed)
        self._publish()

    def _publish(self) -> None:
        assert self._channel is not None
        # Up to WINDOW messages in flight; each confirm makes room for more.
        while (body := self._outbox.next_body()) is not None:
            # The default exchange ("") routes by queue name. mandatory: if
            # the queue is gone, the broker returns the message instead of
            # confirming it into the void.
            self._channel.basic_publish("", QUEUE, body, PROPERTIES, mandatory=True)

    def _on_confirm(self, frame: Method) -> None:
        if self._failure is not None or self._channel is None:
            return  # we are closing (say, after a return), or this channel was given up after a nack
        if frame.channel_number != self._channel.channel_number:
            return  # from a channel given up after a nack: its messages are to be published again
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            # The broker refused them: publish them again, on a new channel (_on_nack).
            self._on_nack(self._outbox.covered(method.delivery_tag, method.multiple))
            return
        # One confirm may cover many messages: every tag up to this one (multiple).
        self._outbox.settle(method.delivery_tag, method.multiple)
        self._nacks.reset()
        if self._outbox.done:
            assert self._connection is not None
            self._connection.close()  # all confirmed: run() returns
        else:
            self._publish()  # room in the window: send the next ones

    def _on_returned(self, _channel: Channel, _method: object, _props: object, _body: bytes) -> None:
        # The broker sends basic.return for a mandatory message no queue took,
        # then basic.ack for it: that ack means "dealt with" (dropped), not
        # "queued". So fail here, at the return; _on_confirm ignores the ack after it.
        self._fail(BrokerError(f"the broker could not route a message to queue {QUEUE!r}"))

    # What goes wrong -------------------------------------------------------

    def _watch_confirms(self, channel: Channel | None, confirmed: int) -> None:
        """Every CONFIRMS_DUE seconds: if no confirm came while messages are in flight, reconnect.

        RabbitMQ 3.10 neither confirms nor returns what was in flight to a
        quorum queue deleted under it, and stops answering on that connection:
        without this, we would wait for ever. A new connection declares the
        queue passively (_declare_queue), so a deleted queue ends in one line.
        """
        connection = self._connection
        if channel is not self._channel or connection is None or not connection.is_open or self._failure:
            return  # this channel or connection is over: a new one watches for itself
        stuck = self._outbox.confirmed == confirmed and self._outbox.in_flight > 0
        if stuck and not self._blocked:  # blocked: _on_blocked said so, and its timeout applies
            LOGGER.warning("no confirm for %g s; reconnecting to check on queue %r", CONFIRMS_DUE, QUEUE)
            connection.close()  # run() reconnects, and publishes the unconfirmed messages again
            # A broker that does not answer the close either: drop the connection (back to run()).
            connection.ioloop.call_later(CONFIRMS_DUE, connection.ioloop.stop)
            return
        connection.ioloop.call_later(
            CONFIRMS_DUE, lambda: self._watch_confirms(channel, self._outbox.confirmed)
        )

    def _on_nack(self, refused: int) -> None:
        """The broker refused ``refused`` messages: publish every unconfirmed one again on a new channel.

        Not on the same channel: on a RabbitMQ 3.10 cluster, a channel opened
        just as a node died can keep pointing at the queue's dead leader, and
        nack everything published on it until that node is back. A new channel
        finds the new leader. A message nacked may have been taken after all,
        so it may arrive twice.
        """
        if (pause := self._nacks.pause()) is None:
            budget = self._nacks.budget
            self._fail(BrokerError(f"the broker refused every message for {budget:.0f} s; giving up"))
            return
        channel, self._channel = self._channel, None  # its confirms and close are ignored from now on
        again = self._outbox.requeue_in_flight()
        LOGGER.warning(
            "the broker refused %d message(s); publishing %d again on a new channel in %.1f s",
            refused,
            again,
            pause,
        )
        assert channel is not None and self._connection is not None
        channel.close()
        connection = self._connection
        connection.ioloop.call_later(pause, lambda: self._open_channel(connection))

    def _open_channel(self, connection: pika.SelectConnection) -> None:
        # As after a reconnection: confirms on, queues declared (pc passively), publish.
        if connection is self._connection and connection.is_open and self._failure is None:
            connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_closed(self, channel: Channel, reason: Exception) -> None:
        if channel is not self._channel:
            return  # one given up after a nack
        # A channel error will not go away by retrying.
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            if reason.reply_code == 406 and not self._declared:  # PRECONDITION_FAILED
                self._fail(BrokerError(inequivalent(reason.reply_text)))
            elif reason.reply_code == 404 and not self._declared:  # NOT_FOUND: the passive declare
                self._fail(BrokerError(f"queue {QUEUE!r} was deleted while we published to it"))
            else:
                self._fail(BrokerError(f"the broker closed the channel: {reason}"))

    def _fail(self, error: BrokerError) -> None:
        self._failure = self._failure or error
        assert self._connection is not None
        if self._connection.is_open:
            self._connection.close()
        elif self._connection.is_closed:
            self._connection.ioloop.stop()
        # else it is closing already: _on_connection_closed stops the loop.

    def _on_blocked(self, connection: pika.SelectConnection, frame: Method) -> None:
        self._blocked = True
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm); waiting up to %g s",
            frame.method.reason,
            connection.params.blocked_connection_timeout,
        )

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self._blocked = False
        LOGGER.info("the broker has unblocked this connection")

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        # No node was ever reachable: say why at once instead of retrying.
        self._failure = self._failure or self._nodes.failed(error)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout) and self._failure is None:
            timeout = connection.params.blocked_connection_timeout
            self._failure = BrokerError(
                f"the broker blocked this connection for {timeout:g} s (memory or disk alarm); giving up"
            )
        elif not self._outbox.done and self._failure is None:
            LOGGER.warning("connection closed: %s", reason)
        connection.ioloop.stop()  # back to run()

    # Reconnection ----------------------------------------------------------

    def run(self) -> None:
        """Connect and publish until every body is confirmed; on a lost connection, again."""
        self._nodes = Nodes(self._url, BLOCKED_FOR)
        outage = Patience(first=0.5, most=5.0, budget=RECONNECT_FOR)
        while not self._outbox.done:
            self._connect(self._nodes.next())
            assert self._connection is not None
            self._connection.ioloop.start()  # the callbacks run until one stops the loop
            if self._failure is not None:
                raise self._failure
            if self._outbox.done:
                return
            if not self._nodes.ever_connected:
                continue  # no node answered yet: try the next one at once
            # The connection dropped: everything unconfirmed goes round again.
            unconfirmed = self._outbox.requeue_in_flight()
            if self._nodes.opened:
                outage.reset()  # it was up for a while: a new outage gets its own time budget
            if (pause := outage.pause()) is None:
                url, budget = redact(self._url), RECONNECT_FOR
                raise BrokerError(f"lost {url} and could not reconnect within {budget:.0f} s")
            LOGGER.info("reconnecting in %.1f s; %d unconfirmed to publish again", pause, unconfirmed)
            time.sleep(pause)


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
    publisher = Publisher(url, bodies)
    started = time.perf_counter()
    try:
        publisher.run()
    except BrokerError as exc:
        print(f"producer: {exc} ({publisher.confirmed} of {len(bodies)} confirmed)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"producer: interrupted ({publisher.confirmed} of {len(bodies)} confirmed)", file=sys.stderr)
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
