"""What goes wrong under pc/producer.py, and what it does then: the story is ``Publisher`` there.

``ReliablePublisher`` extends the story's methods, each calling the story's own
with super(). Each case says whether it is RabbitMQ's contract, which any client
must handle, or a workaround for what RabbitMQ 3.10 does:

- the connection drops (contract): reconnect with back-off, to each node in
  turn, and publish every unconfirmed message again (``run``, ``_after_loop``);
- a channel error, say a declaration refused (contract): one line and exit 1
  (``_on_channel_closed``);
- a nack (contract: publish again) on a new channel (a workaround for RabbitMQ
  before 3.12.5, harmless after): ``_on_nack``;
- no confirm at all (RabbitMQ 3.10 workaround): ``_watch_confirms``;
- the broker blocks publishers, short of memory or disk (contract): ``_on_blocked``;
- no node answers at all (contract): ``_on_open_error``.
"""

from __future__ import annotations

import logging
import time

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method

from pc.broker import BrokerError, redact
from pc.outbox import Nodes, Patience
from pc.producer import Publisher
from pc.workqueue import QUEUE, inequivalent

LOGGER = logging.getLogger("pc.producer")

# A broker short of memory or disk stops reading from publishers until it
# recovers; give up after this long, rather than wait silently for ever
# (``?blocked_connection_timeout=SECONDS`` in AMQP_URL overrides it).
BLOCKED_FOR = 60.0
# After losing the broker mid-run, keep trying this long before giving up. Shorter
# than the consumer's 60 s: a consumer is a service that waits for work anyway,
# whereas someone (a person, a script) is waiting on the producer's exit status.
RECONNECT_FOR = 30.0
# Seconds with messages in flight and no confirm: then reconnect, and so check that the queue is there.
CONFIRMS_DUE = 10.0


