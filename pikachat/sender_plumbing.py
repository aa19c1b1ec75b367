"""The sender's plumbing: keeping a channel to publish on, whatever the broker does.

send.py tells the story: open_channel, the loop over the lines typed, the
publish, and what each answer from the broker means for the line. This is the
rest, which a learner may skip:

- ``publishing``, the one line around send.py's publish: it gives the open
  channel, and turns what is no answer from the broker into one exception
  each: reconnecting failed or a second Ctrl-C (NotSentError, the line is
  reported), blocked past the timeout (BlockedTooLongError, the sender stops);
- reconnecting after a lost broker: before the next line (``reopen_if_lost``),
  or while idle, with capped back-off and jitter (``keep_alive``);
- serving the connection while idle, so that heartbeats are answered and a
  lost broker is noticed before a line is lost with it;
- a broker that blocks publishers (memory or disk alarm): saying so at once
  (``watch_blocked``), and a timeout after which the publish gives up
  (``with_blocked_timeout``);
- Ctrl-C: the first finishes the line in hand, the second stops at once
  (``stop_on_signals``, the ``busy`` flag, and ``abandon``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator

import pika
import pika.exceptions
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel

from pikachat.broker import BrokerError, Connection, addresses, close_quietly, redact
from pikachat.cli import Lines

LOGGER = logging.getLogger(__name__)

# After losing the broker, wait this long before reconnecting, doubling up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0
# How long a publish may stay blocked by the broker (memory or disk alarm)
# before the sender gives up, unless the URL sets blocked_connection_timeout.
BLOCKED_TIMEOUT = 60

OpenChannel = Callable[[str], tuple[Connection, BlockingChannel]]


class BlockedTooLongError(Exception):
    """The broker blocked a line past the timeout: sending more would only block again."""


class NotSentError(Exception):
    """The line was not sent, or not known to be, for a reason other than an answer from the broker."""


class SecondSignalError(Exception):
    """A second Ctrl-C or SIGTERM came while the sender waited inside pika."""

    def __str__(self) -> str:
        return "stopped before the broker confirmed it"


class SenderPlumbing:
    """A channel from ``open_channel(url)`` (send.py), opened again whenever it is lost.

    Sender (send.py) calls it: ``open()`` connects and raises BrokerError if
    it cannot; ``publishing()`` gives an open channel to publish on; ``drop()``
    lets go of a connection that failed; ``keep_alive()`` serves it while
    there is nothing to send. It owns a BlockingConnection, so use it from one
    thread.
    """

    def __init__(self, url: str, open_channel: OpenChannel) -> None:
        self.url = with_blocked_timeout(url)  # give up on a publish blocked for long
        self.busy = False  # inside pika, waiting for the broker: a second Ctrl-C raises (stop_on_signals)
        self.in_hand = ""  # the line being sent, for the "blocked" warning
        self.blocked_for = 0.0  # the connection's blocked_connection_timeout
        self._open_channel = open_channel
        self._connection: Connection | None = None
        self._channel: BlockingChannel | None = None
        self._lost = False
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF

    def open(self) -> None:
        """Connect (open_channel); raise BrokerError if it cannot, SecondSignalError on a second Ctrl-C."""
        with self._inside_pika():
            connection, self._channel = self._open_channel(self.url)
        self._connection = connection
        # A broker short of memory or disk blocks publishers: tell the user at once.
        self.blocked_for = watch_blocked(connection, self._on_blocked, self._on_unblocked)
        if self._lost:
            LOGGER.info("reconnected to %s", connection.node)
        self._lost, self._backoff = False, FIRST_BACKOFF

    @property
    def node(self) -> str:
        """The node we are connected to, for log lines; AMQP_URL's addresses while not connected."""
        return self._connection.node if self._connection is not None else redact(self.url)

    @contextlib.contextmanager
    def publishing(self, in_hand: str) -> Iterator[BlockingChannel]:
        """Give the open channel to publish ``in_hand`` on (a line, as the log names it), reopened if lost.

        What is no answer from the broker ends here. Reconnecting failed, or a
        second Ctrl-C cut pika's wait: NotSentError, and the line is reported
        as not sent. The broker blocked the publish past blocked_connection_timeout:
        BlockedTooLongError, since sending more would only block again. The
        broker's answers pass through, to the story.
        """
        self.in_hand = in_hand  # a broker that blocks publishers meanwhile is reported naming it
        try:
            # busy: a second Ctrl-C meanwhile raises SecondSignalError inside pika (stop_on_signals).
            with self._inside_pika():
                yield self.reopen_if_lost()
        except BrokerError as exc:  # reconnecting found no broker
            raise NotSentError(str(exc)) from None
        except SecondSignalError as exc:
            self.abandon()  # no close handshake: a broker that blocks us would never answer it
            raise NotSentError(str(exc)) from None
        # Blocked past blocked_connection_timeout (60 s); a kind of AMQPConnectionError, so caught here,
        # before the story takes it for a lost connection.
        except pika.exceptions.ConnectionBlockedTimeout:
            self.drop()  # sending more would only block again: give up on the rest
            raise BlockedTooLongError(
                f"gave up on {in_hand}: the broker blocked it for {self.blocked_for:g} s"
            ) from None

    def reopen_if_lost(self) -> BlockingChannel:
        """The open channel; after a lost broker or channel, open_channel again (BrokerError if it cannot)."""
        self._check()  # a connection that died while we were idle
        if self._channel is None:
            self.open()
        assert self._channel is not None
        return self._channel

    def drop(self) -> None:
        """Close a connection that failed under us; the next line opens a new one."""
        try:
            with self._inside_pika():
                close_quietly(self._connection)
        except SecondSignalError:
            pass  # a second Ctrl-C: leave it unclosed
        self.abandon()

    def abandon(self) -> None:
        """Forget the connection without a close handshake (a broker that blocks us would not answer it)."""
        self._connection = self._channel = None
        self._lost, self._retry_at = True, 0.0

    def keep_alive(self) -> None:
        """Serve the connection while idle; after losing it, try to reconnect with capped back-off."""
        if self._connection is not None:
            self._check()
            return
        if time.monotonic() < self._retry_at:
            return
        try:
            self.open()
        except SecondSignalError:
            self.abandon()
        except BrokerError as exc:
            LOGGER.debug("%s", exc)
            # Jitter, so that many senders do not come back in lockstep.
            self._retry_at = time.monotonic() + self._backoff * random.uniform(0.5, 1.0)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def close(self) -> None:
        """Close the connection; a second Ctrl-C leaves it unclosed."""
        self.drop()

    @contextlib.contextmanager
    def _inside_pika(self) -> Iterator[None]:
        """Mark the time spent waiting for the broker, when a second Ctrl-C may interrupt."""
        busy, self.busy = self.busy, True
        try:
            yield
        finally:
            self.busy = busy

    def _on_blocked(self, reason: str) -> None:
        LOGGER.warning(
            "the broker is blocking publishers (%s): %s waits, for %g s at most",
            reason,
            self.in_hand,
            self.blocked_for,
        )

    def _on_unblocked(self) -> None:
        LOGGER.info("the broker takes messages again")

    def _check(self) -> None:
        """Answer heartbeats, and notice a lost broker before a line is lost with it."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(0)
        except pika.exceptions.AMQPError as exc:
            LOGGER.warning("lost the broker (%s); reconnecting", type(exc).__name__)
            self.drop()


def with_blocked_timeout(url: str) -> str:
    """Return ``url`` with pika's blocked_connection_timeout at BLOCKED_TIMEOUT where an address sets none.

    A broker short of memory or disk stops reading from the connections that
    publish; pika then gives up on a publish after that timeout (ConnectionBlockedTimeout).
    """

    def one(address: str) -> str:
        if "blocked_connection_timeout=" in address:
            return address
        return f"{address}{'&' if '?' in address else '?'}blocked_connection_timeout={BLOCKED_TIMEOUT}"

    return ",".join(one(address) for address in addresses(url))


def watch_blocked(
    connection: pika.BlockingConnection,
    on_blocked: Callable[[str], None],
    on_unblocked: Callable[[], None],
) -> float:
    """Call ``on_blocked(reason)`` as soon as the broker blocks ``connection``, ``on_unblocked()`` when it
    lets go; return the connection's blocked_connection_timeout in seconds (0 if none).
    """
    # pika 1.4: its private _impl, the connection inside the BlockingConnection: the public callbacks run
    # only once the blocked publish has returned, too late to say so; pika offers no other way.
    impl = connection._impl

    def blocked(_connection: object, frame: pika.frame.Method) -> None:
        on_blocked(frame.method.reason or "no reason given")

    impl.add_on_connection_blocked_callback(blocked)
    impl.add_on_connection_unblocked_callback(lambda _connection, _frame: on_unblocked())
    return float(impl.params.blocked_connection_timeout or 0)


def stop_on_signals(lines: Lines, sender: SenderPlumbing) -> None:
    """First Ctrl-C or SIGTERM: finish the line in hand, then stop. Second: stop now.

    Stopping is a flag that the loops check, as everywhere in pikachat. A
    second signal that comes while the sender waits inside pika is the one
    exception: it raises SecondSignalError (see the comment at the raise).
    """

    def handler(_signum: int, _frame: object) -> None:
        if not lines.stopped:
            lines.stop()
            return
        lines.hurry = True
        if sender.busy:
            sender.busy = False
            # Elsewhere pikachat never raises inside pika's I/O, since it may leave a
            # connection half-way through a frame. Here, raising is the only way out: a
            # blocked broker holds basic_publish for up to blocked_connection_timeout
            # (60 s), and pika's wait has no other exit that a signal handler can reach.
            # The cost: that connection can no longer be trusted, so the sender
            # abandons it without a close handshake (the broker would not answer), and
            # the line in hand is reported as not sent, though it may have gone out.
            raise SecondSignalError

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def preview(text: str) -> str:
    """A line as the log names it: quoted, and cut at 60 characters."""
    return repr(text if len(text) <= 60 else text[:59] + "…")
