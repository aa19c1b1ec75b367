"""Show every chat line sent from now on: the listening half of pikachat.

Start it first, then pikachat/send.py or pikachat/chat.py, in any number of
terminals:

    python pikachat/receive.py [RABBIT_HOST]     # Ctrl-C or SIGTERM to stop

It prints each line as ``HH:MM:SS name: text`` on stdout; its log (ready,
lost broker, skipped messages) goes to stderr.

Guarantee: none for what was said before it started, or while it was away:
the fanout exchange copies each message into the queues bound to it at that
moment and keeps nothing. While it listens, each line arrives at most once,
in the order each sender sent them. Messages are acknowledged on delivery
(auto-ack): a chat line is worth showing now or not at all, and one lost in a
crash is not worth the risk of showing it twice. If the broker goes away, the
receiver says so and reconnects with capped back-off until stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import signal
import sys
import threading
from collections.abc import Callable

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pikachat.broker import BrokerError, close_quietly, connect, redact, resolve
from pikachat.message import EXCHANGE, Message, declare_exchange, decode, render

LOGGER = logging.getLogger("pikachat.receive")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0


class Listener:
    """Receive every chat message through a private queue bound to EXCHANGE.

    ``run()`` blocks until ``stop()`` is called (from any thread) and hands each
    well-formed message to ``on_message``; malformed ones are logged and
    skipped. It owns its BlockingConnection, so run it on one thread only.
    """

    def __init__(self, url: str, on_message: Callable[[Message], None]) -> None:
        self._url = url
        self._on_message = on_message
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._stopping = threading.Event()
        self.ready = threading.Event()  # set once the first queue is bound

    def run(self) -> None:
        """Listen until stopped, reconnecting whenever the broker goes away.

        Raises BrokerError if the first connection fails, or if the broker
        refuses the exchange or queue (that does not improve by retrying).
        """
        backoff = FIRST_BACKOFF
        while not self._stopping.is_set():
            try:
                connection = connect(self._url)
            except BrokerError as exc:
                if not self.ready.is_set():
                    raise
                # Jitter, so that many receivers do not come back in lockstep.
                delay = backoff * random.uniform(0.5, 1.0)
                LOGGER.info("%s; retrying in %.1f s", exc, delay)
                self._stopping.wait(delay)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = FIRST_BACKOFF
            self._connection = connection
            try:
                self._listen(connection.channel())
            except pika.exceptions.AMQPConnectionError as exc:
                if not self._stopping.is_set():
                    LOGGER.warning("lost the broker (%s); reconnecting", type(exc).__name__)
            except pika.exceptions.AMQPChannelError as exc:
                raise BrokerError(f"the broker at {redact(self._url)} refused: {exc}") from exc
            finally:
                self._connection = self._channel = None
                close_quietly(connection)

    def _listen(self, channel: BlockingChannel) -> None:
        self._channel = channel
        declare_exchange(channel)
        # Server-named, and exclusive: it is ours alone and the broker deletes
        # it when our connection closes, so a listener leaves nothing behind.
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, EXCHANGE)
        channel.basic_consume(queue, self._deliver, auto_ack=True)
        LOGGER.info("listening on exchange %r at %s", EXCHANGE, redact(self._url))
        self.ready.set()
        # stop() may have come while we set up; its callback found no consumer.
        if not self._stopping.is_set():
            channel.start_consuming()
        if not self._stopping.is_set():
            LOGGER.warning("the broker cancelled our subscription (queue deleted?); listening again")

    def _deliver(
        self, _channel: BlockingChannel, _method: Basic.Deliver, _props: BasicProperties, body: bytes
    ) -> None:
        try:
            message = decode(body)
        except ValueError as exc:
            LOGGER.warning("skipped a malformed message (%d bytes): %s", len(body), exc)
            return
        self._on_message(message)

    def stop(self) -> None:
        """Make ``run()`` return soon; safe to call from any thread."""
        self._stopping.set()
        connection = self._connection
        if connection is not None:
            # Only the connection's own thread may touch its channel. If the
            # connection closed meanwhile, run() sees _stopping instead.
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.add_callback_threadsafe(self._stop_consuming)

    def _stop_consuming(self) -> None:
        if self._channel is not None:
            self._channel.stop_consuming()


def show(message: Message) -> None:
    print(render(message), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rabbit_host", nargs="?", metavar="RABBIT_HOST", help="host name or amqp(s):// URL")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    # A terminal that cannot show a character gets a "?", not a crash.
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        listener = Listener(resolve(args.rabbit_host), show)
    except BrokerError as exc:
        print(f"receive: {exc}", file=sys.stderr)
        return 1

    def on_signal(_signum: int, _frame: object) -> None:
        # Ask the listener to stop rather than raise: an exception raised in
        # the middle of pika's I/O could leave the connection stuck.
        if not stopping:
            stopping.append(True)
            listener.stop()

    stopping: list[bool] = []
    # Ctrl-C and SIGTERM (docker stop, kill) alike. SIGINT explicitly, too: a
    # shell starting us in the background ignores it.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        listener.run()
    except BrokerError as exc:
        print(f"receive: {exc}", file=sys.stderr)
        return 1
    LOGGER.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
