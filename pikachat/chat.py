"""Chat in one terminal: type to talk, and see what everyone else says.

pikachat/receive.py and pikachat/send.py in one program. Start as many as you
like, in any order:

    python pikachat/chat.py [RABBIT_HOST] [--name NAME]        # Ctrl-D or Ctrl-C to leave
    printf 'hi all\\n' | python pikachat/chat.py --name ash     # says its lines, then leaves

The lesson: one program that both consumes and publishes uses two
connections, one per thread; it binds its queue before it says "joined", so
that it hears every answer; and since the fanout exchange copies its own
lines back to it too, it skips them by the sender id each message carries.
Everyone sees "* ash joined" when you arrive and "* ash left" when you go.

Guarantees: those of receive.py (nothing from before you joined, each line
at most once and in order while you are there) and send.py (a line is sent
when the broker confirms it; one it could not send is reported, never
retried). Exit status 0 when you leave, 1 if the broker cannot be reached at
start or a line could not be sent.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pikachat.broker import BrokerError, redact, resolve
from pikachat.cli import Lines, parse_arguments, setup_logging
from pikachat.message import EXCHANGE, Message, render
from pikachat.receive import Listener
from pikachat.send import Sender
from pikachat.sender_plumbing import BlockedTooLongError, SecondSignalError, send_lines, stop_on_signals
from pikachat.terminal import Terminal

LOGGER = logging.getLogger("pikachat.chat")


# The pika calls are receive.py's and send.py's, made in this order (read those first;
# tests/test_pikachat.py checks that each line below is still in them):
#
#   the receiving thread, on a connection of its own: subscribe() and Listener, in receive.py
#       channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
#       queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
#       channel.queue_bind(queue, EXCHANGE)
#       channel.basic_consume(queue, partial(deliver, on_message), auto_ack=True)
#       channel.start_consuming()
#   this thread, on another connection: open_channel(), in send.py
#       channel.confirm_delivery()
#       channel.exchange_declare(EXCHANGE, exchange_type="fanout", durable=True)
#   then for "joined", each line and "left": publish(), in send.py
#       channel.basic_publish(EXCHANGE, "", encode(message), PROPERTIES, mandatory=True)
def chat(sender: Sender, lines: Lines, print_line: Callable[[str], None]) -> int:
    """Listen, join, send ``lines``, leave; return how many lines could not be sent.

    Raises BrokerError if the broker cannot be reached at start, or refuses
    the exchange or our queue later.
    """

    def show(message: Message) -> None:
        # The exchange copies our own lines into our queue too: skip them.
        if message.sender_id != sender.id:
            print_line(render(message))

    # Receiving gets a thread and a connection of its own: a BlockingConnection belongs to
    # the thread that opened it, and a thread waiting for deliveries cannot wait for typing.
    listener = Listener(sender.url, show)
    listener.start(on_failure=lines.stop)  # on its thread: connect, subscribe(), start_consuming()
    try:
        # Bind our queue before saying "joined", so that every answer to it is heard.
        if not listener.wait_ready(given_up=lambda: lines.stopped):
            return 0
        sender.open()  # open_channel(): confirms on, the exchange declared
        sender.send("", kind="join")  # publish(): mandatory, and wait for the broker's confirm
        LOGGER.info(
            "joined %r at %s as %s; type a line to send it, Ctrl-D to leave",
            EXCHANGE,
            redact(sender.url),
            sender.name,
        )
        failed = send_lines(sender.send, sender.keep_alive, lines)
        listener.check()  # did receiving fail for good?
        if not lines.hurry:  # a second Ctrl-C: no goodbye
            sender.send("", kind="leave")
        return failed
    finally:
        sender.close()
        listener.join()


# The plumbing: arguments, the terminal, signals, exit status.


def print_now(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], with_name=True)
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
        sender = Sender(resolve(args.rabbit_host), args.name)
        stop_on_signals(lines, sender)
        failed = chat(sender, lines, terminal.print_above if terminal else print_now)
    except BrokerError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return 1
    except BlockedTooLongError as exc:
        LOGGER.error("%s", exc)
        return 1
    except SecondSignalError:
        return 0
    finally:
        if terminal:
            terminal.close()
    if failed:
        LOGGER.error("%d line(s) could not be sent", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
