"""A distop server for the fault suite: an op that takes a while and notes each run.

``affine(chunk, a, b, seconds, log)`` returns ``[a * x + b for x in chunk]``
after ``seconds``; every job gets its own ``a`` and ``b``, so a partial that
reached the wrong job, or the wrong place in it, shows in the result. Each run
appends "start PID A:FIRST" and "end PID A:FIRST" to ``log``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from distop.callee import SampleExecutor, serve


class SlowExecutor(SampleExecutor):
    def affine(self, chunk: list[int], a: int, b: int, seconds: float, log: str) -> list[int]:
        note = f"{os.getpid()} {a}:{chunk[0]}"
        with Path(log).open("a") as f:
            f.write(f"start {note}\n")
        time.sleep(seconds)
        result: list[Any] = [a * x + b for x in chunk]
        with Path(log).open("a") as f:
            f.write(f"end {note}\n")
        return result


if __name__ == "__main__":
    sys.exit(serve(SlowExecutor, __doc__))
