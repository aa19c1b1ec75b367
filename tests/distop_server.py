"""A distop server for the tests: the sample ops plus ops that misbehave on purpose, taking chunks ahead."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from distop.callee import SampleExecutor, serve
from distop.ops import PipelinedOpExecutor


class MisbehavingExecutor(SampleExecutor, PipelinedOpExecutor):
    def fail(self, chunk: list[Any]) -> None:
        raise ValueError(f"cannot handle {chunk[0]!r}")

    def big(self, chunk: list[Any], size: int) -> str:
        return "x" * size

    def sleep(self, chunk: list[Any], seconds: float, log: str = "") -> list[Any]:
        """Sleep, noting each run in ``log`` (to count how often a chunk ran)."""
        if log:
            with Path(log).open("a") as f:
                f.write(f"start {chunk[0]}\n")
        time.sleep(seconds)
        return chunk

    def sleep_once(self, chunk: list[Any], seconds: float, log: str) -> list[Any]:
        """Sleep on the chunk's first run only, noting each run in ``log``."""
        path = Path(log)
        first = not path.exists()
        with path.open("a") as f:
            f.write(f"start {chunk[0]}\n")
        if first:
            time.sleep(seconds)
        return chunk

    def deep(self, chunk: list[Any]) -> list[Any]:
        """A result nested too deeply to encode as JSON."""
        result: list[Any] = []
        for _ in range(100_000):
            result = [result]
        return result

    def exit(self, chunk: list[Any]) -> None:
        sys.exit(f"exit inside an op on {chunk!r}")

    def unprintable(self, chunk: list[Any]) -> None:
        class UnprintableError(Exception):
            def __str__(self) -> str:
                raise RuntimeError("no message for you")

        raise UnprintableError

    def die_on(self, chunk: list[Any], value: Any) -> list[Any]:
        """Crash the whole server, as a segfault would, on a poison value."""
        if value in chunk:
            os._exit(3)
        return chunk

    def unserialisable(self, chunk: list[Any]) -> set[Any]:
        return set(chunk)

    def half_pair(self, chunk: list[Any]) -> list[str]:
        """A result with half a UTF-16 pair, as text decoded with errors="surrogateescape" can hold."""
        return ["\ud800"]

    def half_pair_error(self, chunk: list[Any]) -> None:
        raise ValueError("not UTF-8: \udcff")  # as bytes 0xff decoded with errors="surrogateescape"


if __name__ == "__main__":
    sys.exit(serve(MisbehavingExecutor, __doc__))
