"""pc/producer.py's patience: how long to wait before it starts over, and when to give up.

RabbitMQ's contract, which any publisher must keep: what the broker has not
confirmed may not be in the queue, so after a lost connection or a nack it is
published again. Publisher.run does that by starting over on a new connection;
``Recovery`` says when: after a pause that grows, to each node in turn, and
never for longer than a time budget, after which one line says why. None of
this talks to the broker: every pika call is in pc/producer.py (and the two
timeouts in pc/watchdog.py).
"""

from __future__ import annotations

import logging
import time

import pika
import pika.exceptions

from pc.broker import BrokerError, explain, parameters, redact
from pc.workqueue import QUEUE, inequivalent

LOGGER = logging.getLogger("pc.producer")

# After losing the broker mid-run, keep trying this long before giving up. Shorter
# than the consumer's 60 s: a consumer is a service that waits for work anyway,
# whereas someone (a person, a script) is waiting on the producer's exit status.
RECONNECT_FOR = 30.0
# Nacks with no ack in between for this long: give up.
NACKS_FOR = 30.0


class Recovery:
    """When to start over: after an outage, and after nacks."""

    def __init__(self, url: str, nodes: Nodes) -> None:
        self._url = url
        self._nodes = nodes
        self._outage = Patience(first=0.5, most=5.0, budget=RECONNECT_FOR)
        # After a nack, reconnect after 0.1 s, doubling to 2 s; NACKS_FOR of nacks with no ack: give up.
        self._nacks = Patience(first=0.1, most=2.0, budget=NACKS_FOR)
        self._confirmed_at_nack = 0  # an ack since the last nack ends a run of nacks (on_nack)
        self._after_nack: float | None = None  # set by a nack: the pause before the next connection

    def connected(self) -> None:
        """A connection got through: a later loss starts a new outage."""
        self._nodes.connected()
        self._after_nack = None

    def wait_to_reconnect(self, unconfirmed: int) -> None:
        """The connection is gone: wait before the next; BrokerError once RECONNECT_FOR is spent.

        ``unconfirmed`` messages were in flight: they may or may not have
        reached the queue, and no confirm will come for them now, so they are
        published again: a consumer may see one twice but never miss one.
        """
        if not self._nodes.ever_connected:
            return  # no node answered yet: try the next one at once
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

    def on_nack(self, refused: int, confirmed: int) -> bool:
        """The broker refused ``refused`` messages: True to start over, False to give up.

        Start over after a pause, from 0.1 s doubling to 2 s (wait_to_reconnect
        sleeps it); give up once the broker has nacked, and not acked, for
        NACKS_FOR seconds. ``confirmed``: how many it has confirmed so far.

        Why a new connection, not the same channel: it is the same rule as after
        a lost connection, and on a RabbitMQ 3.10 cluster a channel opened just as
        a node died can keep pointing at the queue's dead leader and nack
        everything published on it until that node is back (fixed in 3.12.5); a
        new channel finds the new leader. A message nacked may have been taken
        after all, so it may arrive twice; so may one whose ack was on its way
        when we closed.
        """
        if self._after_nack is not None:
            return True  # closing already: nacks come in batches
        if confirmed != self._confirmed_at_nack:
            self._nacks.reset()  # an ack came since the last nack: a new run of nacks
        self._confirmed_at_nack = confirmed
        if (pause := self._nacks.pause()) is None:
            return False
        LOGGER.warning(
            "the broker refused %d message(s); reconnecting in %.1f s to publish the unconfirmed again",
            refused,
            pause,
        )
        self._after_nack = pause
        return True


def channel_error(reason: pika.exceptions.ChannelClosedByBroker) -> BrokerError:
    """What to say when the broker closes the channel on an error: retrying the same command fails alike."""
    # PRECONDITION_FAILED, from a queue_declare with other arguments than the queue's.
    if reason.reply_code == 406 and "inequivalent arg" in reason.reply_text:
        return BrokerError(inequivalent(reason.reply_text))
    if reason.reply_code == 404:  # NOT_FOUND: the passive declare, the only command that can
        return BrokerError(f"queue {QUEUE!r} was deleted while we published to it")
    return BrokerError(f"the broker closed the channel: {reason}")


class Patience:
    """Retry after a pause doubling from ``first`` to ``most`` seconds, for ``budget`` seconds of trouble."""

    def __init__(self, first: float, most: float, budget: float) -> None:
        self.first, self.most, self.budget = first, most, budget
        self._since: float | None = None  # when the trouble began
        self._pause = first

    def reset(self) -> None:
        """The trouble is over: the next one gets the whole budget, and the shortest pause, again."""
        self._since, self._pause = None, self.first

    def pause(self) -> float | None:
        """How long to wait before the next try; None once the budget is spent."""
        now = time.monotonic()
        self._since = self._since if self._since is not None else now
        if now - self._since >= self.budget:
            return None
        pause, self._pause = self._pause, min(self._pause * 2, self.most)
        return pause


class Nodes:
    """The broker addresses in AMQP_URL, tried in turn, and why each failed until one answered."""

    def __init__(self, url: str, blocked_for: float) -> None:
        self._url = url
        self._nodes = parameters(url)
        for node in self._nodes:
            if node.blocked_connection_timeout is None:  # not set in the URL
                node.blocked_connection_timeout = blocked_for
        self._failures: list[BaseException] = []
        self.ever_connected = False
        self.opened = False  # did the latest attempt get through?

    def next(self) -> pika.URLParameters:
        """The node to try now: the first, the first time, then each in turn."""
        self._nodes.append(self._nodes.pop(0))
        self.opened = False
        return self._nodes[-1]

    def connected(self) -> None:
        self.ever_connected = self.opened = True

    def failed(self, error: BaseException) -> BrokerError | None:
        """Note why a node did not answer; once every node has failed and none ever answered, why not."""
        self._failures.append(error)
        if not self.ever_connected and len(self._failures) == len(self._nodes):
            return explain(self._url, *self._failures)
        return None
