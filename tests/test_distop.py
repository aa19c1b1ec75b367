"""distop against the real broker: the client library in the test, real server processes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pika
import pytest

from distop.ops import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    WORK_QUEUE,
    WORK_QUEUE_ARGUMENTS,
    BrokerError,
    DistOp,
    DistOpError,
    OpExecutor,
    PoisonChunkError,
    RemoteError,
    split,
)
from tests.conftest import (
    ROOT,
    BrokerNode,
    Proc,
    Spawn,
    make_vhost,
    messages_ready,
    queue_depth,
    rabbitmqctl,
    run_to_end,
    wait_until,
)
from tests.faults.conftest import memory_alarm

SERVER = "tests/distop_server.py"
LESSON = (ROOT / "docs" / "distop.md").read_text()


class ListOp(DistOp):
    OP_NAME = "nop"

    def gather(self, partials: dict[int, Any]) -> list[Any]:
        return [x for part in partials.values() for x in part]


def op_class(name: str) -> type[ListOp]:
    return type(f"{name}Op", (ListOp,), {"OP_NAME": name})


def start_server(spawn: Spawn, *args: str, **kwargs: Any) -> Proc:
    server = spawn(SERVER, *args, **kwargs)
    server.wait_for("serving")
    return server


def test_results_come_back_in_order(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    start_server(spawn)
    with op_class("pow")(list(range(100)), group_size=7, rabbit_host=amqp_url) as op:
        op.call(esp=2)
        assert op.get_result(timeout=30) == [x**2 for x in range(100)]


def test_default_gather_returns_the_partials_in_order(spawn: Spawn, amqp_url: str) -> None:
    class PlusOne(DistOp):
        OP_NAME = "plusone"

    start_server(spawn)
    with PlusOne(list(range(10)), group_size=3, rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=30) == [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10]]


def test_uneven_split_gives_partials_keyed_by_start_index(spawn: Spawn, amqp_url: str) -> None:
    seen: dict[int, Any] = {}

    class Recording(DistOp):
        OP_NAME = "nop"

        def gather(self, partials: dict[int, Any]) -> None:
            seen.update(partials)

    start_server(spawn)
    with Recording(list("abcdefghij"), group_size=3, rabbit_host=amqp_url) as op:
        op.call()
        op.get_result(timeout=30)
    assert list(seen.items()) == [(0, list("abcd")), (4, list("efg")), (7, list("hij"))]


@pytest.mark.parametrize(
    ("length", "group_size", "sizes"),
    [(10, 3, [4, 3, 3]), (9, 3, [3, 3, 3]), (2, 5, [1, 1]), (7, 1, [7]), (5, 4, [2, 1, 1, 1])],
)
def test_split_sizes_differ_by_at_most_one(length: int, group_size: int, sizes: list[int]) -> None:
    chunks = split(list(range(length)), group_size)
    assert [len(chunk) for _, chunk in chunks] == sizes
    assert [x for _, chunk in chunks for x in chunk] == list(range(length))
    assert [start for start, _ in chunks] == [sum(sizes[:i]) for i in range(len(sizes))]


def test_group_size_larger_than_data(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    with ListOp([1, 2], group_size=5, rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=30) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"data": []}, ValueError, "non-empty"),
        ({"data": [1], "group_size": 0}, ValueError, "at least 1"),
        ({"data": [1], "group_size": -3}, ValueError, "at least 1"),
        ({"data": [1], "group_size": 1.5}, TypeError, "int"),
        ({"data": [object()]}, TypeError, "JSON"),
        ({"data": [1], "rabbit_host": "http://nowhere"}, BrokerError, "amqp://"),
        ({"data": "abc"}, TypeError, "data must be a list, not str"),
        ({"data": {1, 2}}, TypeError, "data must be a list, not set"),
        ({"data": [1], "rabbit_host": 5672}, TypeError, "rabbit_host must be a str"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        ListOp(**kwargs)


@pytest.mark.parametrize(
    ("rabbit_host", "error", "text"),
    [
        (5672, TypeError, "^rabbit_host must be a str, a host name or URL, not int$"),
        (b"localhost", TypeError, "^rabbit_host must be a str, a host name or URL, not bytes$"),
        ("http://nowhere", BrokerError, "amqp://"),
    ],
)
def test_op_executor_bad_arguments(rabbit_host: Any, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        OpExecutor(rabbit_host)  # nothing connects before run()


@pytest.mark.parametrize("data", [[0, 1, 2], (0, 1, 2), range(3)], ids=["list", "tuple", "range"])
def test_data_may_be_any_sequence(data: Any) -> None:
    assert ListOp(data, group_size=2).data == [0, 1, 2]  # nothing connects before call()


def test_op_name_is_required() -> None:
    class Nameless(DistOp):
        pass

    with pytest.raises(TypeError, match="OP_NAME"):
        Nameless([1])


def test_params_must_be_json(amqp_url: str) -> None:
    with ListOp([1], rabbit_host=amqp_url) as op, pytest.raises(TypeError, match="JSON"):
        op.call(when=object())


@pytest.mark.parametrize("name", ["data", "params"])
def test_a_lone_surrogate_is_refused_before_anything_is_published(amqp_url: str, name: str) -> None:
    text = "caf\ud800"  # half a UTF-16 pair: UTF-8, JSON's encoding on the wire, cannot hold it
    error = f"{name} must be JSON-serialisable: '\\ud800' is half a UTF-16 pair, which UTF-8 cannot carry"
    data = [1, {text: 1}] if name == "data" else [1]  # in data, a key; in params, a value
    with pytest.raises(TypeError, match=f"^{re.escape(error)}$"), ListOp(data, rabbit_host=amqp_url) as op:
        op.call(name=text)
    assert messages_ready(amqp_url, WORK_QUEUE) is None  # refused before anything was published


@pytest.mark.parametrize("timeout", [-1, math.nan])
def test_get_result_refuses_a_negative_or_nan_timeout_at_once(amqp_url: str, timeout: float) -> None:
    with ListOp([1], rabbit_host=amqp_url) as op:
        job = op.call()  # no server: the job would wait
        with pytest.raises(ValueError, match=f"timeout must be 0 or more seconds, not {timeout}"):
            op.get_result(job, timeout=timeout)
        assert op.pending() == [job]


@pytest.mark.parametrize(("timeout", "kind"), [("5", "str"), (True, "bool"), ([5], "list")])
def test_get_result_refuses_a_timeout_that_is_not_a_number_at_once(
    amqp_url: str, timeout: Any, kind: str
) -> None:
    with ListOp([1], rabbit_host=amqp_url) as op:
        job = op.call()  # no server: the job would wait
        started = time.monotonic()
        with pytest.raises(TypeError, match=f"^timeout must be a number of seconds or None, not {kind}$"):
            op.get_result(job, timeout=timeout)
        assert time.monotonic() - started < 0.5  # at once, without waiting
        assert op.pending() == [job]


def test_an_infinite_or_huge_timeout_waits_for_the_result(spawn: Spawn, amqp_url: str) -> None:
    with op_class("sleep")([1, 2], group_size=2, rabbit_host=amqp_url) as op:
        first, second = op.call(seconds=0.5), op.call(seconds=0.5)
        start_server(spawn)  # one server: the second job's chunks wait for the first's
        assert op.get_result(first, timeout=math.inf) == [1, 2]  # math.inf: no timeout, as None
        assert op.get_result(second, timeout=1e10) == [1, 2]  # longer than a lock may wait at once


def test_concurrent_jobs_on_one_object(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    start_server(spawn)
    with op_class("pow")(list(range(20)), group_size=4, rabbit_host=amqp_url) as op:
        jobs = {esp: op.call(esp=esp) for esp in (1, 2, 3)}
        assert len(set(jobs.values())) == 3
        for esp in (3, 1, 2):  # collected in any order
            assert op.get_result(jobs[esp], timeout=30) == [x**esp for x in range(20)]
        assert op.pending() == []


def test_job_id_may_be_left_out_only_with_one_job_pending(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    with ListOp([1, 2, 3], rabbit_host=amqp_url) as op:
        with pytest.raises(ValueError, match="0 jobs"):
            op.get_result()
        first = op.call()
        second = op.call()
        with pytest.raises(ValueError, match="2 jobs"):
            op.get_result()
        with pytest.raises(ValueError, match="no pending job"):
            op.get_result("not-a-job")
        assert op.get_result(first, timeout=30) == [1, 2, 3]
        assert op.get_result(timeout=30) == [1, 2, 3]  # only `second` is left
        assert second not in op.pending()


def test_timeout_then_a_late_server_finishes_the_job(spawn: Spawn, amqp_url: str) -> None:
    with op_class("plusone")(list(range(6)), group_size=2, rabbit_host=amqp_url) as op:
        op.call()
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="0 of 2 partial results"):
            op.get_result(timeout=1)
        assert 1 <= time.monotonic() - started < 3
        # The client started before any server: its chunks waited in the queue.
        start_server(spawn)
        assert op.get_result(timeout=30) == [1, 2, 3, 4, 5, 6]


def test_remote_error_is_raised_with_type_message_and_host(spawn: Spawn, amqp_url: str) -> None:
    server = start_server(spawn)
    with op_class("fail")(["bad"], rabbit_host=amqp_url) as op:
        op.call()
        with pytest.raises(RemoteError) as caught:
            op.get_result(timeout=30)
    assert caught.value.exc_type == "ValueError"
    assert caught.value.message == "cannot handle 'bad'"
    assert caught.value.host == socket.gethostname()
    assert str(caught.value) == f"ValueError on {socket.gethostname()}: cannot handle 'bad'"
    # ...and the server is still serving.
    with ListOp([7], rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=30) == [7]
    assert server.popen.poll() is None


@pytest.mark.parametrize(
    ("op_call", "exc_type", "text"),
    [
        (("nosuchop", {}), "UnknownOpError", "no op 'nosuchop' here; this server offers: "),
        (("pow", {"bogus": 1}), "TypeError", "bogus"),
        (("unserialisable", {}), "TypeError", "not JSON-serialisable"),
    ],
)
def test_bad_requests_become_remote_errors(
    spawn: Spawn, amqp_url: str, op_call: tuple[str, dict[str, Any]], exc_type: str, text: str
) -> None:
    name, params = op_call
    start_server(spawn)
    with op_class(name)([1, 2], rabbit_host=amqp_url) as op:
        op.call(**params)
        with pytest.raises(RemoteError, match=text) as caught:
            op.get_result(timeout=30)
    assert caught.value.exc_type == exc_type


def test_a_server_killed_mid_chunk_loses_nothing(spawn: Spawn, amqp_url: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    victim = start_server(spawn)
    with op_class("sleep")(list(range(4)), group_size=4, rabbit_host=amqp_url) as op:
        op.call(seconds=0.5, log=str(log))
        wait_until(lambda: log.exists() and log.read_text(), 15, "the victim to start a chunk")
        victim.signal(signal.SIGKILL)
        victim.wait()
        start_server(spawn)
        assert op.get_result(timeout=30) == [0, 1, 2, 3]
    runs = log.read_text().split("\n")
    assert set(runs) - {""} == {f"start {i}" for i in range(4)}


def test_malformed_messages_are_rejected_and_the_server_keeps_serving(
    spawn: Spawn, amqp_url: str, vhost: str
) -> None:
    server = start_server(spawn)
    garbage = [
        (b"\x00\xff binary", {"reply_to": "nowhere", "correlation_id": "x:0"}),
        (b'{"op": "nop", "chunk": [1', {"reply_to": "nowhere", "correlation_id": "x:0"}),
        (json.dumps({"op": 5, "chunk": [1]}).encode(), {"reply_to": "nowhere", "correlation_id": "x:0"}),
        (json.dumps({"op": "nop", "chunk": "1"}).encode(), {"reply_to": "nowhere", "correlation_id": "x:0"}),
        (
            json.dumps({"op": "nop", "chunk": [1], "params": []}).encode(),
            {"reply_to": "q", "correlation_id": "x:0"},
        ),
        (json.dumps({"op": "nop", "chunk": [1]}).encode(), {"correlation_id": "x:0"}),
        (json.dumps({"op": "nop", "chunk": [1]}).encode(), {"reply_to": "nowhere"}),
        (json.dumps(["op", "nop"]).encode(), {"reply_to": "nowhere", "correlation_id": "x:0"}),
    ]
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        # Confirms: every message is in the queue before the connection closes.
        channel.confirm_delivery()
        for body, props in garbage:
            channel.basic_publish("", WORK_QUEUE, body, pika.BasicProperties(**props))

    wait_until(lambda: server.count("rejected a malformed message") == len(garbage), 15, "every rejection")
    with ListOp([1, 2], rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=30) == [1, 2]
    # Rejected, not requeued: they wait in the dead-letter queue for inspection.
    wait_until(lambda: queue_depth(vhost, DEAD_LETTER_QUEUE) == len(garbage), 10, "dead letters")
    assert queue_depth(vhost, WORK_QUEUE) == 0
    assert "Traceback" not in server.output


def test_a_long_chunk_under_a_short_heartbeat_runs_once(spawn: Spawn, amqp_url: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    server = start_server(spawn, url=amqp_url + "?heartbeat=2")
    with op_class("sleep")(["long"], rabbit_host=amqp_url) as op:
        op.call(seconds=12, log=str(log))
        assert op.get_result(timeout=60) == ["long"]
    assert log.read_text() == "start long\n"
    assert "lost the broker" not in server.output


def test_a_poison_chunk_becomes_an_error_not_a_hang(spawn: Spawn, amqp_url: str) -> None:
    deaths = 0
    with op_class("die_on")([1, 2, 3, 4], group_size=2, rabbit_host=amqp_url) as op:
        op.call(value=3)
        server = start_server(spawn)
        deadline = time.monotonic() + 60
        while True:
            try:
                op.get_result(timeout=0.2)
                pytest.fail("the job should have failed")
            except PoisonChunkError as exc:
                assert "index 2" in str(exc)
                assert f"delivered {DELIVERY_LIMIT + 1} times" in str(exc)
                break
            except TimeoutError:
                pass
            # Play the supervisor that restarts crashed servers.
            if server.popen.poll() is not None:
                assert server.popen.returncode == 3
                deaths += 1
                server = start_server(spawn)
            assert time.monotonic() < deadline, "no PoisonChunkError within 60 s"
    assert server.wait() == 3  # the last one to take it died too
    deliveries = deaths + 1
    assert deliveries == DELIVERY_LIMIT + 1
    # The lesson says the same.
    promise = re.search(r"Poison chunks end.\*\* A chunk delivered (\d+) times.*?a (\d+)th", LESSON, re.S)
    assert promise is not None
    assert (int(promise[1]), int(promise[2])) == (deliveries, deliveries + 1)
    assert f"more than `DELIVERY_LIMIT`, {DELIVERY_LIMIT}, times" in " ".join(LESSON.split())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_when_idle(spawn: Spawn, signum: int) -> None:
    server = start_server(spawn)
    server.signal(signum)
    assert server.wait() == 0
    assert server.stderr_lines[-1].endswith("stopped")
    assert "Traceback" not in server.output


def test_server_finishes_the_chunk_in_hand_on_sigterm(spawn: Spawn, amqp_url: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    server = start_server(spawn)
    with op_class("sleep")(["in hand"], rabbit_host=amqp_url) as op:
        op.call(seconds=2, log=str(log))
        wait_until(lambda: log.exists() and log.read_text(), 15, "the chunk to start")
        server.signal(signal.SIGTERM)
        assert op.get_result(timeout=30) == ["in hand"]
    assert server.wait() == 0
    assert "Traceback" not in server.output


def test_client_cli_prints_the_result(spawn: Spawn) -> None:
    start_server(spawn)
    start_server(spawn)
    client = run_to_end(
        spawn, "distop/client.py", "--op", "pow", "--param", "esp=3", "--size", "10", "--chunks", "4"
    )
    assert client.popen.returncode == 0, client.output
    assert json.loads(client.stdout) == [x**3 for x in range(10)]


def test_client_cli_reports_a_remote_error(spawn: Spawn) -> None:
    start_server(spawn)
    client = run_to_end(spawn, "distop/client.py", "--op", "fail")
    assert client.popen.returncode == 1
    assert client.stderr_lines == [f"client: ValueError on {socket.gethostname()}: cannot handle 0"]


def test_client_cli_times_out(spawn: Spawn) -> None:
    client = run_to_end(spawn, "distop/client.py", "--timeout", "1")
    assert client.popen.returncode == 1
    assert len(client.stderr_lines) == 1 and "0 of 3 partial results within 1.0 s" in client.stderr


def test_a_blocked_client_says_so_at_once_and_its_timeout_names_the_alarm(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    with memory_alarm(broker_node):
        client = spawn("distop/client.py", "-q", "--timeout", "4", url=broker_node.url(node_vhost))
        client.wait_for(r"WARNING the broker has blocked this connection: .* \(memory or disk alarm\)$", 10)
        assert client.wait(30) == 1, client.output
    assert client.stderr_lines[-1].endswith(
        "0 of 3 partial results within 4.0 s (the broker has blocked publishing: memory or disk alarm)"
    ), client.stderr
    assert client.count("blocked this connection") == 1 and "Traceback" not in client.output


def test_rabbit_host_argument_wins_over_amqp_url(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    client = run_to_end(spawn, "distop/client.py", amqp_url, "--op", "plusone", url="amqp://x:y@127.0.0.1:1/")
    assert client.popen.returncode == 0, client.output
    assert json.loads(client.stdout) == list(range(1, 31))


def test_caller_sample_collects_both_jobs(spawn: Spawn) -> None:
    start_server(spawn)
    caller = run_to_end(spawn, "distop/caller.py")
    assert caller.popen.returncode == 0, caller.output
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in caller.stdout_lines
    assert "cubes:   [0, 1, 8, 27, 64, 125, 216, 343, 512, 729]" in caller.stdout_lines


@pytest.mark.parametrize("script", ["distop/caller.py", "distop/client.py"])
def test_ctrl_c_while_a_client_waits_is_one_line_and_exit_1(spawn: Spawn, amqp_url: str, script: str) -> None:
    # No server: the client waits in get_result() until Ctrl-C, once its chunks are in the work queue.
    client = spawn(script, "-q") if script.endswith("client.py") else spawn(script)
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE), 15, "the client's chunks in the work queue")
    client.signal(signal.SIGINT)
    assert client.wait() == 1, client.output
    assert client.stderr_lines == [f"{Path(script).stem}: interrupted"], client.output


def test_import_does_not_connect() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import distop.ops, distop.callee, distop.caller, distop.client"],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "AMQP_URL": "amqp://x:y@127.0.0.1:1/"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == ""


def test_jobs_in_flight_survive_a_broker_restart(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, tmp_path: Path
) -> None:
    url = broker_node.url(node_vhost)
    log = tmp_path / "runs.log"
    servers = [start_server(spawn, url=url) for _ in range(2)]
    data = list(range(16))
    with op_class("sleep")(data, group_size=8, rabbit_host=url) as op:
        jobs = [op.call(seconds=0.3, log=str(log)) for _ in range(3)]
        wait_until(lambda: log.exists() and log.read_text(), 15, "the first chunk to start")
        broker_node.restart()
        late = op.call(seconds=0.3)  # submitted while the client may still be reconnecting
        for server in servers:
            server.wait_for("lost the broker")
        for job in [*jobs, late]:
            assert op.get_result(job, timeout=60) == data
    for server in servers:  # each says where it serves again
        server.wait_for(r"serving again on 'distop.chunks' at amqp://guest@127\.0\.0\.1:\d+/")


# --- The server keeps serving whatever the broker or an op does ------------------------------------

# RabbitMQ checks consumer_timeout on each channel's tick: every 60 s by default
# (channel_tick_interval), so a 2 s timeout fires 2 to 62 s after the delivery.
# The node below ticks every second: the channel closes about 3 s after it.
CONSUMER_TIMEOUT_MS = 2000
MAX_MESSAGE_SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def short_timeout_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerNode]:
    """A private node whose consumer_timeout is 2 s, checked every second, and which takes messages of 1 MiB
    at most."""
    base = tmp_path_factory.mktemp("short-timeout-node")
    config = f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\nmax_message_size = {MAX_MESSAGE_SIZE}\n"
    node = BrokerNode(base, config=config)
    (base / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
    node.env["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(base / "advanced.config")
    node.start()
    yield node
    node.kill()


def test_a_chunk_past_the_consumer_timeout_does_not_end_the_server(
    spawn: Spawn, short_timeout_node: BrokerNode, tmp_path: Path
) -> None:
    vhost = make_vhost(short_timeout_node)
    url = short_timeout_node.url(vhost)
    log = tmp_path / "runs.log"
    server = start_server(spawn, url=url)
    with op_class("sleep_once")(["long"], rabbit_host=url) as op:
        op.call(seconds=6, log=str(log))
        # The broker closes the server's channel mid-op; the reply still comes.
        assert op.get_result(timeout=30) == ["long"]
    assert server.count("consumer_timeout") == 1, server.output
    assert "rabbitmq.conf" in server.stderr and "x-consumer-timeout" in server.stderr
    # It keeps serving: the chunk the broker took back runs again (quickly), and new jobs are served.
    with ListOp([1, 2, 3], group_size=2, rabbit_host=url) as op:
        op.call()
        assert op.get_result(timeout=30) == [1, 2, 3]
    wait_until(
        lambda: queue_depth(vhost, WORK_QUEUE, node=short_timeout_node) == 0, 15, "the work queue to drain"
    )
    assert queue_depth(vhost, DEAD_LETTER_QUEUE, node=short_timeout_node) == 0
    assert log.read_text() == "start long\nstart long\n"
    assert server.popen.poll() is None and "Traceback" not in server.output


def test_a_server_whose_queue_is_deleted_declares_it_again(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    server = start_server(spawn)
    rabbitmqctl("delete_queue", "-p", vhost, WORK_QUEUE)
    server.wait_for("cancelled our consumer")
    wait_until(
        lambda: queue_depth(vhost, WORK_QUEUE) is not None, 15, "the server to declare the queue again"
    )
    with ListOp([1, 2, 3], rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=15) == [1, 2, 3]
    assert server.count("cancelled our consumer") == 1
    assert server.popen.poll() is None and "Traceback" not in server.output


def test_a_server_exits_1_when_its_queue_is_declared_otherwise(spawn: Spawn, amqp_url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare(WORK_QUEUE, durable=True)  # a classic queue, no delivery limit
    server = spawn(SERVER)
    assert server.wait() == 1
    assert len(server.stderr_lines) == 1 and "refused" in server.stderr, server.stderr
    assert "PRECONDITION_FAILED" in server.stderr
    assert f"delete it with 'rabbitmqctl delete_queue {WORK_QUEUE}'" in server.stderr


@pytest.mark.parametrize(
    "case",
    [
        ("deep", "TypeError", "not JSON-serialisable"),
        ("exit", "SystemExit", "exit inside an op on [1, 2]"),
        ("unprintable", "UnprintableError", "cannot be shown"),
        ("half_pair", "TypeError", "not JSON-serialisable"),
        ("half_pair_error", "ValueError", "not UTF-8: \\udcff"),  # escaped: UTF-8 cannot carry it
    ],
)
def test_whatever_an_op_raises_the_server_answers_and_keeps_serving(
    spawn: Spawn, amqp_url: str, vhost: str, case: tuple[str, str, str]
) -> None:
    name, exc_type, text = case
    server = start_server(spawn)
    with op_class(name)([1, 2], rabbit_host=amqp_url) as op:
        op.call()
        with pytest.raises(RemoteError, match=re.escape(text)) as caught:
            op.get_result(timeout=15)
    assert caught.value.exc_type == exc_type
    with ListOp([7], rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=15) == [7]
    assert queue_depth(vhost, WORK_QUEUE) == 0  # every chunk taken was acked
    assert server.popen.poll() is None and "Traceback" not in server.output
    assert "Logging error" not in server.output


def test_a_server_replies_only_to_a_client_reply_queue(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    server = start_server(spawn)
    chunk = json.dumps({"op": "nop", "chunk": [1], "params": {}}).encode()
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_declare("victim", durable=True)
        channel.confirm_delivery()
        for reply_to in ["victim", "amq.gen", "amq.gen-"]:
            props = pika.BasicProperties(reply_to=reply_to, correlation_id="job:0")
            channel.basic_publish("", WORK_QUEUE, chunk, props)
    wait_until(lambda: server.count("rejected a malformed message") == 3, 15, "three rejections")
    assert server.count("reply_to") == 3
    wait_until(lambda: queue_depth(vhost, DEAD_LETTER_QUEUE) == 3, 15, "three dead letters")
    assert queue_depth(vhost, "victim") == 0


# --- The client survives what it receives, and stays usable ----------------------------------------


def reply_queue_of(vhost: str) -> str:
    queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name")
    (name,) = [q for q in queues.split() if q.startswith("amq.gen-")]
    return name


def test_hostile_replies_are_dropped_and_nothing_is_published_again(
    spawn: Spawn, amqp_url: str, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="distop")
    with ListOp([1, 2, 3, 4], group_size=2, rabbit_host=amqp_url) as op:
        job = op.call()  # no server yet: its 2 chunks wait in the queue
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 2, 10, "the chunks in the queue")
        good = json.dumps({"result": [1, 2]}).encode()
        hostile = [
            ({"correlation_id": "x:²"}, good),
            ({"correlation_id": f"{job}:²"}, good),
            ({"correlation_id": f"{job}:٣"}, good),
            ({"correlation_id": f"{job}:-1"}, good),
            ({"correlation_id": f"{job}:{'9' * 40}"}, good),
            ({"correlation_id": f"{job}:0 "}, good),
            ({"correlation_id": f"{job}:02"}, good),  # not as a client writes 2: a forgery
            ({"correlation_id": f"{job}:00"}, good),
            ({"correlation_id": ""}, good),
            ({}, good),
            (
                {"correlation_id": f"{job}:0", "headers": {"x-death": "forged", "x-first-death-reason": 5}},
                b"{",
            ),
            ({"correlation_id": f"{job}:0", "headers": {"x-death": [{"count": "many"}]}}, b"[]"),
            (
                {"correlation_id": f"{job}:2", "reply_to": "amq.gen-x", "headers": {"a": [1, {"b": None}]}},
                b"5",
            ),
            ({"correlation_id": f"{job}:2", "content_type": "text/plain"}, b"\xff\xfe"),
            ({"correlation_id": f"{job}:2"}, json.dumps({"error": {"type": ["x"], "message": 1}}).encode()),
            ({"correlation_id": f"{job}:2"}, b"[" * 100_000),
        ]
        with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for props, body in hostile:
                channel.basic_publish("", reply_queue_of(vhost), body, pika.BasicProperties(**props))
        wait_until(
            lambda: queue_depth(vhost, reply_queue_of(vhost)) == 0, 15, "the client to read every reply"
        )
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(dropped) == len(hostile), dropped
        assert not any("lost the broker" in r.getMessage() for r in caplog.records)
        assert queue_depth(vhost, WORK_QUEUE) == 2  # nothing published again
        start_server(spawn)
        assert op.get_result(job, timeout=15) == [1, 2, 3, 4]


def test_close_from_a_progress_callback_ends_the_wait_at_once(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    with ListOp(list(range(8)), group_size=4, rabbit_host=amqp_url) as op:
        job = op.call()
        started = time.monotonic()
        with pytest.raises(DistOpError, match="closed"):
            op.get_result(job, timeout=30, progress=lambda done, total: op.close() if done else None)
        assert time.monotonic() - started < 5  # close() from the waiting thread: nothing to wait for


def test_a_job_whose_reply_was_malformed_times_out_saying_so(amqp_url: str, vhost: str) -> None:
    with ListOp([1, 2], rabbit_host=amqp_url) as op:
        job = op.call()
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 1, 10, "the chunk in the queue")
        with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
            channel = connection.channel()
            # A server of another version, say: it takes the chunk and answers in a shape we cannot read.
            _method, props, _body = channel.basic_get(WORK_QUEUE, auto_ack=True)
            reply = pika.BasicProperties(correlation_id=props.correlation_id)
            channel.basic_publish("", props.reply_to, b'{"partial": [1, 2]}', reply)
        wait_until(lambda: queue_depth(vhost, reply_queue_of(vhost)) == 0, 10, "the client to read it")
        with pytest.raises(TimeoutError) as caught:
            op.get_result(job, timeout=0.5)
    message = str(caught.value)
    assert f"job {job}: 0 of 1 partial results within 0.5 s" in message
    assert f"the reply for chunk {job}:0 was malformed and dropped" in message, message
    assert "is a server serving" not in message


@pytest.fixture
def user_on(vhost: str) -> Iterator[Callable[[str, str, str], str]]:
    """``user_on(configure, write, read)``: the URL of a new user with those permissions on our vhost."""
    made: list[str] = []

    def make(configure: str, write: str, read: str) -> str:
        name = f"distop-test-{uuid.uuid4().hex[:8]}"
        rabbitmqctl("add_user", name, "s3cret")
        made.append(name)
        rabbitmqctl("set_permissions", "-p", vhost, name, configure, write, read)
        return f"amqp://{name}:s3cret@127.0.0.1:5672/{vhost}"

    yield make
    for name in made:
        rabbitmqctl("delete_user", name)


@pytest.mark.parametrize(
    "write",
    [
        "^$",  # not even to its own reply queue: queue_bind is refused
        r"^amq\.gen-.*$",  # to its reply queue, not to the default exchange: each basic_publish is refused
    ],
)
def test_a_client_the_broker_refuses_says_why_at_once(
    spawn: Spawn, user_on: Callable[[str, str, str], str], write: str
) -> None:
    start_server(spawn)  # the queues exist, declared by another user (else declaring them is refused)
    url = user_on(".*", write, ".*")
    started = time.monotonic()
    client = run_to_end(spawn, "distop/client.py", "--op", "plusone", "--timeout", "20", "-q", url=url)
    assert client.popen.returncode == 1, client.output
    assert time.monotonic() - started < 10, client.output  # refused: retrying cannot help
    assert len(client.stderr_lines) == 1, client.stderr
    assert "403" in client.stderr_lines[0] and "ACCESS_REFUSED" in client.stderr_lines[0], client.stderr
    assert "s3cret" not in client.output


def test_a_job_the_broker_keeps_refusing_times_out_saying_so(amqp_url: str, vhost: str) -> None:
    # A queue at its length limit refuses what it cannot take (a nack); the client publishes it again.
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
        channel.queue_declare(WORK_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
    policy = '{"max-length": 1, "overflow": "reject-publish"}'
    rabbitmqctl("set_policy", "-p", vhost, "full", f"^{WORK_QUEUE}$", policy, "--apply-to", "queues")
    queues = ("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "policy")
    wait_until(lambda: "full" in rabbitmqctl(*queues), 10, "the policy on the work queue")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        for _ in range(2):  # fill it (a quorum queue enforces its length limit a little late)
            connection.channel().basic_publish("", WORK_QUEUE, b"{}")
    wait_until(lambda: queue_depth(vhost, WORK_QUEUE) >= 1, 10, "the work queue full")
    with ListOp([1, 2, 3], group_size=3, rabbit_host=amqp_url) as op:
        job = op.call()
        with pytest.raises(TimeoutError) as caught:
            op.get_result(job, timeout=3)
    message = str(caught.value)
    assert "the broker refuses the chunks (a nack: a queue at its length limit?)" in message, message
    assert "is a server serving" not in message


# Text a hostile peer may put in a reply, to forge a second line where the client shows the error.
FORGED = "\x1b[31mRED\n05:00:00 INFO forged log line"


@pytest.mark.parametrize("forged", ["error reply", "dead letter"])
def test_the_client_shows_a_forged_error_escaped_in_one_line(
    spawn: Spawn, amqp_url: str, forged: str
) -> None:
    client = spawn("distop/client.py", "--size", "1", "--chunks", "1", "--timeout", "15", "-q")
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE) == 1, 15, "the chunk in the queue")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        _method, props, body = channel.basic_get(WORK_QUEUE, auto_ack=True)
        if forged == "error reply":
            reply = json.dumps({"error": {"type": "Error", "message": FORGED, "host": "h"}}).encode()
            channel.basic_publish(
                "", props.reply_to, reply, pika.BasicProperties(correlation_id=props.correlation_id)
            )
        else:  # the chunk, as if the broker had dead-lettered it: the client's binding brings it back
            headers = {**props.headers, "x-death": [{}], "x-first-death-reason": FORGED}
            forged_props = pika.BasicProperties(correlation_id=props.correlation_id, headers=headers)
            channel.basic_publish(DEAD_LETTER_EXCHANGE, "", body, forged_props)
    assert client.wait() == 1, client.output
    assert len(client.stderr_lines) == 1, client.stderr
    assert r"\x1b[31mRED\n05:00:00 INFO forged log line" in client.stderr_lines[0]
    assert "\x1b" not in client.output


def test_an_unexpected_error_in_the_client_fails_its_jobs(
    spawn: Spawn, amqp_url: str, vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the client")

    monkeypatch.setattr("distop.dist_op.dead_letter_error", broken)
    with ListOp([1, 2], rabbit_host=amqp_url) as op:
        job = op.call()
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 1, 10, "the chunk in the queue")
        with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
            channel = connection.channel()
            method, props, _body = channel.basic_get(WORK_QUEUE)
            assert method is not None
            channel.basic_reject(method.delivery_tag, requeue=True)
            # A dead letter for the job: handling it raises, as a bug would.
            headers = {**props.headers, "x-death": [], "x-first-death-reason": "rejected"}
            dead = pika.BasicProperties(correlation_id=props.correlation_id, headers=headers)
            channel.basic_publish(DEAD_LETTER_EXCHANGE, "", b"{}", dead)
        with pytest.raises(DistOpError, match="a bug in the client"):
            op.get_result(job, timeout=10)
        # The object stays usable: the next call connects again.
        monkeypatch.undo()
        start_server(spawn)
        op.call()
        assert op.get_result(timeout=15) == [1, 2]


class Gate:
    """A local port that holds every connection silently until opened, then forwards to the broker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = False
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                self.held.append(conn)
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


