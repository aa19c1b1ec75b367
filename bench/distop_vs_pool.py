"""distop against what users would pick instead: multiprocessing.Pool, Celery, a plain RPC call.

    make bench                                          # every benchmark, or just this one:
    python bench/distop_vs_pool.py [--rounds 5] [--quick] [--plot docs/distop_speedup.png]

The same work goes through distop (servers: bench/_distop_server.py, a
PipelinedOpExecutor with distop/callee.py's command line, started by this
script as processes) and through ``multiprocessing.Pool(2).map`` over the same chunks
(``chunksize=1``: one chunk per task, as distop sends one chunk per message;
Pool's default chunksize would batch them and be faster still); every result
is checked against the one computed here. Seven questions:

1. CPU-bound pure-Python op (sums of squares, about 5 s serial on an idle
   core, a third of that with --quick) in 2 chunks on 2 servers: distop's
   time at most 1.05 x Pool(2)'s.
2. A trivial op (plus one) over 100,000 ints in 2 chunks: at most 2.5 x Pool(2).
3. The same in 1,000 chunks: at most 15 x Pool(2), and at least 2.5 x faster
   than a Celery ``group`` of 1,000 tasks (a Celery worker started here,
   prefork, concurrency 2, same broker, result backend ``rpc://``, Celery's
   defaults otherwise, but no gossip, mingle or heartbeat: there is one worker).
4. The latency of a 1-chunk job: median at most 2 x that of a plain
   request/reply round trip the way the RabbitMQ RPC tutorial does it
   (exclusive reply queue, correlation_id, a server in another process).
5. Speedup over the serial run (in this process) as servers go 1, 2, 4;
   printed, and plotted to docs/distop_speedup.png.
6. The floor: questions 3 and 4 also through the least pika code that does
   the same scatter/gather on the same kind of queue (quorum, persistent
   messages, the prefetch distop uses for short chunks, no publisher
   confirms, one thread on each side); distop at most 1.25 x that floor. The
   floor is what the broker costs; the rest is what distop adds.
7. Fairness: 4 servers, jobs whose chunks sleep for known times (one long
   chunk among short ones; random costs, the same for both sides), through
   the servers as they are and through servers that take strictly one chunk
   at a time (BENCH_DISTOP_STRICT=1); the job at most 1.1 x as long.
   Pipelining must never cost a job its parallelism.

What is timed is a job on a warm client and warm servers: ``call()`` to
``get_result()`` on a DistOp already connected, ``pool.map`` on a Pool
already started, ``group().apply_async().get()`` on a Celery app already
connected, with servers and workers that have already done work. Start-up
costs are not part of the questions.

Every question runs in alternating rounds (the side that goes first changes
each round); short jobs are repeated within a round, the sides interleaved,
and the round keeps each side's median; the table shows the median over
rounds of each side, and the median over rounds of the ratio distop /
baseline (lower is better) against its goal. Other work on the machine slows
some rounds and not others, which is why the load average is printed before
and after. Everything runs in a virtual host created with rabbitmqctl for
this run (PYCLASS_RABBITMQCTL says how to run it, AMQP_URL where the broker
is) and deleted at the end, as is every process started, also on an error or
Ctrl-C. Exit status 1 when a run fails (no
broker, a process dies, a result is wrong); a missed goal is reported but is
not a failure, because it depends on the machine.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import itertools
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from bench._distop_server import STRICT_QUEUE, plus_one, sum_squares
from bench._table import load_average, rabbitmqctl, versions
from distop.broker import connect, redact
from distop.errors import BrokerError, DistOpError
from distop.ops import WORK_QUEUE_ARGUMENTS, DistOp, split

try:
    import matplotlib
    from celery import group
    from celery.exceptions import CeleryError
    from kombu.exceptions import KombuError

    from bench import _celery_tasks
except ImportError as exc:  # main() says what to install, in one line
    MISSING: str | None = exc.name
else:
    MISSING = None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

LOGGER = logging.getLogger("bench.distop_vs_pool")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
SERVER = "bench/_distop_server.py"
PLOT = ROOT / "docs" / "distop_speedup.png"
POOL_SIZE = 2
SERVER_COUNTS = (1, 2, 4)
# Questions 1 and 5: WORK_ITEMS sums of squares of ITEM_SIZE numbers each
# (about 0.6 s apiece on an idle core here: about 5 s serial), so that 1, 2
# and 4 servers get equal shares.
WORK_ITEMS = 8
ITEM_SIZE = 15_000_000
QUICK_ITEM_SIZE = 5_000_000
# Questions 2 and 3.
TRIVIAL_ITEMS = 100_000
FEW_CHUNKS = 2
MANY_CHUNKS = 1_000
# Question 4: a 1-chunk job on this small list.
LATENCY_DATA = list(range(10))
# Repetitions of a short job within one round; the round keeps their median.
REPEATS = {"few": 10, "many": 3, "latency": 200, "fair": 3}
QUICK_REPEATS = {"few": 5, "many": 2, "latency": 100, "fair": 2}
# Question 6: the floor's queue and how many chunks each of its servers takes at a time.
FLOOR_QUEUE = "bench.floor"
FLOOR_PREFETCH = 2
# Question 7: 4 servers; each job has FAIR_CHUNKS one-item chunks, an item being milliseconds of sleep.
FAIR_SERVERS = 4
FAIR_CHUNKS = 24
LONG_MS = 100.0
SHORT_MS = 0.2
GOALS = {
    "cpu": 1.05,
    "few": 2.5,
    "many": 15.0,
    "celery": 1 / 2.5,
    "latency": 2.0,
    "floor-many": 1.25,
    "floor-latency": 1.25,
    "fair-one-long": 1.1,
    "fair-random": 1.1,
}
QUESTIONS = ("cpu", "few", "many", "latency", "fairness")
RPC_QUEUE = "rpc_queue"
JSON = "application/json"
WARM_UP_CALLS = 20
# Every wait is bounded.
JOB_TIMEOUT = 120.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
PARENT_CHECK_INTERVAL = 1.0


class BenchError(Exception):
    """The benchmark could not run or got a wrong result; the message says which."""


# The distop side --------------------------------------------------------------


class SumSquaresOp(DistOp):
    OP_NAME = "sum_squares"

    def gather(self, partials: dict[int, list[Any]]) -> list[Any]:
        return [x for part in partials.values() for x in part]


class PlusOneOp(SumSquaresOp):
    OP_NAME = "plus_one"


class SleepOp(SumSquaresOp):
    OP_NAME = "sleep_ms"


class StrictSleepOp(SleepOp):
    QUEUE = STRICT_QUEUE


def run_job(op: DistOp) -> list[Any]:
    op.call()
    return op.get_result(timeout=JOB_TIMEOUT)


class Servers:
    """The distop server processes, grown or shrunk to the count a question needs."""

    def __init__(self, url: str, logs: Path, *, strict: bool = False) -> None:
        self.url = url
        self.logs = logs
        self.strict = strict
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._numbers = itertools.count(1)
        self._name = "strict-server" if strict else "server"
        warmer = type("Warmer", (PlusOneOp,), {"QUEUE": STRICT_QUEUE}) if strict else PlusOneOp
        self._warmer = warmer(list(range(1000)), 50, url)

    def resize(self, count: int) -> None:
        """Run exactly ``count`` servers, each of which has served a chunk; return when so."""
        while len(self.running) > count:
            stop_process(*self.running.pop())
        while len(self.running) < count:
            log = self.logs / f"{self._name}-{next(self._numbers)}.log"
            env = {"BENCH_DISTOP_STRICT": "1"} if self.strict else {}
            self.running.append((start_process([sys.executable, SERVER], self.url, log, env), log))
        self._warm_up()

    def _warm_up(self) -> None:
        """Run small jobs until every server has logged a chunk it served."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for proc, log in self.running:
                if proc.poll() is not None:
                    raise BenchError(f"a distop server exited ({proc.returncode}): {tail(log)}")
            if all("chunk " in log.read_text() for _, log in self.running):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the distop servers did not all serve a chunk within {START_TIMEOUT:.0f} s")
            if run_job(self._warmer) != plus_one(list(range(1000))):
                raise BenchError("a warm-up job came back wrong")

    def close(self) -> None:
        self._warmer.close()
        while self.running:
            stop_process(*self.running.pop())


