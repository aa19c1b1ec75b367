"""distop's simplest pair, call_one.py and serve_one.py: as docs/distop.md shows them, and with the real ones.

Each talks to the other and to its full sibling: call_one.py to callee.py (OpExecutor), serve_one.py to
client.py and DistOp; errors are one line, exit status 1.
"""

from __future__ import annotations

import json
import signal
import socket
import time

import pika
import pytest

from distop.ops import WORK_QUEUE, WORK_QUEUE_ARGUMENTS, DistOp, RemoteError
from distop.protocol import DEAD_LETTER_QUEUE
from tests.conftest import Proc, Spawn, messages_ready, rabbitmqctl, run_to_end, wait_until
from tests.docs import doc_command
from tests.test_distop_lesson import assert_shows

NO_SERVER = "call_one: no reply within 1 s: is a server running (python distop/callee.py)?"


def run_doc(spawn: Spawn, command: str) -> Proc:
    """Start ``command``, a page's ``python SCRIPT ARGS...``, with the test's python."""
    _python, script, *args = command.split()
    return spawn(script, *args)


def start(spawn: Spawn, script: str) -> Proc:
    server = spawn(script)
    server.wait_for("serving")
    return server


def call_one(spawn: Spawn, *args: str) -> Proc:
    return run_to_end(spawn, "distop/call_one.py", *args)


def assert_fails_in_one_line(proc: Proc, line: str) -> None:
    assert proc.popen.returncode == 1, proc.output
    assert proc.stdout_lines == []
    assert proc.stderr_lines == [line]


def stop(server: Proc) -> None:
    server.signal(signal.SIGINT)  # Ctrl-C
    assert server.wait() == 0, server.output
    assert "Traceback" not in server.output


class PlusOneOp(DistOp):
    OP_NAME = "plusone"


def test_call_one_and_serve_one_run_as_the_page_shows(spawn: Spawn, amqp_url: str) -> None:
    server = run_doc(spawn, doc_command("python distop/serve_one.py"))
    server.wait_for("serving")
    client = run_doc(spawn, doc_command("python distop/call_one.py plusone 1 2 3"))
    assert client.wait(30) == 0, client.output
    assert client.stdout_lines == ["[2, 3, 4]"]
    assert client.stderr_lines == []
    assert_shows("distop/call_one.py", client.stdout_lines)
    server.wait_for("'plusone' on 3 items")
    stop(server)
    assert server.stderr_lines == []
    assert_shows("distop/serve_one.py", server.stdout_lines)
    assert messages_ready(amqp_url, WORK_QUEUE) == 0  # acked


def test_call_one_gets_its_reply_from_the_real_server(spawn: Spawn) -> None:
    start(spawn, "distop/callee.py")
    proc = call_one(spawn, "plusone", "1", "2.5", "-3")
    assert (proc.popen.returncode, proc.stdout_lines, proc.stderr_lines) == (0, ["[2, 3.5, -2]"], [])
    assert call_one(spawn, "pow", "4", "5").stdout_lines == ["[4, 5]"]  # pow's default exponent: 1
    host = socket.gethostname()
    offers = "nop, plusone, pow"
    assert_fails_in_one_line(
        call_one(spawn, "nope", "1"),
        f"call_one: UnknownOpError on {host}: no op 'nope' here; this server offers: {offers}",
    )


def test_serve_one_answers_call_one_and_distop_alike(spawn: Spawn, amqp_url: str) -> None:
    start(spawn, "distop/serve_one.py")
    host = socket.gethostname()
    unknown = f"UnknownOpError on {host}: no op 'pow' here; this server offers: plusone"
    assert_fails_in_one_line(call_one(spawn, "pow", "1"), f"call_one: {unknown}")

    client = run_to_end(spawn, "distop/client.py", "--op", "plusone", "--size", "12", "--chunks", "3")
    assert (client.popen.returncode, client.stdout_lines) == (0, [str(list(range(1, 13)))]), client.output
    with PlusOneOp(list(range(10)), group_size=4, rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=30) == [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10]]
    with PlusOneOp(["a"], group_size=1, rabbit_host=amqp_url) as op:  # the op raises: the same error shape
        op.call()
        with pytest.raises(RemoteError) as raised:
            op.get_result(timeout=30)
    assert (raised.value.exc_type, raised.value.host) == ("TypeError", host)
    with PlusOneOp([1], group_size=1, rabbit_host=amqp_url) as op:
        op.OP_NAME = "pow"
        op.call()
        with pytest.raises(RemoteError, match="^" + unknown):
            op.get_result(timeout=30)