def test_a_connect_that_timed_out_is_tried_again(
    spawn: Spawn, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("distop.dist_op.CONNECT_TIMEOUT", 1.0)
    parts = urllib.parse.urlsplit(amqp_url)
    gate = Gate((parts.hostname or "", parts.port or 5672))
    try:
        url = parts._replace(netloc=f"guest:guest@127.0.0.1:{gate.port}").geturl()
        with ListOp([1, 2], rabbit_host=url) as op:
            with pytest.raises(BrokerError, match="timed out"):
                op.call()
            gate.open = True
            start_server(spawn)
            op.call()
            assert op.get_result(timeout=15) == [1, 2]
    finally:
        gate.close()


def test_close_wakes_a_thread_waiting_for_a_result(amqp_url: str) -> None:
    outcome: list[BaseException] = []
    op = ListOp([1, 2], rabbit_host=amqp_url)
    job = op.call()  # no server: it never completes

    def wait() -> None:
        try:
            op.get_result(job, timeout=30)
        except BaseException as exc:  # the test looks at it
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    op.close()
    waiter.join(5)
    assert not waiter.is_alive(), "get_result() still waits after close()"
    assert len(outcome) == 1 and isinstance(outcome[0], DistOpError)
    assert "closed" in str(outcome[0])


def test_a_cancelled_job_is_forgotten_and_not_published_again(
    amqp_url: str, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="distop")
    with ListOp([1, 2], group_size=2, rabbit_host=amqp_url) as op:
        dropped, kept = op.call(), op.call()  # no server: 4 chunks wait
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 4, 10, "4 chunks in the queue")
        op.cancel(dropped)
        assert op.pending() == [kept]
        with pytest.raises(ValueError, match="no pending job"):
            op.get_result(dropped)
        # Lose the connection: the client publishes again what it still waits for.
        rabbitmqctl("close_all_connections", "-p", vhost, "test")
        wait_until(lambda: any("lost the broker" in r.getMessage() for r in caplog.records), 10, "the loss")
        wait_until(lambda: (queue_depth(vhost, WORK_QUEUE) or 0) >= 6, 15, "the kept job published again")
        # A job called now is published after whatever the reconnection published.
        late = op.call()
        wait_until(lambda: (queue_depth(vhost, WORK_QUEUE) or 0) >= 8, 15, "the late job")
        queued = queued_jobs(amqp_url)
        if queued[late] < 2:  # the reconnection published more than it should have
            wait_until(lambda: (queue_depth(vhost, WORK_QUEUE) or 0) >= 10, 15, "the late job")
            queued = queued_jobs(amqp_url)
        assert queued == {dropped: 2, kept: 4, late: 2}


