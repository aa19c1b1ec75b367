"""distop on a three-node cluster: the node leading ``distop.chunks`` is SIGKILLed mid-run.

Three servers, each connected to a different node; the client connected to
node 1, which leads the work queue. Node 1 dies while 20 jobs are being
served: its server and the client reconnect to the surviving nodes, the client
publishes again every chunk whose result it lacks (on RabbitMQ 3.10 such a
quick republish may meet a channel that still points at the dead leader and is
nacked: it must recover), and every result must come out exact, with no chunk
dead-lettered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from distop.ops import DEAD_LETTER_QUEUE, WORK_QUEUE, DistOp
from tests.cluster.conftest import SIZE, Cluster
from tests.conftest import Proc, Spawn, wait_until
from tests.faults.conftest import Report

pytestmark = [pytest.mark.xdist_group("cluster"), pytest.mark.timeout(420)]

SERVER = "tests/faults/slow_server.py"
JOBS = 20
CHUNKS = 8
DATA = list(range(16))
SECONDS_PER_CHUNK = 0.2
# Kill the leader once this many chunk runs have finished (of 160).
KILL_AFTER_RUNS = 40


class AffineOp(DistOp):
    OP_NAME = "affine"

    def gather(self, partials: dict[int, Any]) -> list[Any]:
        return [x for part in partials.values() for x in part]


def test_20_jobs_complete_exactly_when_the_work_queues_leader_dies(
    spawn: Spawn, cluster: Cluster, cluster_vhost: str, tmp_path: Path, report: Report
) -> None:
    vhost = cluster_vhost
    log = tmp_path / "runs.log"
    log.touch()

    def runs(event: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in log.read_text().splitlines() if line.startswith(event)]

    def through(i: int) -> str:
        """Every node, starting with node i + 1."""
        return cluster.url(vhost, *[(i + k) % SIZE for k in range(SIZE)])

    started = time.monotonic()
    # Server 1 declares the work queue through node 1, which so becomes its leader.
    servers: list[Proc] = []
    for i in range(SIZE):
        servers.append(spawn(SERVER, url=through(i)))
        servers[-1].wait_for("serving")
    assert cluster.leader(vhost, WORK_QUEUE) is cluster.nodes[0], "the work queue should be led by node 1"
    assert {node.name for node in cluster.nodes} == set(cluster.members_of(vhost, WORK_QUEUE))
    assert all(count == 1 for count in cluster.connections(vhost).values()), cluster.connections(vhost)

    results: dict[int, Any] = {}
    with AffineOp(DATA, group_size=CHUNKS, rabbit_host=through(0)) as op:
        jobs = {a: op.call(a=a, b=-a, seconds=SECONDS_PER_CHUNK, log=str(log)) for a in range(1, JOBS + 1)}

        def collect() -> None:
            for a, job in jobs.items():
                try:
                    results[a] = op.get_result(job, timeout=180)
                except Exception as exc:  # reported by the assertions below
                    results[a] = exc

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        wait_until(lambda: len(runs("end")) >= KILL_AFTER_RUNS, 60, f"{KILL_AFTER_RUNS} chunk runs")
        leader = cluster.leader(vhost, WORK_QUEUE)
        assert leader is cluster.nodes[0], f"the work queue's leader moved before the kill: {leader}"
        done_at_kill = len(runs("end"))
        killed_at = time.monotonic()
        leader.crash()

        # Node 1's server and the client come back on the two survivors.
        servers[0].wait_for("lost the broker", timeout=60)

        def all_back() -> bool:
            for server in servers:
                if server.popen.poll() is not None:
                    pytest.fail(f"a server exited ({server.popen.returncode}):\n{server.output}")
            return sum(cluster.connections(vhost).values()) == SIZE + 1

        wait_until(all_back, 60, "the client and every server connected to the surviving nodes")
        back = time.monotonic() - killed_at
        collector.join(200)
        assert not collector.is_alive(), "the jobs did not complete within 200 s"
    seconds = time.monotonic() - started

    errors = {a: r for a, r in results.items() if isinstance(r, Exception)}
    assert errors == {}, f"jobs failed (a PoisonChunkError means a chunk was dead-lettered): {errors}"
    assert results == {a: [a * x - a for x in DATA] for a in jobs}
    wait_until(lambda: cluster.queue_depth(vhost, WORK_QUEUE) == 0, 60, "the work queue to drain")
    dead = cluster.queue_depth(vhost, DEAD_LETTER_QUEUE)
    chunk_runs = Counter(note.split(" ", 1)[1] for note in runs("start"))
    assert len(chunk_runs) == JOBS * CHUNKS
    line = report(
        "cluster distop leader kill",
        sent=JOBS * CHUNKS,
        delivered=JOBS * CHUNKS,  # every partial is in: the results are exact
        duplicates=sum(chunk_runs.values()) - len(chunk_runs),
        lost=0,
        seconds=seconds,
        note=(
            f"{JOBS}/{JOBS} results exact; {done_at_kill} chunk runs done at the kill; "
            f"client and servers reconnected within {back:.1f} s; {dead} dead-lettered"
        ),
    )
    print(line)
    assert dead == 0
    for server in servers:
        assert "Traceback" not in server.output
