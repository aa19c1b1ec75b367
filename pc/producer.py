"""Publish messages to the durable queue ``pc`` and wait for the broker's confirms.

Pairs with pc/consumer.py; run it before or after the consumer, as often as
you like: the queue keeps the messages until a consumer takes them.

    python pc/producer.py my awesome message     # one message
    python pc/producer.py --count 10000 batch    # 'batch 1' .. 'batch 10000'

Guarantee: exit status 0 means the broker has taken every message into the
durable queue as a persistent message (publisher confirms), so it survives a
broker restart. If the connection drops, the unconfirmed messages are
published again on the next one, and the messages the broker refuses (nacks)
on a new channel: a consumer may see one twice, never miss one. Anything else
ends in exit status 1 with the reason: a message the broker returns (no queue
``pc`` to take it), nacks that go on for NACKED_FOR seconds, or a broker that
blocks the connection (memory or disk alarm) for longer than BLOCKED_FOR
seconds (``?blocked_connection_timeout=`` in AMQP_URL overrides it).

Why SelectConnection (callbacks) rather than BlockingConnection: confirms are
pipelined. Up to WINDOW messages are in flight at once and each confirm that
comes back lets another one go, rather than one network round trip per
message (pc/send_one.py shows that simpler way, for one message). The
callbacks below run in the order things happen: connection open -> channel
open -> confirms on -> queues declared -> publish -> confirm.

Messages are plain UTF-8 text (content type ``text/plain``), readable by any
client in any language.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method

from pc.broker import BrokerError, explain, parameters, redact, resolve
from pc.workqueue import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    QUEUE,
    QUEUE_ARGUMENTS,
    inequivalent,
)

LOGGER = logging.getLogger("pc.producer")

# Persistent: written to disk, so it survives a broker restart.
PROPERTIES = pika.BasicProperties(content_type="text/plain", delivery_mode=pika.DeliveryMode.Persistent)
# Unconfirmed messages allowed in flight; bounds memory on both sides, and
# what goes round again after a reconnect. The broker confirms persistent
# messages once they are on disk, in batches: a window of a few thousand keeps
# us publishing while it writes.
WINDOW = 5000
# A broker short of memory or disk stops reading from publishers until it
# recovers; give up after this long, rather than wait silently for ever.
BLOCKED_FOR = 60.0
# After losing the broker mid-run, keep trying this long before giving up.
RECONNECT_FOR = 30.0
MAX_BACKOFF = 5.0
# After a nack, publish again on a new channel after NACK_BACKOFF seconds,
# doubled each time up to MAX_NACK_BACKOFF; give up after NACKED_FOR seconds
# of nacks with no ack in between.
NACK_BACKOFF = 0.1
MAX_NACK_BACKOFF = 2.0
NACKED_FOR = 30.0


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
        self._outbox = Outbox(bodies)  # what to publish, what is in flight, how many confirmed
        self._state = State()  # how the connection attempts went, and what went wrong

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
        self._state.connected()
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
        self._state.declared = False
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
        # whichever starts first creates it. After a reconnection, only check
        # that it is still there (passive): if it was deleted, so were the
        # messages confirmed into it, and creating it again would hide that.
        self._channel.queue_declare(
            QUEUE,
            durable=True,
            arguments=QUEUE_ARGUMENTS,
            passive=self._state.ever_declared,
            callback=self._on_declared,
        )

    def _on_declared(self, _frame: Method) -> None:
        self._state.declared = self._state.ever_declared = True
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
        if self._state.failure is not None:
            return  # e.g. the ack that follows a returned message (_on_returned): we are closing
        if self._channel is None or frame.channel_number != self._channel.channel_number:
            return  # from a channel given up after a nack: its messages are to be published again
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            # The broker refused them: publish them again, on a new channel (_on_nack).
            self._on_nack(self._outbox.covered(method.delivery_tag, method.multiple))
            return
        # One confirm may cover many messages: every tag up to this one (multiple).
        count = self._outbox.settle(method.delivery_tag, method.multiple)
        self._state.acked()
        self._outbox.confirmed += count
        if self._outbox.done:
            assert self._connection is not None
            self._connection.close()  # all confirmed: run() returns
        else:
            self._publish()  # room in the window: send the next ones

    def _on_returned(self, _channel: Channel, _method: object, _props: object, _body: bytes) -> None:
        # For a mandatory message it cannot route, the broker sends basic.return
        # first and then basic.ack: the ack only means "dealt with" (dropped).
        # So fail here, at the return, and _on_confirm ignores the ack after it.
        self._fail(BrokerError(f"the broker could not route a message to queue {QUEUE!r}"))

    # What goes wrong -------------------------------------------------------

    def _on_nack(self, refused: int) -> None:
        """The broker refused ``refused`` messages: publish every unconfirmed one again on a new channel.

        Not on the same channel: on a RabbitMQ 3.10 cluster, a channel opened
        just as a node died can keep pointing at the queue's dead leader, and
        nack everything published on it until that node is back. A new channel
        finds the new leader. A message nacked may have been taken after all,
        so it may arrive twice.
        """
        state = self._state
        now = time.monotonic()
        state.nacked_since = state.nacked_since if state.nacked_since is not None else now
        if now - state.nacked_since >= NACKED_FOR:
            self._fail(BrokerError(f"the broker refused every message for {NACKED_FOR:.0f} s; giving up"))
            return
        channel, self._channel = self._channel, None  # its confirms and close are ignored from now on
        again = self._outbox.requeue_in_flight()
        LOGGER.warning(
            "the broker refused %d message(s); publishing %d again on a new channel in %.1f s",
            refused,
            again,
            state.nack_backoff,
        )
        assert channel is not None and self._connection is not None
        channel.close()
        connection = self._connection
        connection.ioloop.call_later(state.nack_backoff, lambda: self._open_channel(connection))
        state.nack_backoff = min(state.nack_backoff * 2, MAX_NACK_BACKOFF)

    def _open_channel(self, connection: pika.SelectConnection) -> None:
        # As after a reconnection: confirms on, queues declared (pc passively), publish.
        if connection is self._connection and connection.is_open and self._state.failure is None:
            connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_closed(self, channel: Channel, reason: Exception) -> None:
        if channel is not self._channel:
            return  # one given up after a nack
        # A channel error will not go away by retrying.
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            if reason.reply_code == 406 and not self._state.declared:  # PRECONDITION_FAILED
                self._fail(BrokerError(inequivalent(reason.reply_text)))
            elif reason.reply_code == 404 and not self._state.declared:  # NOT_FOUND, on reconnecting
                self._fail(BrokerError(f"queue {QUEUE!r} was deleted while we published to it"))
            else:
                self._fail(BrokerError(f"the broker closed the channel: {reason}"))

    def _fail(self, error: BrokerError) -> None:
        if self._state.failure is None:
            self._state.failure = error
        assert self._connection is not None
        if self._connection.is_open:
            self._connection.close()
        elif self._connection.is_closed:
            self._connection.ioloop.stop()
        # else it is closing already: _on_connection_closed stops the loop.

    def _on_blocked(self, connection: pika.SelectConnection, frame: Method) -> None:
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm); waiting up to %g s",
            frame.method.reason,
            connection.params.blocked_connection_timeout,
        )

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        LOGGER.info("the broker has unblocked this connection")

    def _on_open_error(self, connection: pika.SelectConnection, error: BaseException) -> None:
        state = self._state
        state.attempts.append(error)
        if not state.ever_connected and len(state.attempts) == len(state.nodes):
            # No node was ever reachable: say why at once instead of retrying.
            state.failure = explain(self._url, *state.attempts)
        connection.ioloop.stop()

    def _on_connection_closed(self, connection: pika.SelectConnection, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ConnectionBlockedTimeout) and self._state.failure is None:
            timeout = connection.params.blocked_connection_timeout
            self._state.failure = BrokerError(
                f"the broker blocked this connection for {timeout:g} s (memory or disk alarm); giving up"
            )
        elif not self._outbox.done and self._state.failure is None:
            LOGGER.warning("connection closed: %s", reason)
        connection.ioloop.stop()  # back to run()

    # Reconnection ----------------------------------------------------------

    def run(self) -> None:
        """Connect and publish until every body is confirmed; on a lost connection, again."""
        state = self._state
        lost_since: float | None = None
        backoff = 0.5
        state.nodes = parameters(self._url)
        for node in state.nodes:
            if node.blocked_connection_timeout is None:  # not set in the URL
                node.blocked_connection_timeout = BLOCKED_FOR
        while not self._outbox.done:
            state.opened = False
            state.nodes.append(state.nodes.pop(0))  # try the next node (the first, the first time)
            self._connect(state.nodes[-1])
            assert self._connection is not None
            self._connection.ioloop.start()  # the callbacks run until one stops the loop
            if state.failure is not None:
                raise state.failure
            if self._outbox.done:
                return
            if not state.ever_connected:
                continue  # no node answered yet: try the next one at once
            # The connection dropped: everything unconfirmed goes round again.
            unconfirmed = self._outbox.requeue_in_flight()
            now = time.monotonic()
            if state.opened:
                # It was up for a while: a new outage gets its own time budget.
                lost_since, backoff = now, 0.5
            lost_since = lost_since if lost_since is not None else now
            if now - lost_since > RECONNECT_FOR:
                raise BrokerError(
                    f"lost {redact(self._url)} and could not reconnect within {RECONNECT_FOR:.0f} s"
                )
            LOGGER.info("reconnecting in %.1f s; %d unconfirmed to publish again", backoff, unconfirmed)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


# Bookkeeping -----------------------------------------------------------------


class Outbox:
    """The messages to publish, and where each stands: to send, in flight (not confirmed yet), confirmed."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.confirmed = 0
        self._todo = list(range(len(bodies)))[::-1]  # a stack: next index at the end
        self._in_flight: dict[int, int] = {}  # delivery tag -> body index
        self._next_tag = 1  # the broker numbers a channel's messages 1, 2, 3... for its confirms

    @property
    def done(self) -> bool:
        """Has every message been confirmed?"""
        return self.confirmed == len(self.bodies)

    def new_channel(self) -> None:
        """A new channel numbers its messages from 1 again."""
        self._next_tag = 1

    def next_body(self) -> bytes | None:
        """The next body to publish, noted as in flight; None if none is left or WINDOW are in flight."""
        if not self._todo or len(self._in_flight) >= WINDOW:
            return None
        index = self._todo.pop()
        self._in_flight[self._next_tag] = index
        self._next_tag += 1
        return self.bodies[index]

    def covered(self, delivery_tag: int, multiple: bool) -> int:
        """How many messages in flight a confirm (or nack) covers."""
        return sum(1 for tag in self._in_flight if tag <= delivery_tag) if multiple else 1

    def settle(self, delivery_tag: int, multiple: bool) -> int:
        """Take the messages a confirm covers out of the window; return how many."""
        tags = [tag for tag in self._in_flight if tag <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            del self._in_flight[tag]
        return len(tags)

    def requeue_in_flight(self) -> int:
        """Put every unconfirmed message back to be sent first, in order; return how many."""
        count = len(self._in_flight)
        self._todo.extend(sorted(self._in_flight.values(), reverse=True))
        self._in_flight.clear()
        return count


@dataclass
class State:
    """How the connection attempts went: what run() and the callbacks decide by."""

    nodes: list[pika.URLParameters] = field(default_factory=list)  # each attempt tries the next
    attempts: list[BaseException] = field(default_factory=list)  # why each node failed, until one answers
    ever_connected: bool = False
    opened: bool = False  # did the latest connection attempt get through?
    declared: bool = False  # on this connection
    ever_declared: bool = False
    nacked_since: float | None = None  # when the broker began to nack, with no ack since
    nack_backoff: float = NACK_BACKOFF  # the pause before the next new channel after a nack
    failure: BrokerError | None = None  # set: stop, and run() raises it

    def connected(self) -> None:
        self.ever_connected = self.opened = True

    def acked(self) -> None:
        self.nacked_since, self.nack_backoff = None, NACK_BACKOFF


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