def queued_jobs(amqp_url: str) -> Counter[str]:
    """How many chunks of each job wait in the work queue (all are put back)."""
    jobs: Counter[str] = Counter()
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        while True:
            method, props, _body = channel.basic_get(WORK_QUEUE)
            if method is None:
                return jobs  # closing the connection puts them all back
            jobs[props.correlation_id.partition(":")[0]] += 1


def test_nacked_chunks_are_published_again_on_a_new_connection(
    spawn: Spawn, amqp_url: str, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="distop")
    # A full queue that refuses publishes: the broker nacks them, as a channel
    # stuck on a dead cluster leader does.
    policy = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "full", f"^{WORK_QUEUE}$", policy)

    def refusals() -> int:
        return sum(1 for r in caplog.records if "refused" in r.getMessage())

    with ListOp(list(range(4)), group_size=4, rabbit_host=amqp_url) as op:
        # A quorum queue enforces its length between publishes: the first
        # job's chunks overfill it, the second job's are refused.
        first = op.call()
        wait_until(lambda: (queue_depth(vhost, WORK_QUEUE) or 0) >= 2, 10, "a full queue")
        second = op.call()
        wait_until(lambda: refusals() >= 3, 10, "three refusals")
        rabbitmqctl("clear_policy", "-p", vhost, "full")
        start_server(spawn)
        assert op.get_result(first, timeout=15) == [0, 1, 2, 3]
        assert op.get_result(second, timeout=15) == [0, 1, 2, 3]
    # Published again after a growing pause, not in a tight loop on the refusing channel.
    assert refusals() <= 10, refusals()
    assert all("on a new connection" in r.getMessage() for r in caplog.records if "refused" in r.getMessage())


