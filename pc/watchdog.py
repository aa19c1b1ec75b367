"""Two timeouts for pc's publishers (producer.py, send_many.py), so that no wait lasts for ever.

RabbitMQ promises a confirm (or a return) for every message published in
confirm mode, and an answer to a connection.close. RabbitMQ 3.10, the version
these examples are tested on, sometimes keeps neither promise when the quorum
queue ``pc`` is deleted under a running publisher: it neither confirms nor
returns what was in flight, or it stops reading from the connection (flow
control: its own brake on a publisher, which, unlike an alarm, it does not
announce with connection.blocked), so that our close sits unread. Without
these timeouts the producer would wait as long as the broker does, for a
minute or for ever. With them:

- messages in flight and no confirm for CONFIRMS_DUE seconds: the publisher's
  ``on_silence``. producer.py closes the connection; Publisher.run then
  reconnects, and its passive declare finds the queue gone (one line, exit 1),
  or publishes the unconfirmed messages again. send_many.py stops: one line,
  exit 1;
- our close not answered within CLOSE_DUE seconds: drop the connection (stop
  its ioloop), and the publisher goes on as after any closed connection.

A client on a broker that keeps both promises never reaches either timeout.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import pika
from pika.frame import Method

LOGGER = logging.getLogger("pc.producer")

# RabbitMQ 3.10: seconds with messages in flight and no confirm; then reconnect, and so check that the
# queue is there (3.10 may stop answering a publisher whose quorum queue was deleted).
CONFIRMS_DUE = 10.0
# RabbitMQ 3.10: seconds the broker gets to answer our connection.close; then we drop the connection.
CLOSE_DUE = 10.0
TICK = 1.0  # how often the watchdog looks


class Watched(Protocol):
    """What the watchdog reads of the publisher, and what it calls."""

    confirmed: int  # how many messages the broker has confirmed so far

    @property
    def in_flight(self) -> int: ...

    def on_silence(self, why: str) -> None:
        """Messages in flight and no confirm for CONFIRMS_DUE seconds: ``why`` says so."""


class Watchdog:
    """Watches one connection, from its creation until it is closed, on its own ioloop."""

    def __init__(self, connection: pika.SelectConnection, publisher: Watched) -> None:
        self._connection = connection
        self._publisher = publisher
        self._confirmed = publisher.confirmed
        self._since = time.monotonic()  # of the last confirm, or of our close
        self._closing = False
        # Blocked by a memory or disk alarm, no confirm comes either: pika's blocked_connection_timeout
        # applies instead.
        self._blocked = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        connection.ioloop.call_later(TICK, self._look)

    def _on_blocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self._blocked = True

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: Method) -> None:
        self._blocked = False

    def _look(self) -> None:
        connection, publisher = self._connection, self._publisher
        if connection.is_closed:
            return  # this connection is over; the next one has a watchdog of its own
        now = time.monotonic()
        if connection.is_closing:
            if not self._closing:
                self._closing, self._since = True, now
            elif now - self._since >= CLOSE_DUE:
                LOGGER.debug("no answer to our close for %g s: dropping the connection", CLOSE_DUE)
                connection.ioloop.stop()  # back to the publisher's run()
                return
        elif connection.is_open:
            if publisher.confirmed != self._confirmed or publisher.in_flight == 0 or self._blocked:
                self._confirmed, self._since = publisher.confirmed, now
            elif now - self._since >= CONFIRMS_DUE:
                self._since = now  # once per silence
                publisher.on_silence(f"no confirm for {CONFIRMS_DUE:g} s")  # closes: the next look watches
        connection.ioloop.call_later(TICK, self._look)
