"""A three-node RabbitMQ cluster on this machine, for the scenarios that lose a node.

The nodes are private (own names, ports, data and logs in a temporary folder),
share one HOME and so one Erlang cookie, and are joined into one cluster: the
second and third node ``stop_app``, ``join_cluster`` the first, ``start_app``.
That takes about 20 s and 140 MB per node, so one cluster serves every test in
this folder: they all carry ``xdist_group("cluster")`` and run one after the
other in one worker (``--dist loadgroup``). Each test gets a virtual host of
its own and finds every node running and clustered; a node it killed is started
again for the next one. Every node is killed at the end, whatever happened.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerNode, make_vhost, rabbitmqctl, wait_until
from tests.faults.conftest import report  # noqa: F401 - the fault suite's figures, for these scenarios too

SIZE = 3
# Starting three nodes on a busy 2-core machine.
START_TIMEOUT = 180


class ClusterNode(BrokerNode):
    """One node of the cluster: a BrokerNode that shares its HOME (the Erlang cookie) with the others."""

    def __init__(self, base: Path, home: Path) -> None:
        super().__init__(base)
        self.env["HOME"] = str(home)
        self.env["RABBITMQ_PID_FILE"] = str(base / "beam.pid")

    def crash(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash would; the rest of its process group follows."""
        assert self.process is not None
        pid = int((self.base / "beam.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        # Then whatever else runs in the node's process group (the server
        # script, the VM's helper processes): one of them may hold the node's
        # listening socket, where new connections would hang instead of being refused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def __repr__(self) -> str:
        return self.name


class Cluster:
    """Three ClusterNodes joined into one RabbitMQ cluster."""

    def __init__(self, base: Path) -> None:
        home = base / "home"
        home.mkdir()
        self.nodes: list[ClusterNode] = []
        for i in range(1, SIZE + 1):
            node_base = base / f"node{i}"
            node_base.mkdir()
            self.nodes.append(ClusterNode(node_base, home))

    def start(self) -> None:
        # The first node writes the Erlang cookie that the others then read.
        self.nodes[0].start()
        with concurrent.futures.ThreadPoolExecutor(SIZE - 1) as pool:
            list(pool.map(ClusterNode.start, self.nodes[1:]))
        for node in self.nodes[1:]:
            rabbitmqctl("stop_app", node=node)
            rabbitmqctl("join_cluster", self.nodes[0].name, node=node)
            rabbitmqctl("start_app", node=node)
        self.wait_running(START_TIMEOUT)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def any_running(self) -> ClusterNode:
        return next(node for node in self.nodes if node.running)

    def ctl(self, *args: str) -> str:
        """rabbitmqctl on a running node."""
        return rabbitmqctl(*args, node=self.any_running())

    def running_nodes(self, node: ClusterNode | None = None) -> set[str]:
        """The nodes that ``node`` (else any running one) sees running in the cluster."""
        out = rabbitmqctl("eval", "rabbit_nodes:all_running().", node=node or self.any_running())
        return set(_atoms(out))

    def members(self) -> set[str]:
        """Every node the cluster knows, running or not."""
        return set(_atoms(self.ctl("eval", "rabbit_nodes:all().")))

    def wait_running(self, timeout: float) -> None:
        """Wait until every node runs and each sees all the others running."""
        names = {node.name for node in self.nodes}

        def all_up() -> bool:
            try:
                return all(self.running_nodes(node) == names for node in self.nodes)
            except RuntimeError:
                return False

        wait_until(all_up, timeout, f"all {SIZE} nodes running in one cluster")

    def heal(self) -> None:
        """Start again any node a test left down, and wait until the cluster is whole."""
        down = [node for node in self.nodes if not node.running]
        for node in down:
            node.start()
        self.wait_running(START_TIMEOUT)

    def url(self, vhost: str, *order: int) -> str:
        """A comma-separated AMQP_URL naming the nodes in ``order`` (indexes), all of them by default."""
        nodes = [self.nodes[i] for i in order] if order else self.nodes
        return ",".join(node.url(vhost) for node in nodes)

    def leader(self, vhost: str, queue: str) -> ClusterNode | None:
        """The node that leads quorum queue ``queue`` now, or None if it has none or does not exist."""
        out = self.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            name, _, leader = line.rpartition("\t")
            if name == queue:
                return next((node for node in self.nodes if node.name == leader), None)
        return None

    def members_of(self, vhost: str, queue: str) -> list[str]:
        """The nodes holding a replica of quorum queue ``queue``."""
        out = self.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "members")
        for line in out.splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return _atoms(members)
        return []

    def online_members(self, vhost: str, queue: str) -> list[str]:
        """The nodes whose replica of quorum queue ``queue`` is online."""
        out = self.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "online")
        for line in out.splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return _atoms(members)
        return []

    def queue_depth(self, vhost: str, queue: str) -> int | None:
        """Messages in ``queue`` (ready + unacked), or None if it does not exist."""
        out = self.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages")
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name == queue:
                return int(count)
        return None

    def connections(self, vhost: str) -> dict[str, int]:
        """How many client connections each node holds in ``vhost``."""
        counts = {node.name: 0 for node in self.nodes}
        out = self.ctl("list_connections", "-q", "--no-table-headers", "vhost", "pid")
        for line in out.splitlines():
            conn_vhost, _, pid = line.partition("\t")
            if conn_vhost != vhost:
                continue
            for node in self.nodes:
                # A connection's pid prints as <NODE.N.N>; ask its node instead of parsing.
                if node.name in pid:
                    counts[node.name] += 1
        return counts


def _atoms(erlang_list: str) -> list[str]:
    """The node names in an Erlang list as rabbitmqctl prints it: ['a@localhost','b@localhost']."""
    text = erlang_list.strip().strip("[]")
    return [atom.strip().strip("'") for atom in text.replace("\n", " ").split(",") if atom.strip()]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The three-node cluster, whole at the start of each test that asks for it."""
    with tempfile.TemporaryDirectory(prefix="pyclass-cluster-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.kill()


@pytest.fixture
def cluster_vhost(cluster: Cluster) -> Iterator[str]:
    """A fresh virtual host on the cluster; every node is running when the test starts and after it."""
    cluster.heal()
    name = make_vhost(cluster.any_running())
    yield name
    cluster.heal()
    cluster.ctl("delete_vhost", name)


@pytest.fixture
def amqp_url(cluster: Cluster, cluster_vhost: str) -> str:
    """Scripts started by ``spawn`` talk to the cluster (every node, first to last) unless told otherwise."""
    return cluster.url(cluster_vhost)
