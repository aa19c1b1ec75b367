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
its confirm, is the simplest form and fast enough for anyone typing. The story
comes first, below; reconnecting, heartbeats while idle, a broker that blocks
publishers and Ctrl-C are in sender_plumbing.py.

What goes wrong, and what the code does (the except clauses of Sender.send; docs/pikachat.md has
the whole table, with its tests):

    nobody listens (basic.return)       a WARNING "reached no one"; not a failure
    the broker refuses it (basic.nack)  an ERROR line; never sent again; exit 1 at the end
    the channel closed (exchange gone)  an ERROR line; the next line opens a channel, declares again
    the broker lost                     an ERROR line; the next line reconnects
    the broker blocks publishers        waits up to the blocked-connection timeout, then exit 1
    no broker at start                  one line, exit 1
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
from pikachat.broker import BrokerError, Connection, close_quietly, connect, explain, redact, resolve
from pikachat.cli import Lines, parse_arguments, setup_logging
from pikachat.message import EXCHANGE, Message, encode

LOGGER = logging.getLogger("pikachat.send")

# The story, in the order it happens: main, at the end, calls Sender.open, which runs open_channel;
# then send_lines calls Sender.send for each line typed.

# Not persistent (Transient): every queue bound to the exchange is a receiver's temporary
# queue, gone after a broker restart anyway; writing the line to disk would keep nothing.
PROPERTIES = pika.BasicProperties(content_type="application/json", delivery_mode=pika.DeliveryMode.Transient)


def open_channel(url: str) -> tuple[Connection, BlockingChannel]:
    """Connect, turn on publisher confirms and declare the exchange; raise BrokerError if refused."""
    connection = connect(url)
    try:
        channel = connection.channel()
        # Publisher confirms: from now on basic_publish waits until the broker has taken the message.
        channel.confirm_delivery()
        # fanout: copy each message into every queue bound to the exchange (no routing key needed).
        # Both sides declare it, so whoever starts first creates it; durable: it outlives a restart.
        channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
    except pika.exceptions.AMQPChannelError as exc:  # e.g. an exchange "pikachat" of another type
        close_quietly(connection)
        raise BrokerError(f"the broker at {redact(url)} refused: {exc}") from exc
    except pika.exceptions.AMQPConnectionError as exc:
        close_quietly(connection)
        raise explain(url, exc) from exc
    return connection, channel


class Sender:
    """Publishes chat messages as ``name``, each confirmed by the broker; use it from one thread."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.id = uuid.uuid4().hex  # in every message: lets chat.py skip its own lines
        # The connection and channel that open_channel gives, opened again when lost (sender_plumbing.py).
        self.plumbing = plumbing.SenderPlumbing(url, open_channel)
        self.url = self.plumbing.url  # with blocked_connection_timeout set: see SenderPlumbing.publishing

    def open(self) -> None:
        """open_channel, above; raise BrokerError if the broker cannot be reached or refuses."""
        self.plumbing.open()

    def send(self, text: str, kind: str = "say") -> bool:
        """Publish one message and wait for its confirm; return False (logged) if it was not sent.

        Raises BlockedTooLongError if the broker blocked it past the blocked-connection timeout.
        """
        what = plumbing.preview(text) if kind == "say" else f"the {kind} notice"
        body = encode(Message(kind, self.name, self.id, text, time.time()))
        try:
            # The plumbing (sender_plumbing.py): a channel, opened again if lost since the last line; it
            # also ends a publish blocked too long (BlockedTooLongError) and handles a second Ctrl-C.
            with self.plumbing.publishing(what) as channel:
                # mandatory: with no queue bound, the broker returns the message (basic.return) before
                # it confirms, and pika raises UnroutableError; without it, the line would vanish silently.
                channel.basic_publish(EXCHANGE, "", body, PROPERTIES, mandatory=True)
        # The broker's answers, but for the confirm itself (under else, below). The order matters: pika's
        # UnroutableError and NackError are AMQPChannelErrors too, though the channel stays open.
        except pika.exceptions.UnroutableError:  # returned (basic.return): no queue bound, nobody listens
            LOGGER.warning("%s reached no one: nobody is listening", what)
            return True
        except pika.exceptions.NackError:  # nacked (basic.nack): the broker refused it; the channel is fine
            why = "the broker refused it"
        except pika.exceptions.AMQPChannelError as exc:  # the channel closed, e.g. the exchange was deleted
            self.plumbing.drop()  # the next line opens a channel and declares the exchange again
            why = f"the broker closed the channel: {exc}"
        except pika.exceptions.AMQPConnectionError as exc:  # the connection lost, before or after the confirm
            self.plumbing.drop()  # the next line reconnects
            why = f"lost the broker ({type(exc).__name__})"
        # Not an answer from the broker: the plumbing's, in one exception (SenderPlumbing.publishing).
        except plumbing.NotSentError as exc:  # reconnecting failed, or a second Ctrl-C cut the wait
            why = str(exc)
        else:  # basic_publish returned: the broker routed it to every bound queue and confirmed (basic.ack)
            return True
        # Not sent, or not known to be: never sent again, since it would show
        # twice if the first copy went out. Reported instead.
        LOGGER.error("could not send %s: %s", what, why)
        return False

    def keep_alive(self) -> None:
        """Idle: answer heartbeats, notice a lost broker and reconnect (sender_plumbing.py)."""
        self.plumbing.keep_alive()

    def close(self) -> None:
        self.plumbing.close()


def send_lines(sender: Sender, lines: Lines) -> int:
    """Send each line you type until the input ends; return how many could not be sent."""
    failed = 0
    for line in lines:  # each non-blank line typed (cli.py reads and decodes stdin), or None when idle
        if line is None:
            sender.keep_alive()
        elif not sender.send(line):
            failed += 1
    return failed


# The plumbing: arguments, signals, exit status.


def main() -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], with_name=True)
    setup_logging(args.verbose)
    lines = Lines()
    try:
        sender = Sender(resolve(args.rabbit_host), args.name)
        # Ctrl-C: the first finishes the line in hand, a second stops at once (sender_plumbing.py).
        plumbing.stop_on_signals(lines, sender.plumbing)
        sender.open()
    except BrokerError as exc:
        print(f"send: {exc}", file=sys.stderr)
        return 1
    except plumbing.SecondSignalError:
        return 0
    LOGGER.info(
        "sending to exchange %r at %s as %s; one message per line, Ctrl-D to end",
        EXCHANGE,
        sender.plumbing.node,
        sender.name,
    )
    try:
        failed = send_lines(sender, lines)
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