# The Pool side ----------------------------------------------------------------


def _pool_worker_signals() -> None:
    # Ctrl-C reaches the whole process group; the benchmark stops the Pool itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Pool.terminate() sends SIGTERM: die quietly, not with the benchmark's handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pool_map(
    pool: multiprocessing.pool.Pool, func: Callable[[list[int]], list[int]], data: list[int], chunks: int
) -> list[int]:
    parts = pool.map_async(func, [chunk for _, chunk in split(data, chunks)], chunksize=1).get(JOB_TIMEOUT)
    return [x for part in parts for x in part]


# The Celery side --------------------------------------------------------------


class CeleryGroup:
    """A Celery worker process (prefork, concurrency 2), and a client sending it groups."""

    def __init__(self, url: str, log: Path) -> None:
        _celery_tasks.app.conf.broker_url = url
        self.log = log
        self._closed = False
        self.worker = start_process([sys.executable, __file__, "_celery-worker"], url, log)
        # The first group waits in the queue until the worker is up; then both children are warm.
        for _ in range(3):
            self.run(list(range(1000)), 50, timeout=START_TIMEOUT)

    def run(self, data: list[int], chunks: int, timeout: float = JOB_TIMEOUT) -> list[int]:
        if self.worker.poll() is not None:
            raise BenchError(f"the Celery worker exited ({self.worker.returncode}): {tail(self.log)}")
        task = _celery_tasks.plus_one_task
        try:
            result = group(task.s(chunk) for _, chunk in split(data, chunks)).apply_async()
            parts = result.get(timeout=timeout)
        except (CeleryError, KombuError, TimeoutError) as exc:
            raise BenchError(f"the Celery group failed: {exc!r}; worker: {tail(self.log)}") from exc
        return [x for part in parts for x in part]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _celery_tasks.app.close()
        finally:
            stop_process(self.worker, self.log)


