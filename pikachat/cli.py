"""The command-line plumbing of pikachat's scripts: arguments, logging, signals, and the lines you type.

Nothing here is about RabbitMQ; send.py, receive.py and chat.py keep their
RabbitMQ story and use this for the rest.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import queue
import random
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

from pikachat.message import MAX_NAME, MAX_TEXT

LOGGER = logging.getLogger(__name__)

NAME = re.compile(rf"[\w.-]{{1,{MAX_NAME}}}")
POKEMON = (
    "pikachu", "bulbasaur", "charmander", "squirtle", "jigglypuff", "meowth", "psyduck", "snorlax",
    "eevee", "togepi", "gengar", "vulpix", "magikarp", "slowpoke", "mewtwo", "onix",
)  # fmt: skip
# How often an idle sender serves its connection (heartbeats, noticing a
# lost broker); also how soon it notices Ctrl-C.
IDLE = 0.5
# A line from stdin is cut here, the rest of it dropped, so that memory stays bounded without a line ending.
MAX_LINE = 64 * 1024


def parse_arguments(description: str, with_name: bool) -> argparse.Namespace:
    """RABBIT_HOST, -v, and --name if ``with_name``; bad arguments exit with status 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("rabbit_host", nargs="?", metavar="RABBIT_HOST", help="host name or amqp(s):// URL")
    if with_name:
        parser.add_argument("--name", type=chat_name, help="your name in the chat (default: a random one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pika's debug output")
    args = parser.parse_args()
    if with_name and not args.name:
        args.name = random_name()
    return args


def random_name() -> str:
    return f"{random.choice(POKEMON)}{random.randint(1, 99)}"


def chat_name(value: str) -> str:
    """argparse type for --name."""
    if not NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"a name is 1 to {MAX_NAME} letters, digits, '_', '.' or '-'")
    return value


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        # pika logs expected disconnections as errors, with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)


def on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop()`` on the first Ctrl-C or SIGTERM (docker stop, kill); ignore the ones after.

    ``stop`` only asks, and the loops check: an exception raised in the middle
    of pika's I/O could leave the connection stuck. (The sender's second Ctrl-C
    is the one exception: see stop_on_signals in sender_plumbing.py.)
    """
    stopping: list[bool] = []

    def handler(_signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append(True)
            stop()

    # SIGINT explicitly, too: a shell starting us in the background ignores it.
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class Lines:
    """The lines typed or piped on stdin, read on a thread of their own.

    Iterating yields each non-blank line without its line ending, cut to
    MAX_TEXT characters (the longest chat message), and None whenever
    IDLE seconds pass without one: a BlockingConnection answers heartbeats
    only while it is called, so the caller's thread must not sit in a read.
    Iteration ends at end of input or soon after ``stop()``.
    """

    _EOF = object()

    def __init__(self, source: Callable[[], Iterable[str]] | None = None) -> None:
        """Read stdin as it comes, or the lines that ``source()`` gives (a terminal's, say)."""
        # Bounded, so that a huge pipe is read no faster than it is sent.
        self._queue: queue.Queue[object] = queue.Queue(maxsize=100)
        self.stopped = False
        self.hurry = False  # a second Ctrl-C: stop without another word to the broker
        threading.Thread(target=self._read, args=(source or read_stdin,), name="stdin", daemon=True).start()

    def _read(self, source: Callable[[], Iterable[str]]) -> None:
        for line in source():
            self._queue.put(line)
        self._queue.put(self._EOF)

    def stop(self) -> None:
        """End the iteration within IDLE seconds; safe in a signal handler."""
        self.stopped = True

    def __iter__(self) -> Iterator[str | None]:
        while not self.stopped:
            try:
                line = self._queue.get(timeout=IDLE)
            except queue.Empty:
                yield None
                continue
            if line is self._EOF:
                return
            assert isinstance(line, str)
            if not line.strip():
                continue  # a blank line is not worth a message
            if len(line) > MAX_TEXT:
                LOGGER.warning("line of %d characters cut to %d", len(line), MAX_TEXT)
            yield line[:MAX_TEXT]


def read_stdin() -> Iterator[str]:
    """Each line on stdin, without its line ending; of a very long one, its first MAX_LINE characters."""
    # os.read rather than sys.stdin: a daemon thread blocked inside a
    # buffered file can abort the interpreter at exit.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    skipping = False  # in the rest of a line too long to hold: dropped up to its end
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            chunk = b""
        text = decoder.decode(chunk, final=not chunk)
        if skipping and "\n" in text:
            text, skipping = text.split("\n", 1)[1], False
        if not skipping:
            *lines, pending = (pending + text).split("\n")
            if len(pending) > MAX_LINE:  # memory stays bounded; the line is cut to MAX_TEXT anyway
                lines, pending, skipping = [*lines, pending], "", True
            for line in lines:
                yield line.removesuffix("\r")
        if not chunk:
            break
    if pending:
        yield pending
