"""distop's simplest pair, call_one.py and serve_one.py: as docs/distop.md shows them, and with the real ones.

Each talks to the other and to its full sibling: call_one.py to callee.py (OpExecutor), serve_one.py to
client.py and DistOp; errors are one line, exit status 1.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any

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


def send_chunks(amqp_url: str, chunks: list[tuple[dict[str, Any], bytes]], replies: int) -> list[Any]:
    """Publish chunks (properties, body), reply_to our own reply queue unless they say; return the replies.

    Returns the properties and body of each reply, in order, once ``replies`` are in or none came for 15 s.
    """
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        channel.confirm_delivery()
        for props, body in chunks:
            channel.basic_publish(
                "", WORK_QUEUE, body, pika.BasicProperties(**{"reply_to": reply_queue, **props})
            )
        received: list[Any] = []
        for _method, props, body in channel.consume(reply_queue, auto_ack=True, inactivity_timeout=15):
            if props is not None:
                received.append((props, body))
            if props is None or len(received) == replies:
                return received
    return received


# A JSON escape for half a UTF-16 pair, text that UTF-8 cannot hold. orjson refuses it, but a number of 19
# digits or more sends the body to the json module (distop/codec.py), which accepts it.
LONE_SURROGATE_OP = b'{"op": "\\ud800", "chunk": [10000000000000000000], "params": {}}'


@pytest.mark.parametrize("script", ["distop/serve_one.py", "distop/callee.py"])
def test_servers_answer_hostile_chunks_and_keep_serving(spawn: Spawn, amqp_url: str, script: str) -> None:
    server = start(spawn, script)
    chunks = [
        ({"correlation_id": "x:0"}, LONE_SURROGATE_OP),
        # A reply_to that is not UTF-8: pika hands it to the server as bytes, not str.
        ({"correlation_id": "x:1", "reply_to": b"amq.gen-\xff"}, b'{"op": "plusone", "chunk": [1]}'),
    ]
    [(props, body)] = send_chunks(amqp_url, chunks, replies=1)
    error = json.loads(body)["error"]
    assert (props.correlation_id, error["type"]) == ("x:0", "UnknownOpError")
    assert error["message"].startswith("no op '\\ud800' here")
    server.wait_for(r"rejected a malformed message .*reply_to b'amq\.gen-\\xff'")
    assert call_one(spawn, "plusone", "1").stdout_lines == ["[2]"]
    assert server.popen.poll() is None and "Traceback" not in server.output


# Text a hostile peer may put in a chunk or a reply, to forge a second line where it is shown.
FORGED = "\x1b[31mRED\n05:00:00 INFO forged log line"


@pytest.mark.parametrize(("script", "op"), [("distop/serve_one.py", "plusone"), ("distop/callee.py", "pow")])
def test_servers_log_what_a_chunk_says_escaped(spawn: Spawn, amqp_url: str, script: str, op: str) -> None:
    server = start(spawn, script)
    chunks = [  # a forged id, a forged op name, a forged param name
        ({"correlation_id": FORGED}, json.dumps({"op": op, "chunk": [1]}).encode()),
        ({"correlation_id": "x:1"}, json.dumps({"op": FORGED, "chunk": [1]}).encode()),
        ({"correlation_id": "x:2"}, json.dumps({"op": op, "chunk": [1], "params": {FORGED: 1}}).encode()),
    ]
    replies = send_chunks(amqp_url, chunks, replies=3)
    assert [props.correlation_id for props, _body in replies] == [FORGED, "x:1", "x:2"], server.output
    escaped = r"\\x1b\[31mRED\\n05:00:00 INFO forged log line"
    wait_until(lambda: server.count(escaped) >= 2, 10, "the forged id and op name in the log, escaped")
    assert not any(line.startswith("05:00:00") for line in server.stdout_lines + server.stderr_lines)
    assert "\x1b" not in server.output


def test_call_one_prints_a_hostile_result_escaped(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    client = spawn("distop/call_one.py", "--timeout", "15", "plusone", "1")  # no server: the test answers
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE) == 1, 15, "the chunk in the queue")
    queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name")
    (reply_queue,) = [name for name in queues.split() if name.startswith("amq.gen-")]
    result = "\ud800" + FORGED  # with the 19 digits of n, the json module reads it (and orjson would not)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        _method, props, _body = channel.basic_get(WORK_QUEUE, auto_ack=True)
        body = json.dumps({"result": result, "n": 10**19}).encode()
        channel.basic_publish(
            "", reply_queue, body, pika.BasicProperties(correlation_id=props.correlation_id)
        )
    assert client.wait() == 0, client.output
    assert client.stdout_lines == [json.dumps(result)], client.output


def test_call_one_without_a_server_gives_up_in_one_line(spawn: Spawn, amqp_url: str) -> None:
    started = time.monotonic()
    assert_fails_in_one_line(call_one(spawn, "--timeout", "1", "plusone", "1"), NO_SERVER)
    assert time.monotonic() - started < 15
    assert messages_ready(amqp_url, WORK_QUEUE) == 1  # the chunk waits for a server, persistent


def test_call_one_keeps_its_timeout_while_other_messages_arrive(
    spawn: Spawn, amqp_url: str, vhost: str
) -> None:
    started = time.monotonic()
    client = spawn("distop/call_one.py", "--timeout", "3", "plusone", "1")  # no server
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE) == 1, 15, "the chunk in the queue")
    queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name")
    (reply_queue,) = [name for name in queues.split() if name.startswith("amq.gen-")]
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        while client.popen.poll() is None and time.monotonic() - started < 20:
            # A reply to some other chunk, twice a second: not ours, so it must not keep us waiting.
            other = pika.BasicProperties(correlation_id="x:0")
            channel.basic_publish("", reply_queue, b'{"result": 1}', other)
            connection.sleep(0.5)
    client.wait(15)
    assert_fails_in_one_line(client, NO_SERVER.replace("1 s", "3 s"))
    assert time.monotonic() - started < 10, client.output


def test_serve_one_says_in_one_line_that_the_broker_closed_its_connection(spawn: Spawn, vhost: str) -> None:
    server = start(spawn, "distop/serve_one.py")
    rabbitmqctl("close_all_connections", "-p", vhost, "test: going away")
    assert server.wait() == 1, server.output
    assert len(server.stderr_lines) == 1, server.stderr
    assert server.stderr_lines[0].startswith("serve_one: ") and "going away" in server.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("plusone",),
        ("plusone", "x"),
        ("--timeout", "soon", "plusone", "1"),
        ("plusone", "1", "--timeout", "-1"),
        ("plusone", "1", "--timeout", "0"),
        ("plusone", "1", "--timeout", "inf"),
        ("plusone", "1", "--timeout", "nan"),
        ("plusone", "nan"),  # JSON has no NaN or infinity
        ("plusone", "inf"),
        ("plusone", "1e999"),
    ],
)
def test_call_one_refuses_bad_arguments(spawn: Spawn, amqp_url: str, args: tuple[str, ...]) -> None:
    proc = call_one(spawn, *args)
    assert proc.popen.returncode == 2, proc.output
    assert proc.stderr_lines[0].startswith("usage: ") and "error: " in proc.stderr_lines[-1]
    assert "Traceback" not in proc.output
    assert messages_ready(amqp_url, WORK_QUEUE) is None  # refused before it connected: nothing was sent


# The op names distop/client.py's --op refuses (distop/cli.py's op_name): "\udcff" is how Python holds the
# byte 0xff from the shell, which is not UTF-8.
@pytest.mark.parametrize(
    ("op", "error"), [("", "must not be empty"), ("caf\udcff", "not UTF-8: 'caf\\udcff'")]
)
def test_call_one_refuses_an_op_name_client_py_refuses(
    spawn: Spawn, amqp_url: str, op: str, error: str
) -> None:
    proc = call_one(spawn, "--timeout", "1", op, "1")
    assert proc.popen.returncode == 2, proc.output
    assert proc.stderr_lines[0].startswith("usage: ")
    assert proc.stderr_lines[-1] == f"call_one.py: error: argument op: {error}"
    assert messages_ready(amqp_url, WORK_QUEUE) is None  # refused before it connected: nothing was sent


# --- call_many.py: many chunks in flight, gathered by correlation id ---------------------------------


def test_call_many_runs_as_the_page_shows_against_both_servers(spawn: Spawn) -> None:
    start(spawn, "distop/serve_one.py")
    start(spawn, "distop/callee.py")
    caller = run_doc(spawn, doc_command("python distop/call_many.py plusone 1 2 3 4 5 6 --chunks 3"))
    assert caller.wait() == 0, caller.output
    assert caller.stdout_lines == ["[2, 3, 4, 5, 6, 7]"]
    assert_shows("distop/call_many.py", caller.stdout_lines)


def test_call_many_without_a_server_gives_up_in_one_line(spawn: Spawn, amqp_url: str) -> None:
    started = time.monotonic()
    caller = run_to_end(spawn, "distop/call_many.py", "plusone", "1", "2", "3", "--timeout", "1")
    assert_fails_in_one_line(caller, "call_many: not every reply within 1 s (0 of 3 chunks answered)")
    assert time.monotonic() - started < 15
    assert messages_ready(amqp_url, WORK_QUEUE) == 3  # the chunks wait for a server, persistent


def test_call_many_says_which_op_raised(spawn: Spawn) -> None:
    start(spawn, "distop/callee.py")
    caller = run_to_end(spawn, "distop/call_many.py", "boom", "1", "2", "--chunks", "2")
    assert caller.popen.returncode == 1, caller.output
    assert len(caller.stderr_lines) == 1, caller.stderr
    line = caller.stderr_lines[0]
    assert line.startswith("call_many: UnknownOpError on "), line
    assert line.endswith("no op 'boom' here; this server offers: nop, plusone, pow (0 of 2 chunks answered)")


def test_call_many_gets_its_dead_chunk_back_through_its_binding(spawn: Spawn, amqp_url: str) -> None:
    caller = spawn("distop/call_many.py", "plusone", "1", "2", "--chunks", "1", "--timeout", "15")
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE) == 1, 15, "the chunk in the queue")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        method, _props, _body = channel.basic_get(WORK_QUEUE)
        assert method is not None
        # A server rejects it (as malformed, say): the work queue dead-letters it to the headers exchange
        # distop.dead, whose binding on the caller's client id brings it to the caller's reply queue.
        channel.basic_reject(method.delivery_tag, requeue=False)
    assert caller.wait() == 1, caller.output
    assert len(caller.stderr_lines) == 1, caller.stderr
    assert "the chunk at index 0" in caller.stderr_lines[0] and "rejected" in caller.stderr_lines[0]
    assert caller.stderr_lines[0].endswith("(0 of 1 chunks answered)")


def test_call_many_ignores_what_does_not_answer_its_chunks(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    caller = spawn("distop/call_many.py", "plusone", "1", "--chunks", "1", "--timeout", "15")
    wait_until(lambda: messages_ready(amqp_url, WORK_QUEUE) == 1, 15, "the chunk in the queue")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        _method, props, _body = channel.basic_get(WORK_QUEUE, auto_ack=True)
        job = props.correlation_id.partition(":")[0]
        good = b'{"result": [2]}'
        for correlation_id in [b"\xff:0", f"{job}:\u00b2", f"{job}:7", "other:0", "", None]:
            forged = pika.BasicProperties(correlation_id=correlation_id)
            channel.basic_publish("", props.reply_to, good, forged)
        channel.basic_publish(
            "", props.reply_to, good, pika.BasicProperties(correlation_id=props.correlation_id)
        )
    assert caller.wait() == 0, caller.output
    assert caller.stdout_lines == ["[2]"]
    assert "Traceback" not in caller.output
