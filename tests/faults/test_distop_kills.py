"""distop under fire: 20 jobs of 8 chunks, a server SIGKILLed every 2 s, one broker restart."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from distop.ops import DEAD_LETTER_QUEUE, WORK_QUEUE, DistOp
from tests.conftest import BrokerNode, Proc, Spawn, queue_depth, wait_until
from tests.faults.conftest import Report

SERVER = "tests/faults/slow_server.py"
SERVERS = 3
JOBS = 20
CHUNKS = 8
DATA = list(range(16))
SECONDS_PER_CHUNK = 0.2
KILL_EVERY = 2.0
# Restart the broker once this many chunk runs have finished.
RESTART_AFTER_RUNS = 40


class AffineOp(DistOp):
    OP_NAME = "affine"

    def gather(self, partials: dict[int, Any]) -> list[Any]:
        return [x for part in partials.values() for x in part]


@pytest.mark.timeout(240)
def test_20_jobs_complete_exactly_while_servers_die_and_the_broker_restarts(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, tmp_path: Path, report: Report
) -> None:
    url = broker_node.url(node_vhost)
    log = tmp_path / "runs.log"
    log.touch()

    def start_server() -> Proc:
        server = spawn(SERVER, url=url)
        server.wait_for("serving")
        return server

    def runs(event: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in log.read_text().splitlines() if line.startswith(event)]

    started = time.monotonic()
    servers = [start_server() for _ in range(SERVERS)]
    results: dict[int, Any] = {}
    with AffineOp(DATA, group_size=CHUNKS, rabbit_host=url) as op:
        jobs = {a: op.call(a=a, b=-a, seconds=SECONDS_PER_CHUNK, log=str(log)) for a in range(1, JOBS + 1)}

        def collect() -> None:
            for a, job in jobs.items():
                try:
                    results[a] = op.get_result(job, timeout=180)
                except Exception as exc:  # reported by the assertions below
                    results[a] = exc

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()

        killed: list[int] = []
        restarted = False
        while collector.is_alive():
            next_kill = time.monotonic() + KILL_EVERY
            wait_until(
                lambda t=next_kill: time.monotonic() >= t or not collector.is_alive(), 10, "the next kill"
            )
            if not collector.is_alive():
                break
            victim = servers.pop(0)
            victim.signal(signal.SIGKILL)
            victim.wait()
            killed.append(victim.popen.pid)
            servers.append(start_server())
            if not restarted and len(runs("end")) >= RESTART_AFTER_RUNS:
                broker_node.restart()
                restarted = True
            assert time.monotonic() - started < 180, "the jobs did not complete within 180 s"
        collector.join()
        assert restarted, "the jobs finished before the broker restart: make them longer"

    seconds = time.monotonic() - started
    # Chunks published again after the restart are still served; none may stay.
    wait_until(
        lambda: queue_depth(node_vhost, WORK_QUEUE, node=broker_node) == 0, 60, "the work queue to drain"
    )
    dead = queue_depth(node_vhost, DEAD_LETTER_QUEUE, node=broker_node) or 0

    # Every figure below is counted from what happened: the results, and the servers' run log.
    size = len(DATA) // CHUNKS  # DATA splits evenly
    delivered = sum(
        1
        for a, result in results.items()
        if isinstance(result, list)
        for i in range(CHUNKS)
        if result[i * size : (i + 1) * size] == [a * x - a for x in DATA[i * size : (i + 1) * size]]
    )
    starts = runs("start")
    chunk_runs = Counter(note.split(" ", 1)[1] for note in starts)
    ended = Counter(runs("end"))
    # A run that started on a server we killed and never ended: the kill landed mid-chunk.
    interrupted = sum(1 for note in set(starts) if int(note.split()[0]) in killed and note not in ended)
    line = report(
        "distop kills+restart",
        sent=JOBS * CHUNKS,
        delivered=delivered,
        duplicates=sum(chunk_runs.values()) - len(chunk_runs),
        lost=JOBS * CHUNKS - delivered,
        seconds=seconds,
        note=f"{len(killed)} server kills, {interrupted} mid-chunk; 1 broker restart; {dead} dead-lettered",
    )
    print(line)
    errors = {a: r for a, r in results.items() if isinstance(r, Exception)}
    assert errors == {}, f"jobs failed (a PoisonChunkError means a chunk hit the delivery limit): {errors}"
    assert results == {a: [a * x - a for x in DATA] for a in jobs}
    assert delivered == JOBS * CHUNKS
    assert len(chunk_runs) == JOBS * CHUNKS
    assert interrupted >= 1, "no kill landed mid-chunk: the scenario did not test what it claims"
    assert dead == 0
    for server in servers:
        assert "Traceback" not in server.output
