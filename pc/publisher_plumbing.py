"""What pc/producer.py's ``Publisher`` calls when something goes wrong, and the detail of what it does then.

The story names each case where it happens, in one line, and calls one of
these. Each says whether it is RabbitMQ's contract, which any client must
handle, or a workaround for what RabbitMQ 3.10 does:

- the connection drops (contract): reconnect with back-off, to each node in
  turn, and publish every unconfirmed message again (``Recovery.wait_to_reconnect``);
- a channel error, say a declaration refused (contract): one line and exit 1
  (``channel_error``);
- a nack (contract: publish again): start over on a new connection, like after
  a lost one, after a pause; give up after NACKS_FOR of nothing but nacks
  (``Recovery.on_nack``);
- no confirm at all (RabbitMQ 3.10 workaround): ``Recovery.watch_confirms``;
- our own close never answered (RabbitMQ 3.10 workaround): ``close_connection``.

The broker blocking publishers, and no node answering at all, are in the story
itself (``_on_blocked``, ``_on_open_error``).
"""

from __future__ import annotations

import logging
import time

import pika
import pika.exceptions

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
# Seconds the broker gets to answer our connection.close; then we drop the connection.
CLOSE_DUE = 10.0


def channel_error(reason: pika.exceptions.ChannelClosedByBroker) -> BrokerError:
    """What to say when the broker closes the channel on an error: retrying the same command fails alike."""
    # PRECONDITION_FAILED, from a queue_declare with other arguments than the queue's.
    if reason.reply_code == 406 and "inequivalent arg" in reason.reply_text:
        return BrokerError(inequivalent(reason.reply_text))
    if reason.reply_code == 404:  # NOT_FOUND: the passive declare, the only command that can
        return BrokerError(f"queue {QUEUE!r} was deleted while we published to it")
    return BrokerError(f"the broker closed the channel: {reason}")


def close_connection(connection: pika.SelectConnection) -> None:
    """Close ``connection``, or drop it if the broker has not answered within CLOSE_DUE: stop its ioloop.

    A RabbitMQ 3.10 workaround: with messages in flight to a quorum queue
    deleted under it, the broker may stop reading from the connection (flow
    control: the broker's own brake on a publisher it cannot keep up with; unlike
    an alarm, it sends no connection.blocked; rabbitmqctl shows the connection
    "blocked", here for a minute or more), sometimes
    just after returning a few messages. Our close then sits unread, and
    without this we would wait as long. run() goes on as after any closed
    connection: it raises the failure that made us close, or reconnects.
    """
    connection.close()  # answered: Publisher._on_connection_closed stops the ioloop
    connection.ioloop.call_later(CLOSE_DUE, connection.ioloop.stop)


class Recovery:
    """The publisher's patience: after an outage, after nacks, and with confirms that never come."""

    def __init__(self, url: str, outbox: Outbox, nodes: Nodes) -> None:
        self._url = url
        self._outbox = outbox
        self._nodes = nodes
        self._outage = Patience(first=0.5, most=5.0, budget=RECONNECT_FOR)
        # After a nack, reconnect after 0.1 s, doubling to 2 s; NACKS_FOR of nacks with no ack: give up.
        self._nacks = Patience(first=0.1, most=2.0, budget=NACKS_FOR)
        self._confirmed_at_nack = 0  # an ack since the last nack ends a run of nacks (on_nack)
        self._after_nack: float | None = None  # set by a nack: the pause before the next connection
        self.blocked = False  # by a memory or disk alarm (Publisher._on_blocked)

    # The connection drops (RabbitMQ's contract) ----------------------------

    def connected(self, connection: pika.SelectConnection) -> None:
        """A connection got through: a later loss starts a new outage, and it is not blocked (yet).

        Also starts the confirm watchdog on it (watch_confirms, a RabbitMQ 3.10 workaround).
        """
        self._nodes.connected()
        self.blocked = False
        self._after_nack = None
        self.watch_confirms(connection, self._outbox.confirmed)

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
        if self._after_nack is not None:  # we closed it after a nack: on_nack said so
            pause, self._after_nack = self._after_nack, None  # once: a failed reconnect is an outage
            time.sleep(pause)
            return
        if (pause := self._outage.pause()) is None:
            url, budget = redact(self._url), RECONNECT_FOR
            raise BrokerError(f"lost {url} and could not reconnect within {budget:.0f} s")
        LOGGER.info("reconnecting in %.1f s; %d unconfirmed to publish again", pause, unconfirmed)
        time.sleep(pause)

    # A nack (RabbitMQ's contract): start over --------------------------------

    def on_nack(self, refused: int) -> bool:
        """The broker refused ``refused`` messages: close, and publish every unconfirmed one again.

        Returns True if the publisher is to close the connection and reconnect
        (after a pause, from 0.1 s doubling to 2 s; wait_to_reconnect sleeps
        it); False once the broker has nacked, and not acked, for NACKS_FOR
        seconds: give up.

        A nack means the broker did not take the message (a queue at its length
        limit, an internal error): publishing it again is the contract. We do it
        as after a lost connection, on a new connection and so a new channel: on
        a RabbitMQ 3.10 cluster, a channel opened just as a node died can keep
        pointing at the queue's dead leader, and nack everything published on it
        until that node is back (fixed in 3.12.5); a new channel finds the new
        leader. A message nacked may have been taken after all, so it may arrive
        twice; so may one whose ack was on its way when we closed.
        """
        if self._after_nack is not None:
            return True  # closing already: nacks come in batches
        if self._outbox.confirmed != self._confirmed_at_nack:
            self._nacks.reset()  # an ack came since the last nack: a new run of nacks
        self._confirmed_at_nack = self._outbox.confirmed
        if (pause := self._nacks.pause()) is None:
            return False
        LOGGER.warning(
            "the broker refused %d message(s); reconnecting in %.1f s to publish the unconfirmed again",
            refused,
            pause,
        )
        self._after_nack = pause
        return True

    # No confirm at all (RabbitMQ 3.10) -------------------------------------

    def watch_confirms(self, connection: pika.SelectConnection, confirmed: int) -> None:
        """Every CONFIRMS_DUE seconds: if messages are in flight and no confirm came, reconnect.

        A RabbitMQ 3.10 workaround: it neither confirms nor returns what was
        in flight to a quorum queue deleted under it, and stops answering on
        that connection: without this, we would wait for ever. A new connection
        declares the queue passively (Publisher._on_channel_open), so a deleted
        queue ends in one line. ``confirmed``: the count CONFIRMS_DUE ago.
        """
        if not connection.is_open:
            return  # this connection is over (or closing): the next one is watched from its own open
        stuck = self._outbox.confirmed == confirmed and self._outbox.in_flight > 0
        if stuck and not self.blocked:  # blocked: Publisher._on_blocked said so, and its timeout applies
            LOGGER.warning("no confirm for %g s; reconnecting to check on queue %r", CONFIRMS_DUE, QUEUE)
            close_connection(connection)  # run() reconnects, and publishes the unconfirmed messages again
            return
        confirmed = self._outbox.confirmed
        connection.ioloop.call_later(CONFIRMS_DUE, lambda: self.watch_confirms(connection, confirmed))
