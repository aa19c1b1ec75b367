"""What pc/producer.py's ``Publisher`` calls when something goes wrong, and the detail of what it does then.

The story names each case where it happens, in one line, and calls one of
these; the line says whether it is RabbitMQ's contract, which any client must
handle, or a workaround for what RabbitMQ 3.10 does. Here:

RabbitMQ's contract
- the connection drops: reconnect with back-off, to each node in turn, and
  publish every unconfirmed message again (``Recovery.wait_to_reconnect``);
- a channel error, say a declaration refused: one line and exit 1 (``channel_error``);
- a nack: publish every unconfirmed message again; give up after NACKS_FOR
  seconds of nacks (``Recovery.on_nack``).

Workarounds for RabbitMQ 3.10
- a nack: publish again on a new channel, not the nacking one (before 3.12.5,
  harmless after): ``Recovery.new_channel``; what the channel given up still
  sends is dropped (``Recovery.confirms_while_open``, ``Recovery.unless_given_up``);
- no confirm at all, with messages in flight: reconnect (``Recovery.watch_confirms``).

The exit status's promise (what was confirmed is in ``pc``)
- after the first declare, ``pc`` is only checked, never created again
  (``Recovery.passive``, ``Recovery.declared``).

The broker blocking publishers, and no node answering at all, are in the story
itself (``_on_blocked``, ``_on_open_error``).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method

from pc.broker import BrokerError, redact
from pc.outbox import Nodes, Outbox, Patience
from pc.workqueue import QUEUE, inequivalent

LOGGER = logging.getLogger("pc.producer")

# After losing the broker mid-run, keep trying this long before giving up. Shorter
# than the consumer's 60 s: a consumer is a service that waits for work anyway,
# whereas someone (a person, a script) is waiting on the producer's exit status.
RECONNECT_FOR = 30.0
# Nacks with no ack in between for this long: give up.
NACKS_FOR = 30.0
# Seconds with messages in flight and no confirm: then reconnect, and so check that the queue is there.
CONFIRMS_DUE = 10.0


def channel_error(reason: pika.exceptions.ChannelClosedByBroker) -> BrokerError:
    """What to say when the broker closes the channel on an error: retrying the same command fails alike."""
    # PRECONDITION_FAILED, from a queue_declare with other arguments than the queue's.
    if reason.reply_code == 406 and "inequivalent arg" in reason.reply_text:
        return BrokerError(inequivalent(reason.reply_text))
    if reason.reply_code == 404:  # NOT_FOUND: the passive declare, the only command that can
        return BrokerError(f"queue {QUEUE!r} was deleted while we published to it")
    return BrokerError(f"the broker closed the channel: {reason}")


class Recovery:
    """The publisher's patience (after an outage, after nacks), and its RabbitMQ 3.10 workarounds."""

    def __init__(self, url: str, outbox: Outbox, nodes: Nodes) -> None:
        self._url = url
        self._outbox = outbox
        self._nodes = nodes
        self._outage = Patience(first=0.5, most=5.0, budget=RECONNECT_FOR)
        # After a nack, a new channel after 0.1 s, doubling to 2 s; NACKS_FOR of nacks with no ack: give up.
        self._nacks = Patience(first=0.1, most=2.0, budget=NACKS_FOR)
        self._confirmed_at_nack = 0  # an ack since the last nack ends a run of nacks (on_nack)
        self._blocked = False  # by a memory or disk alarm: the confirm watchdog leaves it alone
        self._given_up: weakref.WeakSet[Channel] = weakref.WeakSet()  # closed after a nack (new_channel)
        self._declared = False  # pc declared once (passive)

    # The connection drops (RabbitMQ's contract) ----------------------------

    def connected(self, connection: pika.SelectConnection, channel: Callable[[], Channel | None]) -> None:
        """A connection got through: a later loss starts a new outage; start the confirm watchdog.

        ``channel`` returns the publisher's channel of the moment, for the watchdog.
        """
        self._nodes.connected()
        # The confirm watchdog leaves a connection blocked by a memory or disk alarm alone:
        # Publisher._on_blocked says so, and pika's blocked_connection_timeout applies.
        self._blocked = False
        connection.add_on_connection_blocked_callback(lambda _c, _f: self._set_blocked(True))
        connection.add_on_connection_unblocked_callback(lambda _c, _f: self._set_blocked(False))
        self.watch_confirms(connection, channel, None, 0)

    def _set_blocked(self, blocked: bool) -> None:
        self._blocked = blocked

    def wait_to_reconnect(self) -> None:
        """The connection is lost: wait before reconnecting; BrokerError once RECONNECT_FOR is spent.

        Messages in flight when a connection drops may or may not have reached
        the queue, and no confirm will come for them now: publish them all
        again, so a consumer may see one twice but never miss one.
        """
        if not self._nodes.ever_connected:
            return  # no node answered yet: try the next one at once
        unconfirmed = self._outbox.requeue_in_flight()
        if self._nodes.opened:
            self._outage.reset()  # it was up for a while: a new outage gets its own time budget
        if (pause := self._outage.pause()) is None:
            url, budget = redact(self._url), RECONNECT_FOR
            raise BrokerError(f"lost {url} and could not reconnect within {budget:.0f} s")
        LOGGER.info("reconnecting in %.1f s; %d unconfirmed to publish again", pause, unconfirmed)
        time.sleep(pause)

    # A nack (RabbitMQ's contract) -------------------------------------------

    def on_nack(self, refused: int) -> float | None:
        """The broker refused ``refused`` messages: every unconfirmed one is to publish again.

        Returns how long to wait before publishing them; None once the broker
        has nacked, and not acked, for NACKS_FOR seconds. A nack means the
        broker did not take the message (a queue at its length limit, an
        internal error), though it may have after all, so it may arrive twice.
        """
        if self._outbox.confirmed != self._confirmed_at_nack:
            self._nacks.reset()  # an ack came since the last nack: a new run of nacks
        self._confirmed_at_nack = self._outbox.confirmed
        if (pause := self._nacks.pause()) is None:
            return None
        again = self._outbox.requeue_in_flight()
        LOGGER.warning(
            "the broker refused %d message(s); publishing %d again on a new channel in %.1f s",
            refused,
            again,
            pause,
        )
        return pause

    # After a nack, a new channel (RabbitMQ before 3.12.5) -------------------

    def new_channel(
        self,
        connection: pika.SelectConnection,
        channel: Channel,
        pause: float,
        on_open: Callable[[Channel], None],
    ) -> None:
        """Close ``channel``, and after ``pause`` open a new one on ``connection`` (``on_open`` as it opens).

        A RabbitMQ 3.10 workaround, harmless after 3.12.5, which fixed it: on a
        cluster, a channel opened just as a node died can keep pointing at the
        queue's dead leader, and nack everything published on it until that node
        is back. A new channel finds the new leader. What the old one still
        sends (confirms, its close) is dropped: see ``confirms_while_open``
        and ``unless_given_up``.
        """
        self._given_up.add(channel)
        channel.close()

        def reopen() -> None:
            if connection.is_open:  # not failed or lost meanwhile (then run() carries on)
                connection.channel(on_open_callback=on_open)

        connection.ioloop.call_later(pause, reopen)

    def confirms_while_open(
        self, channel: Channel, on_confirm: Callable[[Method], None]
    ) -> Callable[[Method], None]:
        """``on_confirm``, called only while ``channel`` is open: not once we are closing it.

        Confirms from a channel given up after a nack (``new_channel``) would
        settle by delivery tags that now name other messages. And once the
        publisher fails (at a basic.return, say) it closes the connection, and
        so the channel: the ack that follows a return means "dropped", not "queued".
        """

        def call(frame: Method) -> None:
            if channel.is_open:
                on_confirm(frame)

        return call

    def unless_given_up(
        self, channel: Channel, on_closed: Callable[[Channel, Exception], None]
    ) -> Callable[[Channel, Exception], None]:
        """``on_closed``, not called for a channel given up after a nack (``new_channel``)."""

        def call(closed: Channel, reason: Exception) -> None:
            if closed not in self._given_up:
                on_closed(closed, reason)

        return call

    # No confirm at all (RabbitMQ 3.10) -------------------------------------

    def watch_confirms(
        self,
        connection: pika.SelectConnection,
        current: Callable[[], Channel | None],
        channel: Channel | None,
        confirmed: int,
    ) -> None:
        """Every CONFIRMS_DUE seconds: if a channel had messages in flight and no confirm came, reconnect.

        A RabbitMQ 3.10 workaround: it neither confirms nor returns what was
        in flight to a quorum queue deleted under it, and stops answering on
        that connection: without this, we would wait for ever. A new connection
        declares the queue passively (``passive``), so a deleted queue ends in
        one line. ``current()`` is the publisher's channel now; ``channel`` and
        ``confirmed``: as they were CONFIRMS_DUE ago.
        """
        if not connection.is_open:
            return  # this connection is over (or failing): the next one is watched from its own open
        stuck = (
            channel is not None
            and channel is current()  # the same channel all along (not one opened after a nack)
            and channel not in self._given_up
            and self._outbox.confirmed == confirmed
            and self._outbox.in_flight > 0
        )
        if stuck and not self._blocked:  # blocked: see connected
            LOGGER.warning("no confirm for %g s; reconnecting to check on queue %r", CONFIRMS_DUE, QUEUE)
            connection.close()  # run() reconnects, and publishes the unconfirmed messages again
            # A broker that does not answer the close either: drop the connection (back to run()).
            connection.ioloop.call_later(CONFIRMS_DUE, connection.ioloop.stop)
            return
        channel, confirmed = current(), self._outbox.confirmed
        connection.ioloop.call_later(
            CONFIRMS_DUE, lambda: self.watch_confirms(connection, current, channel, confirmed)
        )

    # pc only checked after the first declare (the exit status's promise) ---

    @property
    def passive(self) -> bool:
        """True once pc has been declared: a new connection or channel only checks that it is there.

        Our exit status promises that what was confirmed is in pc; a pc deleted
        meanwhile took those messages with it, and creating it again would let
        us exit 0 anyway. Passive, the broker closes the channel (404) instead.
        """
        return self._declared

    def declared(self) -> None:
        """pc is declared: from now on ``passive``."""
        self._declared = True
