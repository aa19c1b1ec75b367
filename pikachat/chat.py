"""Chat in one terminal: type to talk, and see what everyone else says.

receive.py and send.py in one program. Start as many as you like, in any order:

    python pikachat/chat.py [RABBIT_HOST] [--name NAME]        # Ctrl-D or Ctrl-C to leave
    printf 'hi all\\n' | python pikachat/chat.py --name ash     # says its lines, then leaves

The lesson: a program that both consumes and publishes needs two
BlockingConnections, one per thread; it binds its queue before it says "joined"
(everyone sees "* ash joined", and "* ash left" at the end); and it skips its
own lines, which the fanout exchange copies back to it. The story is chat(),
below, whose map names every pika call, made through receive.py and send.py.

Guarantees: those of receive.py (nothing from before you joined; each line at
most once and in order while you are there) and send.py (a line is sent when
the broker confirms it; one it could not send is reported, never retried).
Exit status 0 when you leave, 1 if the broker cannot be reached at start or a
line could not be sent.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from pika.adapters.blocking_connection import BlockingChannel

from pikachat import sender_plumbing as plumbing
from pikachat.broker import BrokerError, redact, resolve
from pikachat.cli import Lines, parse_arguments, setup_logging
from pikachat.message import EXCHANGE, Message, render
from pikachat.receive import Listener, subscribe
from pikachat.send import Sender, send_lines
from pikachat.terminal import open_terminal

LOGGER = logging.getLogger("pikachat.chat")


def chat(sender: Sender, lines: Lines, print_line: Callable[[str], None]) -> int:
    """Listen, join, send ``lines``, leave; return how many lines could not be sent.

    Two threads, each with a BlockingConnection of its own, in this order:
      receiving  Listener.run (receive.py)  connect, then on_channel(): subscribe, and set ``bound``
      receiving  subscribe (receive.py)     queue_declare("", exclusive), queue_bind, basic_consume
      receiving  Listener.run               start_consuming(): show() for each line that arrives
      this one   receiving.wait(bound)      our queue is bound: from now on we hear every line
      this one   sender.open()              confirm_delivery(), exchange_declare (send.py's open_channel)
      this one   sender.send(join)          basic_publish(mandatory=True), then wait for the confirm
      this one   send_lines (send.py)       the same for each line typed, until Ctrl-D
      this one   sender.send(leave)         then both connections close

    Raises BrokerError if the broker cannot be reached at start, or refuses
    the exchange or our queue later.
    """

    def show(message: Message) -> None:
        # The fanout exchange copies our own lines into our queue too: skip them by sender id.
        if message.sender_id != sender.id:
            print_line(render(message))

    bound = threading.Event()  # set once our queue is bound to the exchange

    def on_channel(channel: BlockingChannel) -> None:  # on the receiving thread, at each (re)connection
        # receive.py's subscribe: the fanout exchange, an exclusive server-named queue, bound, consumed.
        subscribe(channel, show)
        bound.set()  # from now on, every message published to the exchange reaches us

    # A BlockingConnection belongs to the thread that opened it, and the receiving one sits in
    # start_consuming(): Listener (receive.py) connects, calls on_channel and consumes on a thread of its own.
    receiving = ReceivingThread(Listener(sender.url, on_channel), on_failure=lines.stop)
    try:
        # Bind before saying "joined", so that every answer to it is heard.
        if not receiving.wait(bound, given_up=lambda: lines.stopped):
            return 0  # Ctrl-C before we were bound
        sender.open()  # this thread's connection, with confirms on and the exchange declared
        sender.send("", kind="join")  # everyone else sees "* ash joined"
        LOGGER.info(
            "joined %r at %s as %s; type a line to send it, Ctrl-D to leave",
            EXCHANGE,
            redact(sender.url),
            sender.name,
        )
        failed = send_lines(sender, lines)
        receiving.check()  # raise the BrokerError that ended the receiving thread, if any
        if not lines.hurry:  # a second Ctrl-C: no goodbye
            sender.send("", kind="leave")
        return failed
    finally:
        sender.close()
        receiving.stop()  # stop_consuming() on the receiving thread, which then closes its connection


# The plumbing: the receiving thread, arguments, the terminal, signals, exit status.


class ReceivingThread:
    """``listener.run()`` on a thread of its own; if it fails, ``on_failure()``, and ``check()`` raises."""

    def __init__(self, listener: Listener, on_failure: Callable[[], None]) -> None:
        self._listener = listener
        self._failure: BrokerError | None = None
        self._thread = threading.Thread(target=self._run, args=(on_failure,), name="receive")
        self._thread.start()

    def _run(self, on_failure: Callable[[], None]) -> None:
        try:
            self._listener.run()
        except BrokerError as exc:
            self._failure = exc
            on_failure()

    def check(self) -> None:
        """Raise the BrokerError that ended the thread, if any."""
        if self._failure is not None:
            raise self._failure

    def wait(self, event: threading.Event, given_up: Callable[[], bool]) -> bool:
        """Wait until ``event`` is set (True) or ``given_up()`` (False); raise the thread's BrokerError."""
        while not event.wait(0.1):
            self.check()
            if given_up():
                return False
        return True

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._listener.stop()
        self._thread.join()


def main() -> int:
    args = parse_arguments(__doc__.split("\n\n")[0], with_name=True)
    setup_logging(args.verbose)
    # A terminal that cannot show a character gets a "?", not a crash.
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    terminal = open_terminal()  # None when piped
    lines = Lines(terminal.lines if terminal else None)
    try:
        sender = Sender(resolve(args.rabbit_host), args.name)
        plumbing.stop_on_signals(lines, sender.plumbing)
        failed = chat(sender, lines, terminal.print_above if terminal else print_now)
    except BrokerError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return 1
    except plumbing.BlockedTooLongError as exc:
        LOGGER.error("%s", exc)
        return 1
    except plumbing.SecondSignalError:
        return 0
    finally:
        if terminal:
            terminal.close()
    if failed:
        LOGGER.error("%d line(s) could not be sent", failed)
        return 1
    return 0


def print_now(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