def celery_worker() -> int:
    """The ``_celery-worker`` subcommand: a worker that stops when the benchmark goes away."""
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    _celery_tasks.app.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={POOL_SIZE}",
            "--loglevel=WARNING",
            # No chatter between workers (there is one), and a quicker start.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0


# The plain RPC round trip, the RabbitMQ tutorial's way ------------------------


def rpc_server(
    url: str, queue: str = RPC_QUEUE, arguments: dict[str, Any] | None = None, prefetch: int = 1
) -> int:
    """The ``_rpc-server`` subcommand: answer each request on ``queue`` with plus_one.

    Also the floor's server (``_floor-server``): the same on a quorum queue, ``prefetch`` at a time.
    """
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    watch_parent(stopping.set)
    connection = connect(url)
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=arguments)
    channel.basic_qos(prefetch_count=prefetch)

    def on_request(
        channel: Any, method: pika.spec.Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        reply = json.dumps({"result": plus_one(json.loads(body)["chunk"])}).encode()
        channel.basic_publish(
            "",
            props.reply_to,
            reply,
            pika.BasicProperties(content_type=JSON, correlation_id=props.correlation_id),
        )
        channel.basic_ack(method.delivery_tag)

    channel.basic_consume(queue, on_request)
    while not stopping.is_set():
        connection.process_data_events(time_limit=0.5)
    connection.close()
    return 0


class RpcClient:
    """The tutorial's client: an exclusive reply queue, one call at a time, matched by correlation_id."""

    def __init__(self, url: str) -> None:
        self.connection = connect(url)
        self.channel = self.connection.channel()
        self.channel.queue_declare(RPC_QUEUE, durable=True)  # requests wait for a late server
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        self._correlation_id = ""
        self._reply: bytes | None = None

    def _on_reply(self, _channel: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        if props.correlation_id == self._correlation_id:
            self._reply = body

    def call(self, chunk: list[int]) -> list[int]:
        self._correlation_id, self._reply = uuid.uuid4().hex, None
        self.channel.basic_publish(
            "",
            RPC_QUEUE,
            json.dumps({"chunk": chunk}).encode(),
            pika.BasicProperties(
                content_type=JSON, reply_to=self.reply_queue, correlation_id=self._correlation_id
            ),
        )
        deadline = time.monotonic() + JOB_TIMEOUT
        while self._reply is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no RPC reply within {JOB_TIMEOUT:.0f} s")
            self.connection.process_data_events(time_limit=remaining)
        return json.loads(self._reply)["result"]

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass  # interrupted mid-call: the connection goes with the process anyway


# The floor: the least pika code for the same scatter/gather ---------------------


class FloorClient:
    """Scatter chunks to FLOOR_QUEUE as distop does (quorum queue, persistent), gather the replies.

    What it leaves out is what distop adds: publisher confirms, republishing
    after a lost connection, a client I/O thread, dead letters, the job bookkeeping.
    """

    def __init__(self, url: str) -> None:
        self.connection = connect(url)
        self.channel = self.connection.channel()
        self.channel.queue_declare(FLOOR_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        self._job = ""
        self._parts: dict[int, list[int]] = {}

    def _on_reply(self, _channel: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        job, _, start = (props.correlation_id or "").partition(":")
        if job == self._job:
            self._parts[int(start)] = json.loads(body)["result"]

    def run(self, data: list[int], chunks: int) -> list[int]:
        self._job, self._parts = uuid.uuid4().hex, {}
        parts = split(data, chunks)
        for start, chunk in parts:
            self.channel.basic_publish(
                "",
                FLOOR_QUEUE,
                json.dumps({"chunk": chunk}).encode(),
                pika.BasicProperties(
                    content_type=JSON,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    reply_to=self.reply_queue,
                    correlation_id=f"{self._job}:{start}",
                ),
            )
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(self._parts) < len(parts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"the floor: {len(self._parts)} of {len(parts)} replies in {JOB_TIMEOUT:.0f} s"
                )
            self.connection.process_data_events(time_limit=remaining)
        return [x for _, part in sorted(self._parts.items()) for x in part]

    close = RpcClient.close


# Processes --------------------------------------------------------------------


def watch_parent(on_orphaned: Callable[[], None]) -> None:
    """Call ``on_orphaned`` once the process that started this one has gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_INTERVAL)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start_process(
    command: list[str], url: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` from the repository root with AMQP_URL (and ``env``) set, its output into ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AMQP_URL": url, **(env or {})}
    with log.open("wb") as out:
        # Its own session: Ctrl-C goes to the benchmark, which stops its processes in order.
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, then SIGKILL to its whole process group if it has not exited in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            LOGGER.warning("%s did not stop within %.0f s; killing it", proc.args, STOP_TIMEOUT)
    if proc.poll() is None:
        # A worker's children (Celery's prefork pool) are in its process group.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
    LOGGER.debug("%s exited %s: %s", proc.args, proc.returncode, tail(log))


def tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# Timing -----------------------------------------------------------------------


def timed(run: Callable[[], Any], expected: Any, what: str) -> float:
    """Seconds ``run()`` took; raise BenchError unless it returned ``expected``."""
    started = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - started
    if result != expected:
        raise BenchError(f"{what} returned a wrong result")
    return elapsed


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by this process (all its threads) and the processes ``pids``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def median_of(repeats: int, run: Callable[[], Any], expected: Any, what: str) -> float:
    return statistics.median(timed(run, expected, what) for _ in range(repeats))


@dataclass
class Race:
    """One question answered in seconds: distop's against a baseline's, lower is better."""

    question: str
    baseline: str
    goal: float  # the largest acceptable ratio distop / baseline
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"baseline": [], "distop": []})
    # CPU seconds per job of the client and its servers (not the broker's), where measured.
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"baseline": [], "distop": []})

    def median(self, side: str) -> float:
        return statistics.median(self.seconds[side])

    @property
    def ratio(self) -> float:
        """The median over rounds of distop / baseline: a burst of load elsewhere spoils a round, not this."""
        return statistics.median(
            d / b for d, b in zip(self.seconds["distop"], self.seconds["baseline"], strict=True)
        )

    @property
    def met(self) -> bool:
        return self.ratio <= self.goal


def rounds_of(sides: list[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """Each round's order of the sides: rotated by one each round, so that drift favours none."""
    for number in range(rounds):
        shift = number % len(sides)
        yield number + 1, sides[shift:] + sides[:shift]


def seconds_text(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def race_table(races: list[Race]) -> str:
    lines = [
        "| question | baseline | baseline (median) | distop (median) | distop / baseline | goal | met "
        "| CPU ms per job, baseline / distop |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for race in races:
        ratio, goal = f"{race.ratio:.2f}", f"≤ {race.goal:.2f}"
        if race.goal < 1:
            ratio += f" ({1 / race.ratio:.1f}x faster)"
            goal += f" (≥ {1 / race.goal:g}x faster)"
        lines.append(
            f"| {race.question} | {race.baseline} | {seconds_text(race.median('baseline'))} "
            f"| {seconds_text(race.median('distop'))} | {ratio} | {goal} | {'yes' if race.met else 'NO'} "
            f"| {cpu_text(race.cpu)} |"
        )
    return "\n".join(lines)


def cpu_text(cpu: dict[str, list[float]]) -> str:
    if not all(cpu.values()):
        return "-"
    return " / ".join(f"{statistics.median(cpu[side]) * 1000:.2f}" for side in ("baseline", "distop"))


def speedup_table(serial: float, pool: float, distop: dict[int, float]) -> str:
    lines = ["| run | time (median) | speedup over serial |", "|---|---:|---:|"]
    lines.append(f"| serial, in this process | {serial:.2f} s | 1.00 |")
    lines.append(f"| Pool({POOL_SIZE}) | {pool:.2f} s | {serial / pool:.2f} |")
    for count, seconds in distop.items():
        lines.append(
            f"| distop, {count} server{'s' if count > 1 else ''} | {seconds:.2f} s | {serial / seconds:.2f} |"
        )
    return "\n".join(lines)


def plot(path: Path, serial: float, pool: float, distop: dict[int, float], title: str) -> None:
    counts = list(distop)
    cores = os.cpu_count() or 1
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot(counts, [min(n, cores) for n in counts], "--", color="grey", label=f"ideal on {cores} cores")
    speedups = [serial / distop[n] for n in counts]
    axes.plot(counts, speedups, "o-", color="tab:blue", label="distop")
    for count, speedup in zip(counts, speedups, strict=True):
        axes.annotate(
            f"{speedup:.2f}", (count, speedup), textcoords="offset points", xytext=(0, -14), ha="center"
        )
    axes.plot(
        [POOL_SIZE], [serial / pool], "s", color="tab:orange", label=f"multiprocessing.Pool({POOL_SIZE})"
    )
    axes.set_xticks(counts)
    axes.set_xlabel("distop servers")
    axes.set_ylabel("speedup over serial")
    axes.set_ylim(0, max(counts) * 0.75)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# The benchmark ----------------------------------------------------------------


def vhost_url(url: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


@contextmanager
def fresh_vhost(url: str) -> Iterator[str]:
    """A virtual host for this run, its URL yielded, deleted afterwards."""
    vhost = f"bench-distop-{uuid.uuid4().hex[:12]}"
    user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "guest")
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield vhost_url(url, vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


def package_versions() -> str:
    return ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("celery", "kombu", "matplotlib")
    )


def race_rounds(
    title: str,
    sides: dict[str, Callable[[], Any]],
    expected: Any,
    rounds: int,
    *,
    repeats: int = 1,
    before: Callable[[str], None] | None = None,
    cpu: dict[str, list[int]] | None = None,
    cpu_per_round: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each side in alternating rounds; return each side's seconds per round.

    A round runs each side ``repeats`` times, interleaved (one run of each
    side, then again), and keeps each side's median; ``before(side)`` runs,
    untimed, before each side's turn. For the sides in ``cpu`` (side -> the
    pids of its servers), the median CPU seconds per run go to ``cpu_per_round``.
    """
    cpu = cpu or {}
    print(f"\n{title}" + (f" (median of {repeats} per round)" if repeats > 1 else ""), flush=True)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for number, order in rounds_of(list(sides), rounds):
        runs: dict[str, list[float]] = {side: [] for side in order}
        cpu_runs: dict[str, list[float]] = {side: [] for side in cpu}
        for _ in range(repeats):
            for side in order:
                if before is not None:
                    before(side)
                used = cpu_seconds(cpu[side]) if side in cpu else 0.0
                runs[side].append(timed(sides[side], expected, side))
                if side in cpu:
                    cpu_runs[side].append(cpu_seconds(cpu[side]) - used)
        for side in order:
            seconds[side].append(statistics.median(runs[side]))
        if cpu_per_round is not None:
            for side, used in cpu_runs.items():
                cpu_per_round.setdefault(side, []).append(statistics.median(used))
        line = ", ".join(f"{side} {seconds_text(seconds[side][-1])}" for side in order)
        print(f"round {number}: {line}", flush=True)
    return seconds


@dataclass
class Rig:
    """What the questions run on: the broker, the Pool, the distop servers, and what to close at the end."""

    url: str
    pool: multiprocessing.pool.Pool
    servers: Servers
    logs: Path
    stack: ExitStack
    rounds: int
    repeats: dict[str, int]
    _floor: FloorClient | None = None
    floor_pids: list[int] = field(default_factory=list)

    def floor(self) -> FloorClient:
        """The floor's client, and its servers (as many as distop's now), started on first use."""
        if self._floor is None:
            for number in range(len(self.servers.running)):
                log = self.logs / f"floor-server-{number + 1}.log"
                server = start_process([sys.executable, __file__, "_floor-server"], self.url, log)
                self.floor_pids.append(server.pid)
                self.stack.callback(stop_process, server, log)
            self._floor = FloorClient(self.url)
            self.stack.callback(self._floor.close)
        return self._floor

    def cpu_pids(self) -> dict[str, list[int]]:
        """The server processes of distop and of the floor, whose CPU time counts with the client's."""
        return {"distop": [proc.pid for proc, _ in self.servers.running], "floor": self.floor_pids}

    def op(self, op_class: type[DistOp], data: list[Any], chunks: int) -> DistOp:
        """A DistOp over ``data``, connected by a first job of one item per chunk; closed at the end."""
        op = self.stack.enter_context(op_class(data, chunks, self.url))
        op.data = data[:1] * chunks
        try:
            run_job(op)
        finally:
            op.data = data
        return op


def cpu_bound(rig: Rig, data: list[int]) -> dict[str, float]:
    """Questions 1 and 5: serial, Pool(2), and distop on 1, 2 and 4 servers; median seconds of each."""
    rig.servers.resize(1)
    ops = {f"distop x{n}": rig.op(SumSquaresOp, data, n) for n in SERVER_COUNTS}
    sides: dict[str, Callable[[], Any]] = {
        "serial": lambda: sum_squares(data),
        "pool": lambda: pool_map(rig.pool, sum_squares, data, 2),
        **{side: functools.partial(run_job, op) for side, op in ops.items()},
    }

    def before(side: str) -> None:
        if side in ops:
            rig.servers.resize(ops[side].group_size)

    title = f"CPU-bound: {len(data)} x sum of squares below {data[0]:,}; distop with 1, 2, 4 servers"
    seconds = race_rounds(title, sides, sum_squares(data), rig.rounds, before=before)
    return {side: statistics.median(times) for side, times in seconds.items()}


def few_chunks(rig: Rig, race: Race) -> None:
    """Question 2: plus one over 100,000 ints in 2 chunks."""
    data = list(range(TRIVIAL_ITEMS))
    op = rig.op(PlusOneOp, data, FEW_CHUNKS)
    sides = {
        "pool": functools.partial(pool_map, rig.pool, plus_one, data, FEW_CHUNKS),
        "distop": functools.partial(run_job, op),
    }
    title = f"plus one over {len(data):,} ints in {FEW_CHUNKS} chunks"
    seconds = race_rounds(title, sides, plus_one(data), rig.rounds, repeats=rig.repeats["few"])
    race.seconds = {"baseline": seconds["pool"], "distop": seconds["distop"]}


def many_chunks(rig: Rig, pool_race: Race, celery_race: Race, floor_race: Race) -> None:
    """Questions 3 and 6: plus one over 100,000 ints in 1,000 chunks, also as a Celery group and the floor."""
    data = list(range(TRIVIAL_ITEMS))
    op = rig.op(PlusOneOp, data, MANY_CHUNKS)
    floor = rig.floor()
    workers = CeleryGroup(rig.url, rig.logs / "celery.log")
    rig.stack.callback(workers.close)
    sides = {
        "pool": functools.partial(pool_map, rig.pool, plus_one, data, MANY_CHUNKS),
        "distop": functools.partial(run_job, op),
        "floor": functools.partial(floor.run, data, MANY_CHUNKS),
        "celery": functools.partial(workers.run, data, MANY_CHUNKS),
    }
    title = f"plus one over {len(data):,} ints in {MANY_CHUNKS:,} chunks"
    cpu: dict[str, list[float]] = {}
    seconds = race_rounds(
        title,
        sides,
        plus_one(data),
        rig.rounds,
        repeats=rig.repeats["many"],
        cpu=rig.cpu_pids(),
        cpu_per_round=cpu,
    )
    workers.close()  # not to take CPU from what follows
    pool_race.seconds = {"baseline": seconds["pool"], "distop": seconds["distop"]}
    celery_race.seconds = {"baseline": seconds["celery"], "distop": seconds["distop"]}
    floor_race.seconds = {"baseline": seconds["floor"], "distop": seconds["distop"]}
    floor_race.cpu = {"baseline": cpu["floor"], "distop": cpu["distop"]}


def latency(rig: Rig, race: Race, floor_race: Race) -> None:
    """Questions 4 and 6: a 1-chunk distop job against the tutorial's RPC round trip and the floor."""
    log = rig.logs / "rpc-server.log"
    server = start_process([sys.executable, __file__, "_rpc-server"], rig.url, log)
    rig.stack.callback(stop_process, server, log)
    rpc = RpcClient(rig.url)
    rig.stack.callback(rpc.close)
    floor = rig.floor()
    op = rig.op(PlusOneOp, LATENCY_DATA, 1)
    expected = plus_one(LATENCY_DATA)
    sides = {
        "rpc": functools.partial(rpc.call, LATENCY_DATA),
        "distop": functools.partial(run_job, op),
        "floor": functools.partial(floor.run, LATENCY_DATA, 1),
    }
    for run in sides.values():  # the server is up, the reply path used
        median_of(WARM_UP_CALLS, run, expected, "warm-up")
    title = f"latency of a 1-chunk job over {len(LATENCY_DATA)} ints"
    cpu: dict[str, list[float]] = {}
    seconds = race_rounds(
        title,
        sides,
        expected,
        rig.rounds,
        repeats=rig.repeats["latency"],
        cpu=rig.cpu_pids(),
        cpu_per_round=cpu,
    )
    race.seconds = {"baseline": seconds["rpc"], "distop": seconds["distop"]}
    floor_race.seconds = {"baseline": seconds["floor"], "distop": seconds["distop"]}
    floor_race.cpu = {"baseline": cpu["floor"], "distop": cpu["distop"]}


def fair_jobs(seed: int) -> dict[str, list[float]]:
    """The fairness question's two jobs, in ms of sleep per one-item chunk, the same for a given seed."""
    rng = random.Random(seed)
    one_long = [SHORT_MS] * FAIR_CHUNKS
    one_long[rng.randrange(FAIR_CHUNKS)] = LONG_MS
    # Most chunks far shorter than a round trip, a few long ones, in random order.
    costs = [
        round(rng.uniform(0.05, 0.5), 2) if rng.random() < 0.75 else round(rng.uniform(10, 60), 1)
        for _ in range(FAIR_CHUNKS)
    ]
    return {"one-long": one_long, "random": costs}


def ideal_seconds(costs: list[float]) -> float:
    """The job's time with no overhead: its longest chunk, or its total shared by the servers."""
    return max(*costs, sum(costs) / FAIR_SERVERS) / 1000


def fairness(rig: Rig, one_long_race: Race, random_race: Race) -> None:
    """Question 7: 4 servers as they are against 4 that take strictly one chunk at a time."""
    rig.servers.resize(FAIR_SERVERS)
    strict = Servers(rig.url, rig.logs, strict=True)
    rig.stack.callback(strict.close)
    strict.resize(FAIR_SERVERS)
    warm = fair_jobs(0)["random"]
    ops = {"distop": rig.op(SleepOp, warm, len(warm)), "strict": rig.op(StrictSleepOp, warm, len(warm))}
    for job, race in (("one-long", one_long_race), ("random", random_race)):
        print(
            f"\nfairness, {job}: {FAIR_CHUNKS} one-item chunks of sleep on {FAIR_SERVERS} servers "
            f"(median of {rig.repeats['fair']} per round)",
            flush=True,
        )
        for number, order in rounds_of(list(ops), rig.rounds):
            data = fair_jobs(number)[job]  # the same job for both sides of a round, a new one each round
            line = []
            for side in order:
                ops[side].data = data
                race.seconds["distop" if side == "distop" else "baseline"].append(
                    median_of(rig.repeats["fair"], functools.partial(run_job, ops[side]), data, side)
                )
                line.append(
                    f"{side} {seconds_text(race.seconds['distop' if side == 'distop' else 'baseline'][-1])}"
                )
            print(
                f"round {number}: ideal {seconds_text(ideal_seconds(data))}, " + ", ".join(line), flush=True
            )


def benchmark(url: str, rounds: int, quick: bool, plot_path: Path, only: set[str]) -> int:
    started = time.monotonic()
    cpu_data = [QUICK_ITEM_SIZE if quick else ITEM_SIZE] * WORK_ITEMS
    pool_name = f"Pool({POOL_SIZE}).map"
    what = f"plus one over {TRIVIAL_ITEMS:,} ints"
    floor_name = f"the floor: plain pika, quorum queue, prefetch {FLOOR_PREFETCH}"
    strict_name = "the same servers, strictly 1 chunk at a time"
    races = {
        "cpu": Race(
            f"1. CPU-bound, {WORK_ITEMS} sums of squares, 2 chunks, 2 servers", pool_name, GOALS["cpu"]
        ),
        "few": Race(f"2. {what}, {FEW_CHUNKS} chunks", pool_name, GOALS["few"]),
        "many": Race(f"3a. {what}, {MANY_CHUNKS:,} chunks", pool_name, GOALS["many"]),
        "celery": Race(
            f"3b. {what}, {MANY_CHUNKS:,} chunks", f"Celery group, prefork {POOL_SIZE}", GOALS["celery"]
        ),
        "latency": Race("4. latency of a 1-chunk job", "plain RPC round trip", GOALS["latency"]),
        "floor-many": Race(f"6a. {what}, {MANY_CHUNKS:,} chunks", floor_name, GOALS["floor-many"]),
        "floor-latency": Race("6b. latency of a 1-chunk job", floor_name, GOALS["floor-latency"]),
        "fair-one-long": Race(
            f"7a. {FAIR_SERVERS} servers, one {LONG_MS:.0f} ms chunk, {FAIR_CHUNKS - 1} of {SHORT_MS} ms",
            strict_name,
            GOALS["fair-one-long"],
        ),
        "fair-random": Race(
            f"7b. {FAIR_SERVERS} servers, {FAIR_CHUNKS} chunks: 3 in 4 of 0.05-0.5 ms, the rest 10-60 ms",
            strict_name,
            GOALS["fair-random"],
        ),
    }
    print(f"distop vs Pool({POOL_SIZE}), Celery, plain RPC and plain pika: {rounds} rounds", flush=True)
    print(f"{versions()}, {package_versions()}", flush=True)
    print(f"load average before: {load_average()}", flush=True)
    # The Pool forks before any thread (the DistOp clients') exists.
    with multiprocessing.Pool(POOL_SIZE, initializer=_pool_worker_signals) as pool, ExitStack() as stack:
        pool_map(pool, plus_one, list(range(TRIVIAL_ITEMS)), MANY_CHUNKS)  # up and warm
        connect(url).close()  # one line naming the broker if it is not there
        url = stack.enter_context(fresh_vhost(url))
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distop-bench-")))
        servers = Servers(url, logs)
        stack.callback(servers.close)
        rig = Rig(url, pool, servers, logs, stack, rounds, QUICK_REPEATS if quick else REPEATS)
        speed: dict[str, float] = {}
        if "cpu" in only:
            speed = cpu_bound(rig, cpu_data)
            races["cpu"].seconds = {"baseline": [speed["pool"]], "distop": [speed["distop x2"]]}
        rig.servers.resize(2)
        if "few" in only:
            few_chunks(rig, races["few"])
        if "many" in only:
            many_chunks(rig, races["many"], races["celery"], races["floor-many"])
        if "latency" in only:
            latency(rig, races["latency"], races["floor-latency"])
        if "fairness" in only:
            fairness(rig, races["fair-one-long"], races["fair-random"])

    answered = [race for race in races.values() if race.seconds["distop"]]
    print()
    print(race_table(answered))
    if speed:
        print("\n5. speedup of the CPU-bound job over the serial run")
        distop = {n: speed[f"distop x{n}"] for n in SERVER_COUNTS}
        print(speedup_table(speed["serial"], speed["pool"], distop))
        title = (
            f"{WORK_ITEMS} x sum of squares below {cpu_data[0]:,}: "
            f"serial {speed['serial']:.2f} s, {os.cpu_count()} cores"
        )
        plot(plot_path, speed["serial"], speed["pool"], distop, title)
        print(f"\nplot: {plot_path}")
    print(f"load average after: {load_average()}")
    met = sum(race.met for race in answered)
    print(f"goals met: {met} of {len(answered)}; total time {time.monotonic() - started:.0f} s")
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per question (default 5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a third of the CPU-bound work, fewer repetitions (for a try-out)",
    )
    parser.add_argument(
        "--plot", type=Path, default=PLOT, help=f"where to save the plot (default {PLOT.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--only",
        metavar="Q[,Q]",
        help=f"answer only these questions, of: {', '.join(QUESTIONS)} (the floor comes with many, latency)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also log pika's and the benchmark's debug output"
    )
    subcommands = parser.add_subparsers(dest="command", help=argparse.SUPPRESS)
    subcommands.add_parser("_celery-worker")
    subcommands.add_parser("_rpc-server")
    subcommands.add_parser("_floor-server")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    only = set(QUESTIONS) if args.only is None else set(args.only.split(","))
    if not only or only - set(QUESTIONS):
        parser.error(f"--only takes some of: {', '.join(QUESTIONS)}")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.verbose:
        # pika logs expected disconnections as errors, with tracebacks; so
        # does py-amqp (Celery's client) about replies to a channel it closes.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        logging.getLogger("amqp").setLevel(logging.CRITICAL)
    url = os.environ.get("AMQP_URL") or DEFAULT_URL
    subcommand = {
        "_celery-worker": celery_worker,
        "_rpc-server": functools.partial(rpc_server, url),
        "_floor-server": functools.partial(
            rpc_server, url, FLOOR_QUEUE, WORK_QUEUE_ARGUMENTS, FLOOR_PREFETCH
        ),
    }.get(args.command)
    if subcommand is not None:
        return subcommand()

    if MISSING:
        print(f"distop_vs_pool: {MISSING} is missing: pip install -r bench/requirements.txt", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C, so that the processes and the virtual host go too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return benchmark(url, args.rounds, args.quick, args.plot, only)
    except KeyboardInterrupt:
        print("distop_vs_pool: interrupted; stopped everything it started", file=sys.stderr)
        return 0
    except (
        BenchError,
        DistOpError,
        RuntimeError,
        OSError,
        TimeoutError,
        multiprocessing.TimeoutError,
        pika.exceptions.AMQPError,
    ) as exc:
        where = "" if isinstance(exc, BrokerError) else f" (broker {redact(url)})"  # else it says
        print(f"distop_vs_pool: {exc or type(exc).__name__}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