class ReliablePublisher(Publisher):
    """``Publisher``, the story, plus what it does when something goes wrong; ``run()`` as the story's."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        super().__init__(url, bodies)
        self._nodes: Nodes  # AMQP_URL's addresses (a cluster's nodes), in turn (run)
        self._outage = Patience(first=0.5, most=5.0, budget=RECONNECT_FOR)
        # After a nack, a new channel after 0.1 s, doubling to 2 s; 30 s of nacks with no ack: give up.
        self._nacks = Patience(first=0.1, most=2.0, budget=30.0)
        self._confirmed_at_nack = 0  # an ack since the last nack ends a run of nacks (_on_nack)
        self._blocked = False  # by a memory or disk alarm (_on_blocked)

    def run(self) -> None:
        """Connect and publish until every body is confirmed; on a lost connection, again."""
        self._nodes = Nodes(self._url, BLOCKED_FOR)
        while not self._outbox.done:
            self._connect(self._nodes.next())
            assert self._connection is not None
            self._connection.ioloop.start()
            self._after_loop()  # raise why it stopped, or wait before reconnecting

    def _connect(self, node: pika.URLParameters) -> None:
        """The story's connection, watched also for alarms, and for confirms that never come."""
        super()._connect(node)
        connection = self._connection
        assert connection is not None
        connection.add_on_open_callback(self._connected)
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)

    def _on_declared(self, frame: Method) -> None:
        # pc declared once: from now on, on a new connection or channel, only check that it is there.
        self.passive = True
        super()._on_declared(frame)

    # The connection drops (RabbitMQ's contract) ----------------------------

    def _connected(self, connection: pika.SelectConnection) -> None:
        """A connection got through: a later loss starts a new outage, and it is not blocked (yet)."""
        self._nodes.connected()
        self._blocked = False
        self._watch_confirms(connection, None, 0)

    def _after_loop(self) -> None:
        """The ioloop has stopped: raise why, return if done, else wait before reconnecting.

        Messages in flight when a connection drops may or may not have reached
        the queue, and no confirm will come for them now: publish them all
        again, so a consumer may see one twice but never miss one.
        """
        if self._failure is not None:
            raise self._failure
        if self._outbox.done or not self._nodes.ever_connected:
            return  # all confirmed; or no node answered yet: try the next one at once
        unconfirmed = self._outbox.requeue_in_flight()
        if self._nodes.opened:
            self._outage.reset()  # it was up for a while: a new outage gets its own time budget
        if (pause := self._outage.pause()) is None:
            url, budget = redact(self._url), RECONNECT_FOR
            raise BrokerError(f"lost {url} and could not reconnect within {budget:.0f} s")
        LOGGER.info("reconnecting in %.1f s; %d unconfirmed to publish again", pause, unconfirmed)
        time.sleep(pause)

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
        super()._on_connection_closed(connection, reason)  # a warning if not failed, and back to run()

    # A channel error (RabbitMQ's contract) ---------------------------------

    def _on_channel_closed(self, channel: Channel, reason: Exception) -> None:
        """The broker closes a channel on an error in a command: retrying the same command fails alike."""
        if channel is not self._channel:
            return  # one given up after a nack
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            # PRECONDITION_FAILED, from a queue_declare with other arguments than the queue's.
            if reason.reply_code == 406 and "inequivalent arg" in reason.reply_text:
                self._fail(BrokerError(inequivalent(reason.reply_text)))
            elif reason.reply_code == 404:  # NOT_FOUND: the passive declare, the only command that can
                self._fail(BrokerError(f"queue {QUEUE!r} was deleted while we published to it"))
        super()._on_channel_closed(channel, reason)  # any other: the broker's reason (the first failure wins)

    def _fail(self, error: BrokerError) -> None:
        """The story's, and stop the loop if the connection is closed already (it may be, between two)."""
        super()._fail(error)
        assert self._connection is not None
        if self._connection.is_closed:
            self._connection.ioloop.stop()
        # else it is closing: _on_connection_closed stops the loop.

    # A nack (RabbitMQ's contract), on a new channel (before 3.12.5) --------

    def _on_confirm(self, frame: Method) -> None:
        channel = self._channel  # None, or a new one, once a nack has given up the channel
        if channel is None or frame.channel_number != channel.channel_number:
            return  # from a channel given up after a nack: its tag would name the wrong message
        super()._on_confirm(frame)

    def _on_nack(self, refused: int) -> None:
        """The broker refused ``refused`` messages: publish every unconfirmed one again on a new channel.

        A nack means the broker did not take the message (a queue at its length
        limit, an internal error): publishing it again is the contract. Not on
        the same channel, though: on a RabbitMQ 3.10 cluster, a channel opened
        just as a node died can keep pointing at the queue's dead leader, and
        nack everything published on it until that node is back (fixed in
        3.12.5). A new channel finds the new leader; confirms still on their
        way from the old one are ignored (_on_confirm). A message nacked may
        have been taken after all, so it may arrive twice.
        """
        if self._outbox.confirmed != self._confirmed_at_nack:
            self._nacks.reset()  # an ack came since the last nack: a new run of nacks
        self._confirmed_at_nack = self._outbox.confirmed
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

    # No confirm at all (RabbitMQ 3.10) -------------------------------------

    def _watch_confirms(
        self, connection: pika.SelectConnection, channel: Channel | None, confirmed: int
    ) -> None:
        """Every CONFIRMS_DUE seconds: if a channel had messages in flight and no confirm came, reconnect.

        A RabbitMQ 3.10 workaround: it neither confirms nor returns what was
        in flight to a quorum queue deleted under it, and stops answering on
        that connection: without this, we would wait for ever. A new connection
        declares the queue passively (_on_channel_open), so a deleted queue ends
        in one line. ``channel`` and ``confirmed``: as they were CONFIRMS_DUE ago.
        """
        if connection is not self._connection or not connection.is_open or self._failure:
            return  # this connection is over: the next one is watched from its own open
        stuck = (
            channel is not None
            and channel is self._channel  # the same channel all along (not one opened after a nack)
            and self._outbox.confirmed == confirmed
            and self._outbox.in_flight > 0
        )
        if stuck and not self._blocked:  # blocked: _on_blocked said so, and its timeout applies
            LOGGER.warning("no confirm for %g s; reconnecting to check on queue %r", CONFIRMS_DUE, QUEUE)
            connection.close()  # run() reconnects, and publishes the unconfirmed messages again
            # A broker that does not answer the close either: drop the connection (back to run()).
            connection.ioloop.call_later(CONFIRMS_DUE, connection.ioloop.stop)
            return
        channel, confirmed = self._channel, self._outbox.confirmed
        connection.ioloop.call_later(
            CONFIRMS_DUE, lambda: self._watch_confirms(connection, channel, confirmed)
        )

    # The broker blocks publishers (RabbitMQ's contract) ---------------------

    def _on_blocked(self, connection: pika.SelectConnection, frame: Method) -> None:
        """A memory or disk alarm: the broker stops reading from us; pika gives up after the timeout."""
        self._blocked = True
        LOGGER.warning(
            "the broker has blocked this connection: %s (memory or disk alarm); waiting up to %g s",
            frame.method.reason,
            connection.params.blocked_connection_timeout,
        )

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self._blocked = False
        LOGGER.info("the broker has unblocked this connection")
