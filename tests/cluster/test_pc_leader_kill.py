"""pc on a three-node cluster: the node leading the quorum queue ``pc`` is SIGKILLed mid-stream.

Producers publish through node 1, which leads the queue; a consumer reads
through node 2. Two streams of producers run one after another so that some
are always mid-run: the kill is sure to catch them with messages unconfirmed.
Node 1 is then started again. What is promised: every message a producer had
confirmed (all of them, since each producer exits 0 only when all are) is
delivered; the producers caught by the kill reconnect to a surviving node and
publish again what was unconfirmed (on RabbitMQ 3.10, one that reconnects at
once may get a channel still pointing at the dead leader, which nacks: it
publishes again on a new connection); the restarted node rejoins the cluster and
the queue.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from pc.consumer import PREFETCH
from pc.producer import WINDOW
from tests.cluster.conftest import Cluster
from tests.conftest import Proc, Spawn, wait_until
from tests.faults.conftest import Report, Tally

pytestmark = [pytest.mark.xdist_group("cluster"), pytest.mark.timeout(420)]

QUEUE = "pc"
STREAMS = 2
# Several seconds of publishing each, so that the kill finds the first ones mid-run.
PER_PRODUCER = 15000
# Kill once the consumer has handled this many messages: well into the run.
BEFORE_KILL = 1000
RECEIVED = re.compile(r"#\d+ received '(.*)'( \(redelivered\))?$")


class Deliveries:
    """What the consumer logged as received, read incrementally (its log grows to some 50,000 lines)."""

    def __init__(self, consumer: Proc) -> None:
        self._lines = consumer.stderr_lines
        self._read = 0
        self.all: list[tuple[str, bool]] = []  # (text, redelivered), in order
        self.texts: set[str] = set()

    def update(self) -> int:
        """Read what is new; return how many deliveries so far."""
        end = len(self._lines)
        for line in self._lines[self._read : end]:
            if m := RECEIVED.search(line):
                self.all.append((m.group(1), bool(m.group(2))))
                self.texts.add(m.group(1))
        self._read = end
        return len(self.all)


@pytest.mark.timeout(420)
def test_every_confirmed_message_survives_the_queue_leaders_death(
    spawn: Spawn, cluster: Cluster, cluster_vhost: str, report: Report
) -> None:
    vhost = cluster_vhost
    through_node1 = cluster.url(vhost, 0, 1, 2)
    through_node2 = cluster.url(vhost, 1, 2, 0)
    started = time.monotonic()

    # The first producer declares the queue through node 1, which so becomes its leader.
    first = spawn("pc/producer.py", "--count", "100", "first", url=through_node1)
    assert first.wait(60) == 0, first.output
    assert cluster.leader(vhost, QUEUE) is cluster.nodes[0], "the queue should be led by node 1"
    assert len(cluster.members_of(vhost, QUEUE)) == 3, "pc should be a quorum queue on all 3 nodes"
    producers: list[tuple[str, Proc]] = [("first", first)]

    consumer = spawn("pc/consumer.py", url=through_node2)
    consumer.wait_for("waiting for messages")

    streaming = threading.Event()
    streaming.set()
    hung: list[str] = []

    def stream(name: str) -> None:
        """Run producers one after another until told to stop."""
        n = 0
        while streaming.is_set():
            n += 1
            text = f"{name}{n}"
            producer = spawn("pc/producer.py", "--count", str(PER_PRODUCER), text, url=through_node1)
            producers.append((text, producer))
            try:
                if producer.popen.wait(120) != 0:
                    return  # reported by the assertions below
            except subprocess.TimeoutExpired:
                hung.append(text)
                return

    streams = [threading.Thread(target=stream, args=(name,), daemon=True) for name in "ab"[:STREAMS]]
    for thread in streams:
        thread.start()

    deliveries = Deliveries(consumer)
    received = deliveries.update

    leader = cluster.nodes[0]
    wait_until(lambda: received() >= BEFORE_KILL, 120, f"the consumer to handle {BEFORE_KILL} messages")
    caught = [(text, proc) for text, proc in producers if proc.popen.poll() is None]
    assert caught, "no producer was mid-run at the kill"
    started_before_kill = len(producers)
    at_kill = received()
    killed_at = time.monotonic()
    leader.crash()

    # Deliveries resume once a new leader is elected among the two survivors.
    wait_until(lambda: received() > at_kill, 60, "deliveries to resume after the kill")
    resumed = time.monotonic() - killed_at
    wait_until(lambda: cluster.leader(vhost, QUEUE) not in (None, leader), 60, "a new leader")
    # Those caught mid-run reconnect to a surviving node (one that had every
    # confirm in hand at the kill may just finish); those started after the
    # kill find node 1 gone and connect to the next node in their AMQP_URL.
    wait_until(lambda: all(p.popen.poll() is not None for _, p in caught), 120, "the caught producers")
    reconnected = sum(1 for _, proc in caught if proc.count("reconnecting"))
    assert reconnected, "no producer had to reconnect: the kill came too late"
    wait_until(
        lambda: len(producers) >= started_before_kill + STREAMS, 60, "producers started after the kill"
    )
    streaming.clear()

    # The killed node comes back, rejoins the cluster, and holds its replica again.
    leader.start()
    cluster.wait_running(120)
    rejoined = time.monotonic() - killed_at
    wait_until(
        lambda: set(cluster.online_members(vhost, QUEUE)) == {node.name for node in cluster.nodes},
        60,
        "the restarted node's replica to be online again",
    )
    back_as_member = time.monotonic() - killed_at

    for thread in streams:
        thread.join(150)
    assert not hung, f"producers did not finish within 120 s: {hung}"
    failed = {text: proc.output for text, proc in producers if proc.wait(10) != 0}
    assert failed == {}, f"producers failed: {failed}"
    sent = [f"{text} {i}" for text, _ in producers[1:] for i in range(1, PER_PRODUCER + 1)]
    sent += [f"first {i}" for i in range(1, 101)]
    wait_until(
        lambda: deliveries.update() and len(deliveries.texts) >= len(sent),
        120,
        "every confirmed message to arrive",
    )
    wait_until(lambda: cluster.queue_depth(vhost, QUEUE) == 0, 30, "every message to be acked")
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0, consumer.output
    seconds = time.monotonic() - started

    deliveries.update()
    tally = Tally(sent, [text for text, _ in deliveries.all])
    fresh = Counter(text for text, redelivered in deliveries.all if not redelivered)
    republished = sum(n - 1 for n in fresh.values())
    redelivered = tally.duplicates - republished
    # Nacked on a channel left pointing at the dead leader, and published again on a new one.
    nacked = sum(1 for _, proc in producers if proc.count("WARNING the broker refused"))
    line = report(
        "cluster pc leader kill",
        sent=len(sent),
        delivered=tally.delivered,
        duplicates=tally.duplicates,
        lost=len(tally.lost),
        seconds=seconds,
        note=(
            f"{len(producers)} producers, {len(caught)} mid-run at the kill, "
            f"{reconnected} of them reconnected, {nacked} nacked and published again on a new connection; "
            f"{redelivered} redelivered, {republished} republished; deliveries resumed in {resumed:.1f} s; "
            f"node back in the cluster in {rejoined:.1f} s, its replica online in {back_as_member:.1f} s"
        ),
    )
    print(line)

    assert tally.lost == []
    assert tally.strangers == set()
    assert consumer.count("Traceback") == 0
    assert all(proc.count("Traceback") == 0 for _, proc in producers)
    # The consumer's connection (node 2) survived: whatever it held unacked came round at most once.
    assert redelivered <= PREFETCH
    assert republished <= WINDOW * reconnected
