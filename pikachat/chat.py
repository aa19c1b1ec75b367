"""Chat in one terminal: type to talk, and see what everyone else says.

pikachat/receive.py and pikachat/send.py in one program. Start as many as you
like, in any order:

    python pikachat/chat.py [RABBIT_HOST] [--name NAME]        # Ctrl-D or Ctrl-C to leave
    printf 'hi all\\n' | python pikachat/chat.py --name ash     # says its lines, then leaves

Everyone sees "* ash joined" when you arrive and "* ash left" when you go.
Your own lines are not echoed back: your terminal already shows what you
typed. Other people's lines print as they come; in a terminal, above the
line you are typing, which stays as you left it (pikachat/terminal.py).

Receiving runs on a thread of its own, with a connection of its own: a pika
BlockingConnection belongs to the thread that made it, and a thread waiting
for deliveries cannot also wait for your typing. The two threads share
nothing but the stop signal.

Guarantees: those of receive.py (nothing from before you joined, each line
at most once and in order while you are there) and send.py (a line is sent
when the broker confirms it; one it could not send is reported, never
retried). Exit status 0 when you leave, 1 if the broker cannot be reached at
start or a line could not be sent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable

from pikachat.broker import BrokerError, redact, resolve
from pikachat.message import EXCHANGE, Message, render
from pikachat.receive import Listener
from pikachat.send import (
    BlockedTooLongError,
    Lines,
    SecondSignalError,
    Sender,
    chat_name,
    random_name,
    send_lines,
    setup_logging,
    stop_on_signals,
)
from pikachat.terminal import Terminal

LOGGER = logging.getLogger("pikachat.chat")


def chat(sender: Sender, lines: Lines, print_line: Callable[[str], None] | None = None) -> int:
    """Listen, join, send ``lines``, leave; return the exit status.

    Raises BrokerError if the broker cannot be reached at start, or refuses
    the exchange or our queue later.
    """

    def show(message: Message) -> None:
        if message.sender_id != sender.id:
            (print_line or print_now)(render(message))

    listener = Listener(sender.url, show)
    failure: list[BrokerError] = []

    def listen() -> None:
        try:
            listener.run()
        except BrokerError as exc:
            failure.append(exc)
            lines.stop()

    receiving = threading.Thread(target=listen, name="receive")
    receiving.start()
    try:
        # Listen before joining, so that every answer to "joined" is heard.
        while not listener.ready.wait(0.1):
            if failure:
                raise failure[0]
            if lines.stopped:
                return 0
        try:
            sender.open()
        except SecondSignalError:
            return 0
        sender.send("", kind="join")
        LOGGER.info(
            "joined %r at %s as %s; type a line to send it, Ctrl-D to leave",
            EXCHANGE,
            redact(sender.url),
            sender.name,
        )
        try:
            failed = send_lines(sender, lines)
        except BlockedTooLongError as exc:
            LOGGER.error("%s", exc)
            return 1
        if failure:
            raise failure[0]
        if not lines.hurry:
            sender.send("", kind="leave")
        if failed:
            LOGGER.error("%d line(s) could not be sent", failed)
            return 1
        return 0
    finally:
        sender.close()
        listener.stop()
        receiving.join()


def print_now(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rabbit_host", nargs="?", metavar="RABBIT_HOST", help="host name or amqp(s):// URL")
    parser.add_argument("--name", type=chat_name, help="your name in the chat (default: a random one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    setup_logging(args.verbose)
    # A terminal that cannot show a character gets a "?", not a crash.
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]

    terminal = None
    if sys.stdin.isatty() and sys.stdout.isatty():
        terminal = Terminal()
        # The log, too, goes above the line being typed.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(terminal.writer(sys.stderr))
    lines = Lines(terminal.lines if terminal else None)
    try:
        sender = Sender(resolve(args.rabbit_host), args.name or random_name())
        stop_on_signals(lines, sender)
        return chat(sender, lines, terminal.print_above if terminal else None)
    except BrokerError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return 1
    finally:
        if terminal:
            terminal.close()


if __name__ == "__main__":
    sys.exit(main())
