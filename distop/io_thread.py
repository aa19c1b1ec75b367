"""Plumbing for the client's I/O thread (distop/dist_op.py): a guard for its pika callbacks.

pika takes an exception escaping a callback for a lost connection (it reconnects, and every pending
chunk is published again) or ends its loop (and ``get_result()`` would wait forever). So each
callback of ``_ClientLink`` is wrapped: a bug in it fails the pending jobs instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from distop.errors import DistOpError
from distop.protocol import error_text

LOGGER = logging.getLogger("distop.dist_op")


class _GivesUp(Protocol):
    def _give_up(self, error: DistOpError) -> None: ...


def guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Wrap an I/O-thread callback: a bug in it fails the pending jobs instead of the connection."""

    @functools.wraps(method)
    def wrapper(self: _GivesUp, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:
            LOGGER.exception("unexpected error in the client's I/O thread")
            self._give_up(DistOpError(f"the distop client failed: {type(exc).__name__}: {error_text(exc)}"))

    return wrapper