def test_chunks_published_to_a_deleted_queue_are_published_again(
    spawn: Spawn, amqp_url: str, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="distop")
    with op_class("pow")([1, 2, 3], group_size=3, rabbit_host=amqp_url) as op:
        waited = op.call(esp=2)  # connects (declaring the work queue); no server yet
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 3, 10, "the chunks in the queue")
        rabbitmqctl("delete_queue", "-p", vhost, WORK_QUEUE)  # its chunks are lost with it
        returned = op.call(esp=3)  # no queue takes its chunks: the broker returns them
        # Still no server: only the client can have declared the queue again, and published both jobs.
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 6, 15, "every unanswered chunk published again")
        assert sum("took a chunk" in r.getMessage() for r in caplog.records) == 1  # once for the batch
        start_server(spawn)
        assert op.get_result(waited, timeout=15) == [1, 4, 9]
        assert op.get_result(returned, timeout=15) == [1, 8, 27]


def test_a_client_whose_reply_queue_is_deleted_starts_over(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    client = spawn("distop/client.py", "--size", "12", "--chunks", "3", "--timeout", "20")
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE) == 3, 15, "the chunks in the queue")
    # The broker cancels the client's consumer; replies to the chunks already queued have nowhere to go.
    rabbitmqctl("delete_queue", "-p", vhost, reply_queue_of(vhost))
    start_server(spawn)
    assert client.wait(30) == 0, client.output
    assert client.stdout_lines == [json.dumps(list(range(1, 13)))]  # plusone, client.py's default op
    assert len(client.stderr_lines) == 1 and "cancelled our consumer" in client.stderr, client.stderr


