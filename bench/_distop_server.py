"""The work that bench/distop_vs_pool.py measures, and a distop server offering it.

The same module-level functions run in multiprocessing.Pool workers, in the
Celery worker (bench/_celery_tasks.py) and, as ops, in the distop servers that
the benchmark starts as processes:

    python bench/_distop_server.py    # AMQP_URL says where; Ctrl-C or SIGTERM stops it

A server also stops when the process that started it goes away, so that an
interrupted benchmark leaves no server behind. With BENCH_DISTOP_STRICT=1 in
its environment it takes strictly one chunk at a time (no pipelining), from a
queue of its own, so that the fairness question can run both side by side.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from distop.callee import serve
from distop.ops import PipelinedOpExecutor

PARENT_CHECK_INTERVAL = 1.0
STRICT_QUEUE = "distop.chunks.strict"


def sum_squares(chunk: list[int]) -> list[int]:
    """CPU-bound, pure Python: for each n, the sum of i*i for i below n."""
    return [sum(i * i for i in range(n)) for n in chunk]


def plus_one(chunk: list[int]) -> list[int]:
    """Next to no work: what is left is the cost of moving the chunk."""
    return [x + 1 for x in chunk]


def sleep_ms(chunk: list[float]) -> list[float]:
    """A chunk whose cost is known in advance: sleep for the sum of its items, in ms; return it.

    Sleeping rather than computing keeps the cost the same with 4 servers on 2 cores.
    """
    time.sleep(sum(chunk) / 1000)
    return chunk


class BenchExecutor(PipelinedOpExecutor):
    """The bench ops, under the names the benchmark's DistOp classes use, taking chunks ahead while short."""

    def sum_squares(self, chunk: list[int]) -> list[int]:
        return sum_squares(chunk)

    def plus_one(self, chunk: list[int]) -> list[int]:
        return plus_one(chunk)

    def sleep_ms(self, chunk: list[float]) -> list[float]:
        return sleep_ms(chunk)

    def run(self) -> None:
        threading.Thread(target=self._stop_with_parent, name="parent-watch", daemon=True).start()
        super().run()

    def _stop_with_parent(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_INTERVAL)
        self.stop()


class StrictBenchExecutor(BenchExecutor):
    """The same ops, one chunk at a time whatever their cost, on a queue of their own."""

    QUEUE = STRICT_QUEUE
    MAX_PREFETCH = 1


if __name__ == "__main__":
    strict = os.environ.get("BENCH_DISTOP_STRICT") == "1"
    sys.exit(serve(StrictBenchExecutor if strict else BenchExecutor, __doc__.split("\n\n")[0]))
