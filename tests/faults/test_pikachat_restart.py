"""pikachat through a broker restart, with a sender talking all the while.

What is promised: a line sent while the receivers are listening reaches each
of them once, in order; a line sent while the broker is away may be lost,
and the sender says so. So the lines sent before the restart and after
everyone is back must all arrive in order at every receiver, and the lines
sent during it may be missing, but never duplicated or out of order.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from tests.conftest import BrokerNode, Proc, Spawn, wait_until
from tests.faults.conftest import Report

READY = "listening on exchange 'pikachat' at "
LINE = re.compile(r"^\d\d:\d\d:\d\d ash: ([abc]) (\d+)$")
BEFORE = AFTER = 100
# The pace of the lines typed while the broker restarts.
DURING_EVERY = 0.05


def heard(proc: Proc) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for line in proc.stdout_lines if (m := LINE.match(line))]


@pytest.mark.timeout(180)
def test_receivers_hear_every_line_said_while_they_listen_across_a_broker_restart(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, report: Report
) -> None:
    url = broker_node.url(node_vhost)
    started = time.monotonic()
    receivers = [spawn("pikachat/receive.py", url=url) for _ in range(2)]
    receivers.append(spawn("pikachat/chat.py", "--name", "misty", url=url, stdin=True))
    for receiver in receivers:
        receiver.wait_for(READY)
    sender = spawn("pikachat/send.py", "--name", "ash", url=url, stdin=True)
    sender.wait_for("sending to exchange")

    def all_heard(line: str) -> bool:
        return all(receiver.count(rf"ash: {line}$") for receiver in receivers)

    for i in range(1, BEFORE + 1):
        sender.send(f"a {i}")
    wait_until(lambda: all_heard(f"a {BEFORE}"), 30, "every receiver to hear the lines before the restart")

    # Keep typing while the broker restarts, until everyone is back.
    talking = threading.Event()
    talking.set()
    during: list[int] = []

    def talk() -> None:
        while talking.is_set():
            during.append(len(during) + 1)
            sender.send(f"b {during[-1]}")
            time.sleep(DURING_EVERY)  # typing pace, not a wait for a condition

    talker = threading.Thread(target=talk, daemon=True)
    talker.start()
    broker_node.restart()
    for receiver in receivers:
        wait_until(lambda r=receiver: r.count(READY) == 2, 60, "the receiver to listen again")
    sender.wait_for("reconnected to", timeout=60)
    talking.clear()
    talker.join()

    for i in range(1, AFTER + 1):
        sender.send(f"c {i}")
    wait_until(lambda: all_heard(f"c {AFTER}"), 30, "every receiver to hear the lines after the restart")
    sender.close_stdin()
    assert sender.wait() == 1, sender.output  # lines typed while the broker was away were not sent
    seconds = time.monotonic() - started

    # Every figure below is counted from what the processes printed.
    order = {"a": 0, "b": 1, "c": 2}
    typed = (
        [("a", i) for i in range(1, BEFORE + 1)]
        + [("b", n) for n in during]
        + [("c", i) for i in range(1, AFTER + 1)]
    )
    promised = [line for line in typed if line[0] != "b"]
    unsent = {int(n) for n in re.findall(r"could not send 'b (\d+)'", sender.stderr)}
    nobody = {int(n) for n in re.findall(r"'b (\d+)' reached no one", sender.stderr)}
    missing, duplicates = 0, 0
    reached_all = set(typed)
    for receiver in receivers:
        lines = heard(receiver)
        duplicates += len(lines) - len(set(lines))
        assert lines == sorted(lines, key=lambda line: (order[line[0]], line[1])), "out of order"
        assert set(lines) <= set(typed), "a line nobody typed"
        missing += len(set(promised) - set(lines))
        reached_all &= set(lines)
    during_heard = sum(1 for kind, _ in reached_all if kind == "b")
    line = report(
        "pikachat restart",
        sent=len(typed),
        delivered=len(reached_all),
        duplicates=duplicates,
        lost=missing,
        seconds=seconds,
        note=(
            f"{len(receivers)} receivers; delivered = heard by all; of {len(during)} lines typed during the "
            f"restart, {len(unsent)} reported unsent, {len(nobody)} reported heard by no one, "
            f"{during_heard} heard by all"
        ),
    )
    print(line)
    assert missing == 0
    assert duplicates == 0
    assert unsent, "the sender should have reported lines it could not send"
    for proc in [*receivers, sender]:
        assert "Traceback" not in proc.output
