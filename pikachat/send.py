"""Send each line of stdin to everyone listening: the talking half of pikachat.

Pairs with pikachat/receive.py. Start the receivers first: a line said while
nobody listens reaches nobody.

    python pikachat/send.py [RABBIT_HOST] [--name NAME]    # type; Ctrl-D or Ctrl-C to end
    printf 'hello\\nbye\\n' | python pikachat/send.py --name ash

Without --name you are a random Pokémon with a number, e.g. "pikachu42".

Guarantee: each line is published with a publisher confirm, so "sent" means
that the broker took it and copied it into the queue of every receiver
listening at that moment; a line that reached no one is reported. Messages
are not persistent: no queue would keep them on disk (each receiver's queue
is temporary), so persistence would buy nothing. If the broker goes away, the
line in hand is reported on stderr and not retried, so that no line ever
shows twice, and the sender reconnects for the lines that follow.

A broker short of memory or disk blocks its publishers until it recovers.
The sender says so at once, and gives up if the line in hand stays blocked
for 60 s (set another limit in the URL: ``?blocked_connection_timeout=10``).

Exit status 0 at end of input or Ctrl-C; 1 if the broker cannot be reached
at start, or if any line could not be sent. The first Ctrl-C or SIGTERM
finishes the line in hand; a second stops at once, and the line in hand, if
any, is reported as not sent.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

import pika
import pika.exceptions
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel

from pikachat.broker import BrokerError, addresses, close_quietly, connect, explain, redact, resolve
from pikachat.message import EXCHANGE, MAX_NAME, MAX_TEXT, Message, declare_exchange, encode

LOGGER = logging.getLogger("pikachat.send")

PROPERTIES = pika.BasicProperties(content_type="application/json", delivery_mode=pika.DeliveryMode.Transient)
NAME = re.compile(rf"[\w.-]{{1,{MAX_NAME}}}")
POKEMON = (
    "pikachu", "bulbasaur", "charmander", "squirtle", "jigglypuff", "meowth", "psyduck", "snorlax",
    "eevee", "togepi", "gengar", "vulpix", "magikarp", "slowpoke", "mewtwo", "onix",
)  # fmt: skip
# How often an idle sender serves its connection (heartbeats, noticing a
# lost broker); also how soon it notices Ctrl-C.
IDLE = 0.5
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0
# A "line" from stdin is cut here even without a line ending.
MAX_LINE = 64 * 1024
# How long a publish may stay blocked by the broker (memory or disk alarm)
# before the sender gives up, unless the URL sets blocked_connection_timeout.
BLOCKED_TIMEOUT = 60


def random_name() -> str:
    return f"{random.choice(POKEMON)}{random.randint(1, 99)}"


def chat_name(value: str) -> str:
    """argparse type for --name."""
    if not NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"a name is 1 to {MAX_NAME} letters, digits, '_', '.' or '-'")
    return value


def _preview(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:59] + "…")


class Sender:
    """Publish chat messages as ``name``, each confirmed by the broker.

    ``open()`` connects and raises BrokerError if it cannot. After that,
    ``send()`` never raises for a lost broker: it logs the line it could not
    send and reconnects on the next call. It owns a BlockingConnection, so use
    it from one thread, and call ``keep_alive()`` every second or so while
    there is nothing to send.
    """

    def __init__(self, url: str, name: str) -> None:
        self.url = with_blocked_timeout(url)
        self.name = name
        self.id = uuid.uuid4().hex
        self.busy = False  # inside pika, waiting for the broker (see stop_on_signals)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._lost = False
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF
        self._in_hand = ""

    def open(self) -> None:
        """Connect, turn on publisher confirms and declare the exchange.

        Raises BrokerError if it cannot, and SecondSignalError on a second Ctrl-C.
        """
        busy, self.busy = self.busy, True
        try:
            self._open()
        finally:
            self.busy = busy

    def _open(self) -> None:
        connection = connect(self.url)
        # A broker short of memory or disk stops reading from a publisher and
        # says "Connection.Blocked" as our line arrives: tell the user now.
        # (BlockingConnection's own callback would wait until after the publish.)
        connection._impl.add_on_connection_blocked_callback(self._on_blocked)
        connection._impl.add_on_connection_unblocked_callback(self._on_unblocked)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_exchange(channel)
        except pika.exceptions.AMQPChannelError as exc:
            close_quietly(connection)
            raise BrokerError(f"the broker at {redact(self.url)} refused: {exc}") from exc
        except pika.exceptions.AMQPConnectionError as exc:
            close_quietly(connection)
            raise explain(self.url, exc) from exc
        self._connection, self._channel = connection, channel
        if self._lost:
            LOGGER.info("reconnected to %s", redact(self.url))
        self._lost, self._backoff = False, FIRST_BACKOFF

    def send(self, text: str, kind: str = "say") -> bool:
        """Publish one message and wait for its confirm; return False (logged) if it was not sent.

        Raises BlockedTooLongError if the broker blocked it past the blocked-connection timeout.
        """
        what = self._in_hand = _preview(text) if kind == "say" else f"the {kind} notice"
        body = encode(Message(kind, self.name, self.id, text, time.time()))
        try:
            try:
                self.busy = True
                self._check()  # a connection that died while we were idle
                if self._channel is None:
                    self.open()
                assert self._channel is not None
                # mandatory: the broker tells us when no queue was bound.
                self._channel.basic_publish(EXCHANGE, "", body, PROPERTIES, mandatory=True)
            finally:
                self.busy = False
        except SecondSignalError:
            # A second Ctrl-C while the broker held the line: it may or may
            # not have gone out, and the connection is left mid-publish.
            self._abandon()
            LOGGER.error("could not send %s: stopped before the broker confirmed it", what)
            return False
        except pika.exceptions.ConnectionBlockedTimeout:
            self._drop()
            timeout = self._blocked_timeout()
            raise BlockedTooLongError(f"gave up on {what}: the broker blocked it for {timeout:g} s") from None
        except pika.exceptions.UnroutableError:
            LOGGER.warning("%s reached no one: nobody is listening", what)
        except pika.exceptions.NackError:
            LOGGER.error("could not send %s: the broker refused it", what)
            return False
        except BrokerError as exc:
            LOGGER.error("could not send %s: %s", what, exc)
            return False
        except pika.exceptions.AMQPChannelError as exc:
            # e.g. the exchange was deleted; a new channel declares it again.
            self._drop()
            LOGGER.error("could not send %s: the broker closed the channel: %s", what, exc)
            return False
        except pika.exceptions.AMQPConnectionError as exc:
            # It may or may not have gone out; sending it again could show
            # it twice, so it is reported instead.
            self._drop()
            LOGGER.error("could not send %s: lost the broker (%s)", what, type(exc).__name__)
            return False
        return True

    def _on_blocked(self, _connection: object, frame: pika.frame.Method) -> None:
        LOGGER.warning(
            "the broker is blocking publishers (%s): %s waits, for %g s at most",
            frame.method.reason or "no reason given",
            self._in_hand,
            self._blocked_timeout(),
        )

    def _on_unblocked(self, _connection: object, _frame: pika.frame.Method) -> None:
        LOGGER.info("the broker takes messages again")

    def _blocked_timeout(self) -> float:
        found = re.search(r"blocked_connection_timeout=([\d.]+)", self.url)
        return float(found.group(1)) if found else 0.0

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
        busy, self.busy = self.busy, True
        try:
            close_quietly(self._connection)
        except SecondSignalError:
            pass  # a second Ctrl-C: leave it unclosed
        finally:
            self.busy = busy
        self._abandon()

    def _abandon(self) -> None:
        # No close handshake: a broker that blocks us would never answer it.
        self._connection = self._channel = None
        self._lost, self._retry_at = True, 0.0

    def close(self) -> None:
        """Close the connection; a second Ctrl-C leaves it unclosed."""
        self._drop()


class Lines:
    """The lines typed or piped on stdin, read on a thread of their own.

    Iterating yields each line without its line ending, and None whenever
    IDLE seconds pass without one: a BlockingConnection answers heartbeats
    only while it is called, so the caller's thread must not sit in a read.
    Iteration ends at end of input or soon after ``stop()``.
    """

    _EOF = object()

    def __init__(self, source: Callable[[], Iterable[str]] | None = None) -> None:
        """Read stdin as it comes, or the lines that ``source()`` gives (a terminal's, say)."""
        # Bounded, so that a huge pipe is read no faster than it is sent.
        self._queue: queue.Queue[object] = queue.Queue(maxsize=100)
        self.stopped = False
        self.hurry = False  # a second Ctrl-C: stop without another word to the broker
        threading.Thread(target=self._read, args=(source or read_stdin,), name="stdin", daemon=True).start()

    def _read(self, source: Callable[[], Iterable[str]]) -> None:
        for line in source():
            self._queue.put(line)
        self._queue.put(self._EOF)

    def stop(self) -> None:
        """End the iteration within IDLE seconds; safe in a signal handler."""
        self.stopped = True

    def __iter__(self) -> Iterator[str | None]:
        while not self.stopped:
            try:
                line = self._queue.get(timeout=IDLE)
            except queue.Empty:
                yield None
                continue
            if line is self._EOF:
                return
            assert isinstance(line, str)
            yield line


def read_stdin() -> Iterator[str]:
    """Each line on stdin, without its line ending; a very long one is cut in pieces."""
    # os.read rather than sys.stdin: a daemon thread blocked inside a
    # buffered file can abort the interpreter at exit.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        *lines, pending = (pending + decoder.decode(chunk, final=not chunk)).split("\n")
        if len(pending) > MAX_LINE:
            lines, pending = [*lines, pending], ""
        for line in lines:
            yield line.removesuffix("\r")
        if not chunk:
            break
    if pending:
        yield pending


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


class BlockedTooLongError(Exception):
    """The broker blocked a line past the timeout: sending more would only block again."""


class SecondSignalError(Exception):
    """A second Ctrl-C or SIGTERM came while the sender waited inside pika."""


def with_blocked_timeout(url: str) -> str:
    """Return ``url`` with pika's blocked_connection_timeout at BLOCKED_TIMEOUT where an address sets none."""

    def one(address: str) -> str:
        if "blocked_connection_timeout=" in address:
            return address
        return f"{address}{'&' if '?' in address else '?'}blocked_connection_timeout={BLOCKED_TIMEOUT}"

    return ",".join(one(address) for address in addresses(url))


def stop_on_signals(lines: Lines, sender: Sender) -> None:
    """First Ctrl-C or SIGTERM: finish the line in hand, then stop. Second: stop now.

    Stopping is a flag that the loops check. Only a second signal that comes
    while the sender waits inside pika (a blocked broker may hold a publish
    for a minute) raises, and the sender then leaves that connection alone.
    """

    def handler(_signum: int, _frame: object) -> None:
        if not lines.stopped:
            lines.stop()
            return
        lines.hurry = True
        if sender.busy:
            sender.busy = False
            raise SecondSignalError

    # SIGINT explicitly, too: a shell starting us in the background ignores it.
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rabbit_host", nargs="?", metavar="RABBIT_HOST", help="host name or amqp(s):// URL")
    parser.add_argument("--name", type=chat_name, help="your name in the chat (default: a random one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    setup_logging(args.verbose)

    lines = Lines()
    try:
        sender = Sender(resolve(args.rabbit_host), args.name or random_name())
        stop_on_signals(lines, sender)
        sender.open()
    except BrokerError as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 1
    except SecondSignalError:
        return 0
    try:
        LOGGER.info(
            "sending to exchange %r at %s as %s; one message per line, Ctrl-D to end",
            EXCHANGE,
            redact(sender.url),
            sender.name,
        )
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
