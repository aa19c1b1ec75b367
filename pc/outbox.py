"""pc/producer.py's bookkeeping, out of its story: what is in flight, which node is next, how long to wait.

None of this talks to the broker: every pika call is in pc/producer.py or pc/publisher_plumbing.py.
"""

from __future__ import annotations

import time

import pika

from pc.broker import BrokerError, explain, parameters


class Outbox:
    """The messages to publish, and where each stands: to send, in flight (not confirmed yet), confirmed.

    The broker numbers the messages of a channel in confirm mode 1, 2, 3... as
    they are published, and its confirms name those numbers (delivery tags).
    """

    def __init__(self, bodies: list[bytes], window: int) -> None:
        self.bodies = bodies
        self.window = window  # at most this many in flight
        self.confirmed = 0
        self._todo = list(range(len(bodies)))[::-1]  # a stack: next index at the end
        self._in_flight: dict[int, int] = {}  # delivery tag -> body index
        self._next_tag = 1

    @property
    def done(self) -> bool:
        """Has every message been confirmed?"""
        return self.confirmed == len(self.bodies)

    @property
    def in_flight(self) -> int:
        """How many messages are published but not confirmed yet."""
        return len(self._in_flight)

    def new_channel(self) -> None:
        """A new channel numbers its messages from 1 again."""
        self._next_tag = 1

    def next_body(self) -> bytes | None:
        """The next body to publish, noted as in flight; None if none is left or the window is full."""
        if not self._todo or len(self._in_flight) >= self.window:
            return None
        index = self._todo.pop()
        self._in_flight[self._next_tag] = index
        self._next_tag += 1
        return self.bodies[index]

    def covered(self, delivery_tag: int, multiple: bool) -> int:
        """How many messages in flight a confirm (or nack) covers."""
        return sum(1 for tag in self._in_flight if tag <= delivery_tag) if multiple else 1

    def settle(self, delivery_tag: int, multiple: bool) -> int:
        """The broker has confirmed these: take them out of the window, count them; return how many."""
        tags = [tag for tag in self._in_flight if tag <= delivery_tag] if multiple else [delivery_tag]
        for tag in tags:
            del self._in_flight[tag]
        self.confirmed += len(tags)
        return len(tags)

    def requeue_in_flight(self) -> int:
        """Put every unconfirmed message back to be sent first, in order; return how many."""
        count = len(self._in_flight)
        self._todo.extend(sorted(self._in_flight.values(), reverse=True))
        self._in_flight.clear()
        return count


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
