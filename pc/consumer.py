"""Consume the durable queue ``pc``, acknowledging each message once handled.

Pairs with pc/producer.py; either may start first, because the queue keeps
messages until a consumer acknowledges them. Read pc/consume_one.py first: the
same consumer in 49 lines. What this one adds, and why: reconnection, and declaring pc again when it
is deleted (failures); a handler that may fail, its message given back with basic_nack (failures); acks
in batches and a prefetch of 200, not 10 (speed, docs/performance.md; --ack-each for the plain form);
process_data_events in half-second slices, not start_consuming (to notice Ctrl-C and a cancel between
messages); --work, --fail-on, --quiet (to try it out).

    python pc/consumer.py            # Ctrl-C or SIGTERM to stop
    python pc/consumer.py --quiet    # no line per message (for benchmarks)
    python pc/consumer.py --work 2   # pretend each message takes 2 s to handle
    python pc/consumer.py --ack-each # one basic_ack per message, not in batches
    python pc/consumer.py --fail-on poison # fail to handle a message containing 'poison'

Guarantee: at-least-once. A message is acknowledged only after it has been
handled, so a consumer that dies with messages in hand loses none of them: the
broker delivers them again (marked "redelivered") to the next consumer. A
message may be handled twice: those handled but not yet acked when it died
(fewer than 50, pc/batched_acks.py). A message whose handling raises is
given back to the queue (basic_nack) and the consumer carries on; a message
that fails, or kills every consumer taking it, is delivered at most 6 times,
then moved to ``pc.dead`` (pc/workqueue.py). Any body is shown, text or not.

Why BlockingConnection: a consumer is one loop that waits for a message,
handles it and acks it; blocking calls read top to bottom. The broker pushes
messages to us (basic_consume), so there is no round trip per message to hide.

The story is listen() and on_message(), first below; consume(), in the plumbing, reconnects.
What goes wrong, and what the code does (docs/pc.md has the whole table, with its tests):

    the handler raises           on_message: basic_nack(requeue=True); the 6th time, pc.dead. At once,
                                 no delay: a passing failure can use up all 6 in milliseconds
    this consumer dies           the broker delivers its unacked messages again, to any consumer
    the broker is lost           consume: reconnect; not consuming again within RECONNECT_FOR (counted
                                 to consuming, not connecting: a node may answer, yet fail to declare a
                                 quorum queue without its majority), one line with why, exit 1
    pc is deleted                consume: the broker cancels us; declare pc again, consume again
    pc declared otherwise (406)  consume: one line, exit 1
    Ctrl-C or SIGTERM            a flag: the message in hand is not acked; it and the prefetched ones
                                 go back, each return counting towards the delivery limit (a message
                                 held through 6 stops goes to pc.dead: with a slow handler that is
                                 restarted often, lower PREFETCH); exit 0. Not consuming yet (nothing
                                 in hand): on_signal ends it at once, exit 0
    a handler slower than the    the broker takes us for dead: our unacked messages go back; we
      heartbeat timeout          reconnect. For long work, see distop's server (a worker thread)
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from typing import NamedTuple

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pc.batched_acks import BatchedAcks
from pc.broker import BrokerError, connect, redact, resolve
from pc.workqueue import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    QUEUE,
    QUEUE_ARGUMENTS,
    inequivalent,
)

LOGGER = logging.getLogger("pc.consumer")

# How many unacknowledged messages the broker may push to us at once. Enough
# to keep the pipe full even while acks are on their way back; small enough
# that a crash sends few round again.
PREFETCH = 200
# After losing the broker, keep trying this long before giving up. Longer than the
# producer's 30 s: a consumer is a service that waits for work anyway, whereas
# someone (a person, a script) is waiting on the producer's exit status.
RECONNECT_FOR = 60.0
MAX_BACKOFF = 5.0
# Characters (or bytes) of a body shown in the log: a 10 MB body is not printed whole.
SHOW_AT_MOST = 1000


# Set by Ctrl-C or SIGTERM (see main): take no more messages, close, exit 0.
STOPPING = threading.Event()
# Set while consuming, when a message may be in hand; unset, a signal ends us at once (on_signal).
CONSUMING = threading.Event()


# The story: declare, consume, handle, ack ----------------------------------


def listen(connection: pika.BlockingConnection, options: Options) -> Listening:
    """Declare the queue and consume from it on a new channel."""
    channel = connection.channel()
    # Where pc sends a message over its delivery limit (pc/workqueue.py).
    channel.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
    # Durable quorum queue, declared alike by the producer (pc/workqueue.py):
    # whichever starts first creates it. Declared with other arguments: see consume.
    # If pc is deleted, we declare it again (consume): a consumer promised nothing
    # about what was in it and simply waits for new messages (the producer,
    # whose exit status vouches for what it confirmed, refuses to).
    channel.queue_declare(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
    # Prefetch: the broker pushes at most PREFETCH unacknowledged messages to
    # us at once; the rest wait in the queue for whichever consumer is free.
    channel.basic_qos(prefetch_count=PREFETCH)
    # Our choice: for speed, acks in batches, one for up to 50 handled messages (pc/batched_acks.py);
    # --ack-each acks each message alone, the plain way (on_message).
    batch = BatchedAcks(channel)
    # Consumer cancel notification: the broker tells us when it ends our consumer (the queue
    # was deleted). start_consuming() would return; consume's loop watches this flag instead.
    cancelled = threading.Event()
    channel.add_on_cancel_callback(lambda _frame: cancelled.set())
    # Manual acks (auto_ack=False, the default): a message stays the broker's
    # until we ack it, and goes to another consumer if we die first.
    channel.basic_consume(QUEUE, make_handler(batch, options))
    return Listening(channel, batch, cancelled)


def make_handler(batch: BatchedAcks, options: Options):
    """Return the on-message callback: handle, then ack; if handling fails, give the message back."""

    def on_message(
        channel: BlockingChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes
    ) -> None:
        if STOPPING.is_set():
            return  # Ctrl-C: not acked, so it goes back to the queue when we close
        if not options.quiet:
            note = " (redelivered)" if method.redelivered else ""  # delivered before, never acked
            LOGGER.info("#%d received %s%s", method.delivery_tag, show(body), note)
        try:
            handled = handle(body, options)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            LOGGER.error("#%d could not be handled (%s); giving it back", method.delivery_tag, why)
            # Back to the queue (requeue=True), which counts it towards the
            # delivery limit: a message that always fails ends in pc.dead.
            channel.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
            return
        if not handled:
            return  # cut short by Ctrl-C: not acked either
        # Ack after handling, never before: now the broker may forget the message.
        if options.ack_each:  # --ack-each: the plain form, an ack for this message alone
            channel.basic_ack(delivery_tag=method.delivery_tag)
        # Our choice, for speed: one ack for a batch. multiple: it covers every delivery up to this tag,
        # each handled already (they come one at a time, in order); batch.due says when one is due.
        elif batch.due(method.delivery_tag):
            channel.basic_ack(delivery_tag=method.delivery_tag, multiple=True)

    return on_message


def handle(body: bytes, options: Options) -> bool:
    """Your work goes here. This one pretends (--work, --fail-on); False if Ctrl-C cut it short."""
    if options.fail_on is not None and options.fail_on in body:
        raise ValueError(f"--fail-on {options.fail_on.decode()!r}")
    return pretend_to_work(options.work)


class Options(NamedTuple):
    """The command line's options for the handler above, there to try the consumer out."""

    quiet: bool = False  # --quiet: no log line per message
    work: float = 0.0  # --work: seconds each message pretends to take
    fail_on: bytes | None = None  # --fail-on: fail to handle a message containing this
    ack_each: bool = False  # --ack-each: an ack per message, not one per batch


