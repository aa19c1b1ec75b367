"""Show every chat line said from now on: the listening half of pikachat.

Start it first, then pikachat/send.py or pikachat/chat.py, in any number of
terminals:

    python pikachat/receive.py [RABBIT_HOST]     # Ctrl-C or SIGTERM to stop

The lesson: a queue of its own (named by the broker, exclusive and auto-delete), bound to the
fanout exchange, which copies every message into every bound queue; consumed
with auto-ack. It prints each line as ``HH:MM:SS name: text`` on stdout; its
log (ready, lost broker, skipped messages) goes to stderr.

Guarantee: at most once, in each sender's order, while it listens; nothing
said before it started or while it was away (an exchange stores nothing). If
the broker goes away, it says so and reconnects until stopped. If the exchange
is deleted, our binding goes with it: the lines said until the next check binds
us again (within 2 s) are lost, and it can say so only if it finds the exchange
still gone, not if someone has declared it again meanwhile.

It uses a BlockingConnection: start_consuming() runs the delivery callbacks
on this thread, one at a time, and printing a line is quick.

What goes wrong, and what the code does (docs/pikachat.md has the whole table, with its tests):

    a malformed message          deliver: a WARNING, skipped
    no broker at start           Listener.run: one line, exit 1
    the broker lost later        Listener.run: a WARNING; reconnect until stopped, with back-off
    our queue deleted            Listener._listen: the broker cancels us; subscribe again
    the exchange deleted         Listener._check_binding binds us again every 2 s: if the exchange is
                                 still gone, a WARNING, subscribe again; if it was declared again
                                 meanwhile, we are bound anew without a word (nothing tells us)
    the exchange refused (406)   Listener.run: one line, exit 1
    Ctrl-C or SIGTERM            Listener.stop: stop consuming, close, exit 0
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
from collections.abc import Callable
from functools import partial

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pikachat.broker import BrokerError, close_quietly, connect, redact, resolve
from pikachat.cli import on_signals, parse_arguments, setup_logging
from pikachat.message import EXCHANGE, Message, decode, render

LOGGER = logging.getLogger("pikachat.receive")


def subscribe(channel: BlockingChannel, on_message: Callable[[Message], None]) -> None:
    """Give us a queue of our own, bound to the exchange, and consume from it."""
    # The same declaration as send.py's: whoever starts first creates the exchange.
    channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
    # "": the broker names the queue (amq.gen-…). exclusive: ours alone, and deleted
    # when our connection closes, so a receiver that goes leaves nothing behind.
    # auto_delete: deleted, too, as soon as we stop consuming, though still connected.
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    # The binding: from now on the exchange copies every message into our queue too.
    channel.queue_bind(queue, EXCHANGE)
    # auto_ack: the broker forgets each line once sent to us. A chat line is worth
    # showing now or not at all: one lost in a crash beats one shown twice, or late.
    channel.basic_consume(queue, partial(deliver, on_message), auto_ack=True)


def deliver(
    on_message: Callable[[Message], None],
    _channel: BlockingChannel,
    _method: Basic.Deliver,
    _properties: BasicProperties,
    body: bytes,
) -> None:
    """Called by pika for each delivery: hand the message on; log and skip one that is not a chat message."""
    try:
        message = decode(body)  # anyone may publish to the exchange: check everything
    except ValueError as exc:
        LOGGER.warning("skipped a malformed message (%d bytes): %s", len(body), exc)
        return
    on_message(message)


def show(message: Message) -> None:
    print(render(message), flush=True)


# The plumbing: staying subscribed while the broker comes and goes.

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0
# Our choice: how often a listener checks that its queue is still bound (RabbitMQ tells no consumer that
# the exchange was deleted): one queue.bind, well under a millisecond.
CHECK_EVERY = 2.0


class Listener:
    """On a connection of its own: a channel, ``on_channel(channel)`` to subscribe, then consume.

    ``run()`` does that again whenever the broker goes away, until ``stop()``
    is called (from any thread). It owns its BlockingConnection, so run it on
    one thread only: the one that calls ``run()``.
    """

    def __init__(self, url: str, on_channel: Callable[[BlockingChannel], None]) -> None:
        self._url = url
        self._on_channel = on_channel
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._stopping = threading.Event()
        self._subscribed = False  # once: from then on, a lost broker is waited for

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
                if not self._subscribed:
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
        self._on_channel(channel)
        self._subscribed = True
        LOGGER.info("listening on exchange %r at %s", EXCHANGE, channel.connection.node)
        # RabbitMQ tells no consumer that the exchange its queue was bound to is deleted: check.
        channel.connection.call_later(CHECK_EVERY, partial(self._check_binding, channel))
        # stop() may have come while we set up; its callback found no consumer.
        if not self._stopping.is_set():
            try:
                channel.start_consuming()  # runs _check_binding too, on this thread
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:  # NOT_FOUND: what _check_binding's queue_bind may hear
                    raise
                if not self._stopping.is_set():
                    LOGGER.warning("our binding was deleted (%s); subscribing again", exc.reply_text)
                return
        if not self._stopping.is_set():
            LOGGER.warning("the broker cancelled our subscription (queue deleted?); listening again")

    def _check_binding(self, channel: BlockingChannel) -> None:
        """Bind our queue again: a no-op if bound; 404 (to start_consuming) if the exchange is gone."""
        if self._stopping.is_set() or not channel.consumer_tags:
            return  # stopping, or cancelled: our queue is gone, or going
        # "": the queue declared last on this channel, subscribe's. Binding again also mends a binding
        # lost with an exchange that someone deleted and declared again since the last check.
        channel.queue_bind("", EXCHANGE)
        channel.connection.call_later(CHECK_EVERY, partial(self._check_binding, channel))

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


def main() -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], with_name=False)
    setup_logging(args.verbose)
    # A terminal that cannot show a character gets a "?", not a crash.
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        # On each (re)connection: subscribe, then start_consuming() until stopped.
        listener = Listener(resolve(args.rabbit_host), lambda channel: subscribe(channel, show))
        on_signals(listener.stop)
        listener.run()
    except BrokerError as exc:
        print(f"receive: {exc}", file=sys.stderr)
        return 1
    LOGGER.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
