"""PipelinedOpExecutor servers (tests/distop_server.py) take a chunk ahead while ops are short, and never keep
one waiting behind a long op; a plain OpExecutor takes one chunk at a time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distop.ops import WORK_QUEUE, DistOp
from tests.conftest import Spawn, messages_ready, rabbitmqctl, wait_until

SERVER = "tests/distop_server.py"
LONG_OP = 1.0  # seconds: far longer than a round trip to the broker
# A server of the plain OpExecutor, as docs/distop.md's FooExecutor is.
PLAIN_SERVER = """
import sys
from distop.callee import serve
from distop.ops import OpExecutor

class PlainExecutor(OpExecutor):
    def nop(self, chunk):
        return chunk

sys.exit(serve(PlainExecutor, "a plain OpExecutor"))
"""


class ListOp(DistOp):
    OP_NAME = "nop"

    def gather(self, partials: dict[int, Any]) -> list[Any]:
        return [x for part in partials.values() for x in part]


class SleepOp(ListOp):
    OP_NAME = "sleep"


def consumers(vhost: str) -> int:
    """How many consumers the work queue has: one per server, two for a server taking a chunk ahead."""
    out = rabbitmqctl("list_consumers", "-p", vhost, "-q", "--no-table-headers", "queue_name")
    return sum(line.strip() == WORK_QUEUE for line in out.splitlines())


def short_jobs(amqp_url: str) -> None:
    with ListOp(list(range(400)), group_size=200, rabbit_host=amqp_url) as op:
        for _ in range(3):
            op.call()
            assert op.get_result(timeout=60) == list(range(400))


def test_a_server_takes_a_chunk_ahead_while_ops_are_short_and_gives_it_back_behind_a_long_one(
    spawn: Spawn, amqp_url: str, vhost: str, tmp_path: Path
) -> None:
    spawn(SERVER).wait_for("serving")
    wait_until(lambda: consumers(vhost) == 1, 10, "the server's consumer")
    short_jobs(amqp_url)
    wait_until(lambda: consumers(vhost) == 2, 10, "a second consumer after short ops")
    log = tmp_path / "runs.log"
    with SleepOp([0], 1, amqp_url) as long_op, ListOp([1], 1, amqp_url) as short_op:
        # Long enough for rabbitmqctl to look, even on a busy machine.
        long_op.call(seconds=5 * LONG_OP, log=str(log))
        wait_until(log.exists, 10, "the long op to start")
        short_op.call()
        # The second consumer took the short chunk, then gave it back rather than keep it waiting.
        wait_until(lambda: consumers(vhost) == 1, 4 * LONG_OP, "one consumer again during a long op")
        assert messages_ready(amqp_url, WORK_QUEUE) == 1
        assert long_op.get_result(timeout=30) == [0]
        assert short_op.get_result(timeout=30) == [1]
    assert log.read_text().splitlines() == ["start 0"]


def test_a_chunk_never_waits_behind_a_long_op(spawn: Spawn, amqp_url: str, tmp_path: Path) -> None:
    servers = [spawn(SERVER) for _ in range(2)]
    for server in servers:
        server.wait_for("serving")
    log = tmp_path / "runs.log"
    for job in range(4):
        short_jobs(amqp_url)  # both servers take chunks ahead now
        with SleepOp([job, job], 2, amqp_url) as op:
            started = time.monotonic()
            op.call(seconds=LONG_OP, log=str(log))
            assert op.get_result(timeout=30) == [job, job]
            elapsed = time.monotonic() - started
        # In parallel, not one after the other on the server that took both.
        assert elapsed < 1.7 * LONG_OP, f"job {job}: {elapsed:.2f} s for 2 chunks of {LONG_OP} s on 2 servers"
    # A chunk given back had not started: each ran once.
    assert log.read_text().splitlines() == [f"start {job}" for job in range(4) for _ in range(2)]


def test_a_plain_op_executor_never_takes_a_chunk_ahead(
    spawn: Spawn, amqp_url: str, vhost: str, tmp_path: Path
) -> None:
    script = tmp_path / "plain_server.py"
    script.write_text(PLAIN_SERVER)
    spawn(str(script)).wait_for("serving")
    wait_until(lambda: consumers(vhost) == 1, 10, "the server's consumer")
    for _ in range(2):
        short_jobs(amqp_url)  # a PipelinedOpExecutor has its second consumer after 3 short ops
    assert consumers(vhost) == 1