class Listening(NamedTuple):
    """What listen() set up: the channel, the ack batch, and the cancel flag."""

    channel: BlockingChannel
    batch: BatchedAcks
    cancelled: threading.Event


# Reconnection and plumbing -------------------------------------------------


def consume(url: str, options: Options) -> None:
    """Consume until STOPPING is set; reconnect if the broker goes away.

    Raises BrokerError if the first connection fails, or if we are not consuming
    again RECONNECT_FOR seconds after losing the broker (or after starting).
    """
    # Not consuming since then (None while consuming): not reset by a mere connect, as a node may answer
    # and still fail every declaration (a quorum queue without a majority of its nodes).
    down_since: float | None = time.monotonic()
    first = True
    backoff = 0.5
    while not STOPPING.is_set():
        try:
            connection = connect(url)
        except BrokerError:
            if first or time.monotonic() - down_since > RECONNECT_FOR:
                raise
            LOGGER.info("broker still unreachable; retrying in %.1f s", backoff)
            STOPPING.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            continue
        first = False
        listening: Listening | None = None
        try:
            while not STOPPING.is_set():
                CONSUMING.clear()  # nothing in hand while we declare: a signal may end us at once
                listening = listen(connection, options)
                LOGGER.info("waiting for messages on %r at %s; Ctrl-C to stop", QUEUE, connection.node)
                down_since, backoff = None, 0.5
                CONSUMING.set()
                # start_consuming() in half-second slices: between them, notice Ctrl-C (a flag) or a cancel.
                while not STOPPING.is_set() and not listening.cancelled.is_set():
                    connection.process_data_events(time_limit=0.5)
                if listening.cancelled.is_set():
                    # Messages handled but not acked went with the queue.
                    LOGGER.warning(
                        "the broker cancelled the consumer (queue %r deleted?); declaring it again", QUEUE
                    )
                    _close_channel(listening.channel)
            _close(connection, listening)
        except pika.exceptions.AMQPConnectionError as exc:
            CONSUMING.clear()
            why = _why_lost(exc)
            if down_since is not None and time.monotonic() - down_since > RECONNECT_FOR:
                # 541 INTERNAL_ERROR before consuming: RabbitMQ 3.10, a declaration that hung a minute.
                hint = "; a quorum queue without a majority of its nodes?" if _internal_error(exc) else ""
                raise BrokerError(
                    f"could not consume from {QUEUE!r} at {redact(url)} within {RECONNECT_FOR:.0f} s: "
                    f"{why}{hint}"
                ) from exc
            LOGGER.warning("lost the broker (%s); reconnecting", why)
            if down_since is not None:  # lost before consuming on it: not at once, lest we hammer the node
                STOPPING.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            down_since = down_since or time.monotonic()
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406 and "inequivalent arg" in exc.reply_text:  # listen's queue_declare
                raise BrokerError(inequivalent(exc.reply_text)) from exc
            raise


