"""pc's consumer and distop's server on a three-node cluster that has lost two nodes.

The surviving node answers connections, but the quorum queues (pc, distop.chunks and their dead-letter
queues) have no majority: declaring one hangs until the broker closes the connection (on RabbitMQ 3.10,
541 INTERNAL_ERROR after about a minute), and a reconnection meets the same. What is promised: the
outage budget (RECONNECT_FOR) counts until the script consumes again, not until it merely connects, so
each gives up with one line saying why, exit 1; and SIGTERM while it waits on a declaration ends it
within seconds, exit 0, as any stop with nothing in hand.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from distop.protocol import RECONNECT_FOR as DISTOP_RECONNECT_FOR
from pc.consumer import RECONNECT_FOR as PC_RECONNECT_FOR
from tests.cluster.conftest import Cluster
from tests.conftest import Proc, Spawn, wait_until

pytestmark = [pytest.mark.xdist_group("cluster"), pytest.mark.timeout(420)]

SCRIPTS = {"consumer": "pc/consumer.py", "callee": "distop/callee.py"}
READY = {"consumer": "waiting for messages", "callee": "serving "}
# The broker closes a connection whose declaration hangs after about 65 s; the budget is 60 s.
GIVE_UP_WITHIN = max(PC_RECONNECT_FOR, DISTOP_RECONNECT_FOR) + 45


def lose_the_majority(spawn: Spawn, cluster: Cluster, vhost: str) -> None:
    """Declare every queue the scripts use while the cluster is whole, then SIGKILL nodes 1 and 2."""
    for name, script in SCRIPTS.items():
        proc = spawn(script, url=cluster.url(vhost))
        proc.wait_for(READY[name], 60)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output
    cluster.nodes[0].crash()
    cluster.nodes[1].crash()


def start_without_majority(spawn: Spawn, cluster: Cluster, vhost: str) -> dict[str, Proc]:
    """Start both scripts with every node's address (the dead ones first); wait until both are connected."""
    procs = {name: spawn(script, url=cluster.url(vhost)) for name, script in SCRIPTS.items()}
    survivor = cluster.nodes[2].name
    wait_until(lambda: cluster.connections(vhost)[survivor] >= len(procs), 60, "both scripts to connect")
    return procs


def test_without_a_majority_the_scripts_give_up_after_their_budget_with_one_line(
    spawn: Spawn, cluster: Cluster, cluster_vhost: str, record_property: Callable[[str, object], None]
) -> None:
    lose_the_majority(spawn, cluster, cluster_vhost)
    started = time.monotonic()
    procs = start_without_majority(spawn, cluster, cluster_vhost)
    for name, proc in procs.items():
        remaining = GIVE_UP_WITHIN - (time.monotonic() - started)
        assert proc.wait(max(remaining, 1)) == 1, proc.output
        took = time.monotonic() - started
        record_property("figures", f"no majority: {name} gave up after {took:.1f} s: {proc.stderr_lines[-1]}")
        errors = [line for line in proc.stderr_lines if line.startswith(f"{name}: ")]
        assert len(errors) == 1, proc.stderr
        assert errors[0] == proc.stderr_lines[-1], proc.stderr
        # Why, in the broker's words, and what it likely means.
        assert "541 INTERNAL_ERROR" in errors[0], errors[0]
        assert "a quorum queue without a majority of its nodes?" in errors[0], errors[0]
        assert "127.0.0.1" in errors[0]
        assert "guest:guest" not in proc.output
        assert "Traceback" not in proc.output
        assert proc.count(READY[name]) == 0
        # Each attempt's warning gives the broker's reason, not just pika's exception class.
        assert proc.count("ConnectionClosedByBroker") == 0, proc.stderr


def test_sigterm_while_a_declaration_hangs_ends_the_scripts_at_once(
    spawn: Spawn, cluster: Cluster, cluster_vhost: str, record_property: Callable[[str, object], None]
) -> None:
    lose_the_majority(spawn, cluster, cluster_vhost)
    procs = start_without_majority(spawn, cluster, cluster_vhost)
    # Connected, each is now declaring its queues (pc.dead, distop.dead), which hang: no majority.
    for proc in procs.values():
        proc.signal(signal.SIGTERM)
    signalled = time.monotonic()
    for name, proc in procs.items():
        assert proc.wait(10) == 0, proc.output
        took = time.monotonic() - signalled
        record_property("figures", f"no majority: {name} stopped {took:.1f} s after SIGTERM")
        assert took < 5, proc.output
        assert "Traceback" not in proc.output
        assert proc.count("stopped") == 1, proc.stderr
        assert proc.count("chunk in hand") == 0, proc.stderr  # it held none
