"""Chat in one terminal: type to talk, and see what everyone else says.

receive.py and send.py in one program. Start as many as you like, in any order:

    python pikachat/chat.py [RABBIT_HOST] [--name NAME]        # Ctrl-D or Ctrl-C to leave
    printf 'hi all\\n' | python pikachat/chat.py --name ash     # says its lines, then leaves

The lesson: with pika, a program that both consumes and publishes needs two
BlockingConnections, one per thread; it binds its queue before it says "joined"
(everyone sees "* ash joined", and "* ash left" at the end); and it skips its
own lines, which the fanout exchange copies back to it. The story is
hear_others() and chat(), below: each pika call is made by a story function of
receive.py or send.py, named where it is called. The receiving thread's
mechanics are below the story.

Guarantees: those of receive.py (nothing from before you joined; each line at
most once and in order while you are there) and send.py (a line is sent when
the broker confirms it; one it could not send is reported, never retried).
Exit status 0 when you leave, 1 if the broker cannot be reached at start or a
line could not be sent.

What goes wrong, and what the code does: what receive.py and send.py do (their docstrings have
the tables), plus one case of its own: the receiving thread fails (the broker refuses the exchange
or our queue): ReceivingThread ends the input, chat() raises its error, one line, exit 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import partial
from threading import Event, Thread

from pika.adapters.blocking_connection import BlockingChannel

from pikachat import sender_plumbing as plumbing
from pikachat.broker import BrokerError, resolve
from pikachat.cli import Lines, parse_arguments, setup_logging
from pikachat.message import EXCHANGE, Message, render
from pikachat.receive import Listener, subscribe
from pikachat.send import Sender, send_lines
from pikachat.terminal import open_terminal

LOGGER = logging.getLogger("pikachat.chat")

# The story, in the order it happens, on two threads with a BlockingConnection each: pika's rule (not
# RabbitMQ's) is that a connection is used only by the thread that opened it, and the receiving one spends
# its life in start_consuming().


def hear_others(
    channel: BlockingChannel, my_id: str, print_line: Callable[[str], None], bound: Event
) -> None:
    """On the receiving thread, at each (re)connection: our own queue, bound to the exchange, consumed."""

    def show(message: Message) -> None:
        # The fanout exchange copies our own lines into our queue too: skip them by sender id.
        if message.sender_id != my_id:
            print_line(render(message))

    # receive.py's subscribe: exchange_declare(fanout), queue_declare("", exclusive=True, auto_delete=True),
    # queue_bind(queue, exchange), basic_consume(auto_ack=True); Listener then runs start_consuming().
    subscribe(channel, show)
    bound.set()  # from now on, every line published to the exchange reaches our queue


def chat(sender: Sender, lines: Lines, print_line: Callable[[str], None]) -> int:
    """Listen, join, send ``lines``, leave; return how many lines could not be sent.

    Raises BrokerError if the broker cannot be reached at start, or refuses
    the exchange or our queue later.
    """
    bound = Event()
    # Connection 1, on a thread of its own: receive.py's Listener connects, opens a channel and calls
    # hear_others; if the broker goes away, it reconnects and calls hear_others again.
    listener = Listener(sender.url, partial(hear_others, my_id=sender.id, print_line=print_line, bound=bound))
    receiving = ReceivingThread(listener, on_failure=lines.stop)  # listener.run() there; a refusal ends input
    try:
        # Bind before saying "joined": a line published before queue_bind never reaches our queue.
        if not receiving.wait(bound, given_up=lambda: lines.stopped):
            return 0  # Ctrl-C before we were bound
        # Connection 2, this thread's, to publish on: send.py's open_channel, with confirm_delivery()
        # and exchange_declare(fanout).
        sender.open()
        # basic_publish(mandatory=True), then the broker's confirm: everyone else sees "* ash joined".
        sender.send("", kind="join")
        LOGGER.info(
            "joined %r at %s as %s; type a line to send it, Ctrl-D to leave",
            EXCHANGE,
            sender.plumbing.node,
            sender.name,
        )
        failed = send_lines(sender, lines)  # send.py: the same publish for each line typed, until Ctrl-D
        receiving.check()  # raise the BrokerError that ended the receiving thread, if any
        if not lines.hurry:  # a second Ctrl-C: no goodbye
            sender.send("", kind="leave")
        return failed
    finally:
        sender.close()  # connection 2
        # Connection 1: Listener.stop asks its thread, by add_callback_threadsafe (the one call another
        # thread may make on a connection), to stop_consuming(); that thread then closes it.
        receiving.stop()


# The plumbing: the receiving thread, arguments, the terminal, signals, exit status.


class ReceivingThread:
    """``listener.run()`` on a thread of its own; if it fails, ``on_failure()``, and ``check()`` raises."""

    def __init__(self, listener: Listener, on_failure: Callable[[], None]) -> None:
        self._listener = listener
        self._failure: BrokerError | None = None
        self._thread = Thread(target=self._run, args=(on_failure,), name="receive")
        self._thread.start()

    def _run(self, on_failure: Callable[[], None]) -> None:
        try:
            self._listener.run()
        except BrokerError as exc:
            self._failure = exc
            on_failure()
        except Exception as exc:  # a bug: end the chat with one line, rather than leave it deaf
            LOGGER.debug("the receiving thread failed", exc_info=exc)
            self._failure = BrokerError(f"the receiving thread failed: {type(exc).__name__}: {exc}")
            on_failure()

    def check(self) -> None:
        """Raise the BrokerError that ended the thread, if any."""
        if self._failure is not None:
            raise self._failure

    def wait(self, event: Event, given_up: Callable[[], bool]) -> bool:
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
