"""The exceptions distop raises, all derived from DistOpError; printable(), how they show network text."""

from __future__ import annotations


class DistOpError(Exception):
    """Base class of every error raised by distop."""


class BrokerError(DistOpError):
    """The broker is unreachable, refused us, went away, or its URL is invalid."""


class RemoteError(DistOpError):
    """A server's op raised; carries the remote exception's type, message and host."""

    def __init__(self, exc_type: str, message: str, host: str) -> None:
        # Shown escaped: they come from the network, and a newline or an escape code would forge output.
        super().__init__(printable(f"{exc_type} on {host}: {message}"))
        self.exc_type = exc_type
        self.message = message
        self.host = host


class PoisonChunkError(DistOpError):
    """A chunk was dead-lettered instead of processed (delivery limit reached, or rejected)."""


def printable(text: str) -> str:
    """``text`` with what a terminal would act on (newlines, escape codes) escaped as repr() does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
