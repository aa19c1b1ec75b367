"""Typing in a terminal while lines arrive: chat.py's screen plumbing.

Nothing here is about RabbitMQ. In a terminal, chat.py reads what you type
with readline (line editing, history), and prints each line that arrives
above the line you are typing, then draws that line again: without this,
``hi ash, half-typed14:22:31 ash: are you there?``. Piped input is read as
it is, without any of this.

Limit: the line being typed is drawn again with the cursor at its end, so a
line that arrives while the cursor is in the middle of what you typed moves
the cursor to the end on screen (readline still edits where you were; the
next key press that redraws, such as Ctrl-L, puts it back). Lines longer
than the terminal is wide are not redrawn above their first row.
"""

from __future__ import annotations

import contextlib
import logging
import readline
import sys
import termios
import threading
from collections.abc import Iterator
from typing import TextIO

PROMPT = "> "
# Carriage return, then erase the whole row: the prompt and what was typed.
ERASE_ROW = "\r\x1b[2K"


def open_terminal() -> Terminal | None:
    """A Terminal when stdin and stdout are one, the log too printed above the typing; else None."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    terminal = Terminal()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(terminal.writer(sys.stderr))
    return terminal


class Terminal:
    """Read typed lines with readline, and print other lines above the one being typed.

    Use ``lines()`` on one thread and ``print_above()`` from any; call
    ``close()`` at the end to give the shell its terminal back as it was.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._typing = False  # the prompt is on screen
        self._saved = termios.tcgetattr(sys.stdin.fileno())
        readline.parse_and_bind("set enable-bracketed-paste off")

    def lines(self) -> Iterator[str]:
        """Each line typed, until Ctrl-D on an empty line."""
        while True:
            with self._lock:
                self._typing = True
            try:
                line = input(PROMPT)
            except EOFError:
                line = None
            with self._lock:
                self._typing = False
                if line is None:  # Ctrl-D: the prompt goes
                    sys.stdout.write(ERASE_ROW)
                    sys.stdout.flush()
                    return
            yield line

    def print_above(self, text: str, stream: TextIO | None = None) -> None:
        """Print ``text`` (one line) above the line being typed, and draw that line again."""
        stream = stream or sys.stdout
        with self._lock:
            if not self._typing:
                print(text, file=stream, flush=True)
                return
            sys.stdout.write(ERASE_ROW)
            sys.stdout.flush()
            print(text, file=stream, flush=True)
            sys.stdout.write(PROMPT + readline.get_line_buffer())
            sys.stdout.flush()

    def writer(self, stream: TextIO) -> Above:
        """A file-like object that prints each whole line written to it above the typing."""
        return Above(self, stream)

    def close(self) -> None:
        """Erase a half-typed line and restore the terminal's settings."""
        with self._lock:
            if self._typing:
                sys.stdout.write(ERASE_ROW)
                sys.stdout.flush()
                self._typing = False
        with contextlib.suppress(termios.error):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)


class Above:
    """What is written here goes to ``stream`` above the line being typed, a whole line at a time."""

    def __init__(self, terminal: Terminal, stream: TextIO) -> None:
        self._terminal = terminal
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._terminal.print_above(line, self._stream)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
