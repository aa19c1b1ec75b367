"""The work that bench/distop_vs_pool.py measures, and a distop server offering it.

The same module-level functions run in multiprocessing.Pool workers, in the
Celery worker (bench/_celery_tasks.py) and, as ops, in the distop servers that
the benchmark starts as processes:

    python bench/_distop_server.py    # AMQP_URL says where; Ctrl-C or SIGTERM stops it

A server also stops when the process that started it goes away, so that an
interrupted benchmark leaves no server behind.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from distop.callee import serve
from distop.ops import OpExecutor

PARENT_CHECK_INTERVAL = 1.0


def sum_squares(chunk: list[int]) -> list[int]:
    """CPU-bound, pure Python: for each n, the sum of i*i for i below n."""
    return [sum(i * i for i in range(n)) for n in chunk]


def plus_one(chunk: list[int]) -> list[int]:
    """Next to no work: what is left is the cost of moving the chunk."""
    return [x + 1 for x in chunk]


class BenchExecutor(OpExecutor):
    """The bench ops, under the names the benchmark's DistOp classes use."""

    def sum_squares(self, chunk: list[int]) -> list[int]:
        return sum_squares(chunk)

    def plus_one(self, chunk: list[int]) -> list[int]:
        return plus_one(chunk)

    def run(self) -> None:
        threading.Thread(target=self._stop_with_parent, name="parent-watch", daemon=True).start()
        super().run()

    def _stop_with_parent(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_INTERVAL)
        self.stop()


if __name__ == "__main__":
    sys.exit(serve(BenchExecutor, __doc__.split("\n\n")[0]))