def test_serve_one_rejects_a_chunk_whose_reply_to_is_not_a_reply_queue(spawn: Spawn, amqp_url: str) -> None:
    server = start(spawn, "distop/serve_one.py")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_declare(WORK_QUEUE, durable=True, arguments=WORK_QUEUE_ARGUMENTS)
        props = pika.BasicProperties(reply_to=WORK_QUEUE, correlation_id="x")
        channel.basic_publish("", WORK_QUEUE, b'{"op": "plusone", "chunk": [1]}', props)
    # Rejected without a reply (into the work queue, here) and without requeue; the next chunk is served.
    assert call_one(spawn, "plusone", "1").stdout_lines == ["[2]"]
    assert messages_ready(amqp_url, WORK_QUEUE) == 0
    assert server.count("chunk ") == 1
    # Not lost: logged in one line, and kept in distop.dead, which serve_one.py declares.
    assert server.count(r"^rejected a malformed message \(\d+ bytes\): ") == 1, server.output
    wait_until(lambda: messages_ready(amqp_url, DEAD_LETTER_QUEUE) == 1, 10, "the chunk in distop.dead")
    stop(server)


# A JSON escape for half a UTF-16 pair, text that UTF-8 cannot hold. orjson refuses it, but a number of 19
# digits or more sends the body to the json module (distop/codec.py), which accepts it.
LONE_SURROGATE_OP = b'{"op": "\\ud800", "chunk": [10000000000000000000], "params": {}}'


@pytest.mark.parametrize("script", ["distop/serve_one.py", "distop/callee.py"])
def test_servers_answer_hostile_chunks_and_keep_serving(spawn: Spawn, amqp_url: str, script: str) -> None:
    server = start(spawn, script)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        channel.confirm_delivery()
        props = pika.BasicProperties(reply_to=reply_queue, correlation_id="x:0")
        channel.basic_publish("", WORK_QUEUE, LONE_SURROGATE_OP, props)
        # A reply_to that is not UTF-8: pika hands it to the server as bytes, not str.
        props = pika.BasicProperties(reply_to=b"amq.gen-\xff", correlation_id="x:1")
        channel.basic_publish("", WORK_QUEUE, b'{"op": "plusone", "chunk": [1]}', props)
        _method, reply_props, body = next(channel.consume(reply_queue, auto_ack=True, inactivity_timeout=15))
    assert body is not None, f"no reply:\n{server.output}"
    error = json.loads(body)["error"]
    assert (reply_props.correlation_id, error["type"]) == ("x:0", "UnknownOpError")
    assert error["message"].startswith("no op '\\ud800' here")
    server.wait_for(r"rejected a malformed message .*reply_to b'amq\.gen-\\xff'")
    assert call_one(spawn, "plusone", "1").stdout_lines == ["[2]"]
    assert server.popen.poll() is None and "Traceback" not in server.output


def test_call_one_without_a_server_gives_up_in_one_line(spawn: Spawn, amqp_url: str) -> None:
    started = time.monotonic()
    assert_fails_in_one_line(call_one(spawn, "--timeout", "1", "plusone", "1"), NO_SERVER)
    assert time.monotonic() - started < 15
    assert messages_ready(amqp_url, WORK_QUEUE) == 1  # the chunk waits for a server, persistent


def test_serve_one_says_in_one_line_that_the_broker_closed_its_connection(spawn: Spawn, vhost: str) -> None:
    server = start(spawn, "distop/serve_one.py")
    rabbitmqctl("close_all_connections", "-p", vhost, "test: going away")
    assert server.wait() == 1, server.output
    assert len(server.stderr_lines) == 1, server.stderr
    assert server.stderr_lines[0].startswith("serve_one: ") and "going away" in server.stderr


@pytest.mark.parametrize("args", [("plusone",), ("plusone", "x"), ("--timeout", "soon", "plusone", "1")])
def test_call_one_refuses_bad_arguments(spawn: Spawn, args: tuple[str, ...]) -> None:
    proc = call_one(spawn, *args)
    assert proc.popen.returncode == 2, proc.output
    assert proc.stderr_lines[0].startswith("usage: ") and "error: " in proc.stderr_lines[-1]