def test_a_client_whose_queue_is_declared_otherwise_raises_one_error(amqp_url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare(WORK_QUEUE, durable=True)  # a classic queue, no delivery limit
    with ListOp([1], rabbit_host=amqp_url) as op:
        with pytest.raises(BrokerError, match=f"delete it with 'rabbitmqctl delete_queue {WORK_QUEUE}'"):
            op.call()
        assert op.pending() == []


def test_cancelling_a_job_just_called_leaves_the_others_alone(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    with op_class("pow")(list(range(10)), group_size=2, rabbit_host=amqp_url) as op:
        squares = op.call(esp=2)
        cubes = op.call(esp=3)
        op.cancel(cubes)  # before the I/O thread has taken its chunks, most likely
        assert op.get_result(squares, timeout=30) == [x**2 for x in range(10)]
        assert op.pending() == []


def test_threads_that_call_at_once_share_one_connection(spawn: Spawn, amqp_url: str) -> None:
    start_server(spawn)
    before = set(threading.enumerate())  # an earlier test's client in this process is not ours
    op = op_class("pow")(list(range(10)), group_size=2, rabbit_host=amqp_url)
    with op, ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda esp: op.call(esp=esp), range(8)))
        links = [t for t in set(threading.enumerate()) - before if t.name == "distop-client"]
        assert len(links) == 1, links
        assert [op.get_result(job, timeout=30) for job in jobs] == [
            [x**e for x in range(10)] for e in range(8)
        ]
    wait_until(lambda: not links[0].is_alive(), 10, "the client's I/O thread to end with close()")


def test_a_result_over_the_brokers_max_message_size_is_an_error_not_a_poison_chunk(
    spawn: Spawn, short_timeout_node: BrokerNode, tmp_path: Path
) -> None:
    url = short_timeout_node.url(make_vhost(short_timeout_node))
    server = start_server(spawn, url=url)
    with op_class("big")([1], rabbit_host=url) as op:
        op.call(size=2 * MAX_MESSAGE_SIZE)
        with pytest.raises(RemoteError, match="more than the broker takes") as caught:
            op.get_result(timeout=30)
    assert caught.value.exc_type == "ResultTooLargeError"
    assert server.count("larger than its max_message_size") == 1, server.output
    # It keeps serving.
    with ListOp([1, 2], rabbit_host=url) as op:
        op.call()
        assert op.get_result(timeout=30) == [1, 2]
