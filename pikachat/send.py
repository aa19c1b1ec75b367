"""Send each line you type to everyone listening: the talking half of pikachat.

Pairs with pikachat/receive.py: start the receivers first, since a line said
while nobody listens reaches nobody.

    python pikachat/send.py [RABBIT_HOST] [--name NAME]    # type; Ctrl-D or Ctrl-C to end

The lesson: publish to a *fanout* exchange, which copies each message into
every queue bound to it, with a publisher confirm and ``mandatory``.

Guarantee: when a line is "sent", the broker has copied it into the queue of
every receiver listening at that moment; a line that reached no one is
reported. At most once: a line the broker may not have taken is reported on
stderr, never sent again, and exit status is 1 at the end.

It uses a BlockingConnection: one line at a time, each publish waiting for
its confirm, is the simplest form and fast enough for anyone typing.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from pikachat.blocked import watch_blocked, with_blocked_timeout
from pikachat.broker import BrokerError, close_quietly, connect, explain, redact, resolve
from pikachat.cli import Lines, SecondSignalError, parse_arguments, setup_logging, stop_on_signals
from pikachat.message import EXCHANGE, MAX_TEXT, Message, encode

LOGGER = logging.getLogger("pikachat.send")

# Not persistent (Transient): every queue bound to the exchange is a
# receiver's temporary queue, gone after a broker restart anyway; writing the
# line to disk would cost time and keep nothing.
PROPERTIES = pika.BasicProperties(content_type="application/json", delivery_mode=pika.DeliveryMode.Transient)
# After losing the broker, wait this long before reconnecting, doubling up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0


class BlockedTooLongError(Exception):
    """The broker blocked a line past the timeout: sending more would only block again."""


def open_channel(url: str) -> tuple[pika.BlockingConnection, BlockingChannel]:
    """Connect, turn on publisher confirms and declare the exchange; raise BrokerError if refused."""
    connection = connect(url)
    try:
        channel = connection.channel()
        # Publisher confirms: from now on basic_publish waits until the broker has taken the message.
        channel.confirm_delivery()
        # fanout: copy each message into every queue bound to the exchange (no routing key needed).
        # Both sides declare it, so whoever starts first creates it; durable: it outlives a restart.
        channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
    except pika.exceptions.AMQPChannelError as exc:
        close_quietly(connection)
        raise BrokerError(f"the broker at {redact(url)} refused: {exc}") from exc
    except pika.exceptions.AMQPConnectionError as exc:
        close_quietly(connection)
        raise explain(url, exc) from exc
    return connection, channel


def publish(channel: BlockingChannel, message: Message) -> None:
    """Publish one chat message and wait for the broker's confirm.

    Raises pika's UnroutableError if no queue is bound (nobody listens), NackError if the broker
    refused it, AMQPChannelError or AMQPConnectionError if the channel or the connection was lost.
    """
    # mandatory: with no queue bound, the broker returns the message (basic.return) before it
    # confirms, and pika raises UnroutableError; without it, the line would vanish silently.
    channel.basic_publish(EXCHANGE, "", encode(message), PROPERTIES, mandatory=True)


class Sender:
    """Publish chat messages as ``name``, each confirmed by the broker.

    ``open()`` connects and raises BrokerError if it cannot. After that,
    ``send()`` never raises for a lost broker: it logs the line it could not
    send and reconnects on the next call. It owns a BlockingConnection, so use
    it from one thread, and call ``keep_alive()`` every second or so while
    there is nothing to send.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = with_blocked_timeout(url)  # give up on a publish blocked for long (blocked.py)
        self.name = name
        self.id = uuid.uuid4().hex  # lets chat.py tell its own messages from others'
        self.busy = False  # inside pika, waiting for the broker (see cli.stop_on_signals)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._lost = False
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF
        self._in_hand = ""
        self._blocked_for = 0.0

    def send(self, text: str, kind: str = "say") -> bool:
        """Publish one message and wait for its confirm; return False (logged) if it was not sent.

        Raises BlockedTooLongError if the broker blocked it past the blocked-connection timeout.
        """
        what = self._in_hand = _preview(text) if kind == "say" else f"the {kind} notice"
        try:
            with self._ready_channel() as channel:
                publish(channel, Message(kind, self.name, self.id, text, time.time()))
        except pika.exceptions.UnroutableError:  # returned by the broker: no queue was bound
            LOGGER.warning("%s reached no one: nobody is listening", what)
            return True
        except pika.exceptions.ConnectionBlockedTimeout:  # before its base class, AMQPConnectionError
            raise BlockedTooLongError(
                f"gave up on {what}: the broker blocked it for {self._blocked_for:g} s"
            ) from None
        # Not sent, or not known to be: a line is never sent again, since it would
        # show twice if the first copy went out. It is reported instead.
        except pika.exceptions.NackError:
            why = "the broker refused it"
        except pika.exceptions.AMQPChannelError as exc:  # e.g. the exchange was deleted
            why = f"the broker closed the channel: {exc}"
        except pika.exceptions.AMQPConnectionError as exc:
            why = f"lost the broker ({type(exc).__name__})"
        except BrokerError as exc:  # no broker to reconnect to
            why = str(exc)
        except SecondSignalError:  # a second Ctrl-C while the broker held the line
            why = "stopped before the broker confirmed it"
        else:
            return True
        LOGGER.error("could not send %s: %s", what, why)
        return False

    def open(self) -> None:
        """Connect (open_channel); raise BrokerError if it cannot, SecondSignalError on a second Ctrl-C."""
        with self._inside_pika():
            connection, self._channel = open_channel(self.url)
        self._connection = connection
        # A broker short of memory or disk blocks publishers: tell the user at once.
        self._blocked_for = watch_blocked(connection, self._on_blocked, self._on_unblocked)
        if self._lost:
            LOGGER.info("reconnected to %s", redact(self.url))
        self._lost, self._backoff = False, FIRST_BACKOFF

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
            self._abandon()
        except BrokerError as exc:
            LOGGER.debug("%s", exc)
            self._retry_at = time.monotonic() + self._backoff * random.uniform(0.5, 1.0)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def close(self) -> None:
        """Close the connection; a second Ctrl-C leaves it unclosed."""
        self._drop()

    # The plumbing: reconnecting, a broker that blocks us, a second Ctrl-C.

    @contextlib.contextmanager
    def _ready_channel(self) -> Iterator[BlockingChannel]:
        """An open channel, reconnecting if need be; drop the connection if it fails under us.

        A second Ctrl-C in there (SecondSignalError) leaves the connection
        without a close handshake, which a broker that blocks us would never answer.
        """
        try:
            with self._inside_pika():
                self._check()  # a connection that died while we were idle
                if self._channel is None:
                    self.open()
                assert self._channel is not None
                yield self._channel
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
            raise  # the broker's answer about one message: the channel is fine
        except SecondSignalError:
            self._abandon()
            raise
        except (pika.exceptions.AMQPChannelError, pika.exceptions.AMQPConnectionError):
            self._drop()  # the next line opens a new channel, and declares the exchange again
            raise

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
            self._in_hand,
            self._blocked_for,
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
            self._drop()

    def _drop(self) -> None:
        try:
            with self._inside_pika():
                close_quietly(self._connection)
        except SecondSignalError:
            pass  # a second Ctrl-C: leave it unclosed
        self._abandon()

    def _abandon(self) -> None:
        # No close handshake: a broker that blocks us would never answer it.
        self._connection = self._channel = None
        self._lost, self._retry_at = True, 0.0


def send_lines(sender: Sender, lines: Lines) -> int:
    """Send every non-blank line until the lines end; return how many could not be sent."""
    failed = 0
    for line in lines:
        if line is None:
            sender.keep_alive()
            continue
        if not line.strip():
            continue
        if len(line) > MAX_TEXT:
            LOGGER.warning("line of %d characters cut to %d", len(line), MAX_TEXT)
        if not sender.send(line[:MAX_TEXT]):
            failed += 1
    return failed


def _preview(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:59] + "…")


def main() -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], with_name=True)
    setup_logging(args.verbose)
    lines = Lines()
    try:
        sender = Sender(resolve(args.rabbit_host), args.name)
        stop_on_signals(lines, sender)
        sender.open()
    except BrokerError as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 1
    except SecondSignalError:
        return 0
    LOGGER.info(
        "sending to exchange %r at %s as %s; one message per line, Ctrl-D to end",
        EXCHANGE,
        redact(sender.url),
        sender.name,
    )
    try:
        failed = send_lines(sender, lines)
    except BlockedTooLongError as exc:
        LOGGER.error("%s", exc)
        return 1
    finally:
        sender.close()
    if failed:
        LOGGER.error("%d line(s) could not be sent", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