def _internal_error(exc: pika.exceptions.AMQPConnectionError) -> bool:
    return isinstance(exc, pika.exceptions.ConnectionClosedByBroker) and exc.reply_code == 541


def _why_lost(exc: pika.exceptions.AMQPConnectionError) -> str:
    """The broker's reply code and text if it closed the connection, else the kind of loss."""
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return f"the broker closed the connection: {exc.reply_code} {exc.reply_text}"
    return type(exc).__name__


def pretend_to_work(seconds: float) -> bool:
    """Stand in for real work (--work); False if Ctrl-C cut it short.

    Work much longer than the heartbeat interval belongs on another thread
    (see distop): this thread must keep pika's I/O going.
    """
    return not (seconds and STOPPING.wait(seconds))


def show(body: bytes) -> str:
    """A body as the log shows it: text as text, other bytes escaped, never raw control characters."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        # b'\xff...': repr escapes every byte that is not printable ASCII.
        shown, note = repr(body[:SHOW_AT_MOST]), ", not UTF-8"
    else:
        # repr escapes control and other unprintable characters (\x1b, \n, \u202e).
        shown, note = repr(text[:SHOW_AT_MOST]), ""
    if len(body) > SHOW_AT_MOST or note:
        shown += f" ({len(body):,} bytes{note})"
    return shown


def _close_channel(channel: BlockingChannel) -> None:
    try:
        if channel.is_open:
            channel.close()
    except pika.exceptions.AMQPError:
        pass


def _close(connection: pika.BlockingConnection, listening: Listening | None) -> None:
    """Ack what has been handled, then close; unacked messages go back to the queue."""
    try:
        if listening is not None and connection.is_open:
            listening.batch.flush()
    except pika.exceptions.AMQPError:
        pass  # then those are handled again, as after a crash
    try:
        if connection.is_open:
            connection.close()
    except pika.exceptions.AMQPError:
        pass


class Stopped(BaseException):
    """Ctrl-C or SIGTERM while not consuming. A BaseException, as KeyboardInterrupt: pika lets it through."""


def on_signal(_signum: int, _frame: object) -> None:
    """Ctrl-C or SIGTERM: while consuming, only a flag, as an exception in the middle of pika's I/O could
    leave a message in hand unsettled; otherwise nothing is in hand, and a declaration may hang for a
    minute: end now (main exits 0; the broker sees the connection go)."""
    STOPPING.set()
    if not CONSUMING.is_set():
        raise Stopped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no log line per message")
    parser.add_argument(
        "--work", type=float, default=0.0, metavar="SECONDS", help="pretend each message takes this long"
    )
    parser.add_argument(
        "--ack-each", action="store_true", help="one basic_ack per message (the textbook way; slower)"
    )
    parser.add_argument(
        "--fail-on", metavar="TEXT", help="fail to handle a message containing TEXT (to see it dead-lettered)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    if not 0 <= args.work < math.inf:  # also refuses nan
        parser.error("--work must be a number of seconds, 0 or more")
    try:
        fail_on = None if args.fail_on is None else args.fail_on.encode()
    except UnicodeEncodeError:  # the shell passed bytes that are not UTF-8
        parser.error("--fail-on: the text is not UTF-8")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    # Ctrl-C and SIGTERM (docker stop, kill): see on_signal.
    # SIGINT explicitly, too: a shell starting us in the background ignores it.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        consume(resolve(), Options(args.quiet, args.work, fail_on, args.ack_each))
    except Stopped:
        pass  # a signal while not consuming: nothing was in hand
    except BrokerError as exc:
        print(f"consumer: {exc}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPChannelError as exc:
        print(f"consumer: the broker refused: {exc}", file=sys.stderr)
        return 1
    LOGGER.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
