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

import logging
import sys
import time
import uuid

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from pikachat import sender_plumbing as plumbing
from pikachat.broker import BrokerError, close_quietly, connect, explain, redact, resolve
from pikachat.cli import Lines, parse_arguments, setup_logging
from pikachat.message import EXCHANGE, Message, encode

LOGGER = logging.getLogger("pikachat.send")

# Not persistent (Transient): every queue bound to the exchange is a receiver's temporary
# queue, gone after a broker restart anyway; writing the line to disk would keep nothing.
PROPERTIES = pika.BasicProperties(content_type="application/json", delivery_mode=pika.DeliveryMode.Transient)


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


class Sender(plumbing.SenderPlumbing):
    """Publish chat messages as ``name``, each confirmed by the broker; use it from one thread.

    SenderPlumbing (sender_plumbing.py) keeps the channel that open_channel
    gives: ``open()``, ``keep_alive()`` while idle, reconnecting after a lost
    broker, ``close()``. ``send()`` publishes and says what became of each line.
    """

    def __init__(self, url: str, name: str) -> None:
        super().__init__(url, open_channel)
        self.name = name
        self.id = uuid.uuid4().hex  # lets chat.py tell its own messages from others'

    def send(self, text: str, kind: str = "say") -> bool:
        """Publish one message and wait for its confirm; return False (logged) if it was not sent.

        Raises BlockedTooLongError if the broker blocked it past the blocked-connection timeout
        (a broker short of memory or disk blocks publishers; sender_plumbing.py says so at once).
        """
        what = self.in_hand = plumbing.preview(text) if kind == "say" else f"the {kind} notice"
        try:
            with self.channel() as channel:  # the plumbing reconnects first if the broker was lost
                publish(channel, Message(kind, self.name, self.id, text, time.time()))
        except pika.exceptions.UnroutableError:  # mandatory: the broker returned it, no queue was bound
            LOGGER.warning("%s reached no one: nobody is listening", what)
            return True
        except pika.exceptions.NackError:  # the confirm was a nack
            why = "the broker refused it"
        except plumbing.NOT_SENT as exc:  # channel, connection or broker lost, or a second Ctrl-C
            why = plumbing.why_not_sent(exc)
        else:
            return True
        # Not sent, or not known to be: never sent again, since it would show
        # twice if the first copy went out. Reported instead.
        LOGGER.error("could not send %s: %s", what, why)
        return False


# The plumbing: arguments, signals, exit status.


def main() -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], with_name=True)
    setup_logging(args.verbose)
    lines = Lines()
    try:
        sender = Sender(resolve(args.rabbit_host), args.name)
        plumbing.stop_on_signals(lines, sender)
        sender.open()
    except BrokerError as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 1
    except plumbing.SecondSignalError:
        return 0
    LOGGER.info(
        "sending to exchange %r at %s as %s; one message per line, Ctrl-D to end",
        EXCHANGE,
        redact(sender.url),
        sender.name,
    )
    try:
        failed = plumbing.send_lines(sender.send, sender.keep_alive, lines)
    except plumbing.BlockedTooLongError as exc:
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
