"""Consume the durable queue ``pc``, acknowledging each message once handled.

Pairs with pc/producer.py; either may start first, because the queue keeps
messages until a consumer acknowledges them.

    python pc/consumer.py            # Ctrl-C or SIGTERM to stop
    python pc/consumer.py --quiet    # no line per message (for benchmarks)
    python pc/consumer.py --work 2   # pretend each message takes 2 s to handle

Guarantee: at-least-once. A message is acknowledged only after it has been
handled, so a consumer that dies with messages in hand loses none of them: the
broker delivers them again (marked "redelivered") to the next consumer. The
price is that a message may be handled twice, at most PREFETCH of them per
crash. If the broker goes away, the consumer reconnects with back-off.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from pc.broker import BrokerError, broker_url, connect, redact

LOGGER = logging.getLogger("pc.consumer")

QUEUE = "pc"
# How many unacknowledged messages the broker may push to us at once. Enough
# to keep the pipe full; small enough that a crash redelivers little.
PREFETCH = 100
# After losing the broker, keep trying this long before giving up.
RECONNECT_FOR = 60.0
MAX_BACKOFF = 5.0


def decode(body: bytes) -> str:
    """Return the text of a message body; raise ValueError if malformed."""
    message = json.loads(body)
    if not isinstance(message, dict) or not isinstance(message.get("text"), str):
        raise ValueError('expected a JSON object with a string "text"')
    return message["text"]


def make_handler(quiet: bool, work: float):
    """Return the on-message callback: handle, then ack (or reject if malformed)."""

    def on_message(
        channel: BlockingChannel, method: Basic.Deliver, _props: BasicProperties, body: bytes
    ) -> None:
        try:
            text = decode(body)
        except (ValueError, RecursionError) as exc:  # json: RecursionError on deep nesting
            # Requeueing a message we can never read would loop forever.
            LOGGER.warning("#%d rejected (%d bytes): %s", method.delivery_tag, len(body), exc)
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        if not quiet:
            note = " (redelivered)" if method.redelivered else ""
            LOGGER.info("#%d received %r%s", method.delivery_tag, text, note)
        if work:
            # Stands in for real work. Work much longer than the heartbeat
            # interval belongs on another thread (see distop).
            time.sleep(work)
        channel.basic_ack(method.delivery_tag)

    return on_message


def consume(url: str, quiet: bool = False, work: float = 0.0) -> None:
    """Consume until interrupted; reconnect if the broker goes away.

    Raises BrokerError if the first connection fails or the broker stays away
    for RECONNECT_FOR seconds.
    """
    on_message = make_handler(quiet, work)
    lost_since: float | None = None
    backoff = 0.5
    while True:
        try:
            connection = connect(url)
        except BrokerError:
            if lost_since is None or time.monotonic() - lost_since > RECONNECT_FOR:
                raise
            LOGGER.info("broker still unreachable; retrying in %.1f s", backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            continue
        lost_since, backoff = None, 0.5
        try:
            channel = connection.channel()
            channel.queue_declare(QUEUE, durable=True)
            channel.basic_qos(prefetch_count=PREFETCH)
            channel.basic_consume(QUEUE, on_message)
            LOGGER.info("waiting for messages on %r at %s; Ctrl-C to stop", QUEUE, redact(url))
            channel.start_consuming()
        except pika.exceptions.AMQPConnectionError as exc:
            LOGGER.warning("lost the broker (%s); reconnecting", type(exc).__name__)
            lost_since = time.monotonic()
        except KeyboardInterrupt:
            _close(connection)
            raise


def _close(connection: pika.BlockingConnection) -> None:
    """Close quietly: unacked messages go back to the queue either way."""
    try:
        if connection.is_open:
            connection.close()
    except pika.exceptions.AMQPError:
        pass


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no log line per message")
    parser.add_argument(
        "--work", type=float, default=0.0, metavar="SECONDS", help="pretend each message takes this long"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    if args.work < 0:
        parser.error("--work must not be negative")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    # SIGTERM (docker stop, kill) stops us the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    try:
        consume(broker_url(), args.quiet, args.work)
    except BrokerError as exc:
        print(f"consumer: {exc}", file=sys.stderr)
        return 1
    except pika.exceptions.AMQPChannelError as exc:
        print(f"consumer: the broker refused: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        LOGGER.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
