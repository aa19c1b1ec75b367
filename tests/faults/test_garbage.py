"""Garbage: 200 malformed deliveries to each consumer, which must survive them and keep serving."""

from __future__ import annotations

import json
import logging
import re
import signal
import time

import pika
import pytest

from distop.ops import DEAD_LETTER_QUEUE, WORK_QUEUE, DistOp
from tests.conftest import Spawn, queue_depth, queue_is_empty, rabbitmqctl, run_to_end, wait_until
from tests.faults.conftest import Report
from tests.faults.garbage import NOT_AN_OBJECT, malformed, with_odd_properties

COUNT = 200


def publish(amqp_url: str, exchange: str, routing_key: str, deliveries: list) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        # Confirms: every delivery is in the broker before the connection closes.
        channel.confirm_delivery()
        for _label, body, props in deliveries:
            channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(**props))


@pytest.mark.timeout(180)
def test_pc_consumer_shows_and_acks_200_malformed_messages_and_keeps_serving(
    spawn: Spawn, amqp_url: str, report: Report
) -> None:
    garbage = with_odd_properties(
        malformed(
            COUNT,
            valid=b"good",
            wrong_types=[*NOT_AN_OBJECT, {}, {"text": 5}, {"text": None}, {"text": ["x"]}, {"txt": "x"}],
        )
    )
    started = time.monotonic()
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    publish(amqp_url, "", "pc", garbage)
    producer = run_to_end(spawn, "pc/producer.py", "still", "here")
    assert producer.popen.returncode == 0, producer.output

    consumer.wait_for("received 'still here'", timeout=60)
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0, consumer.output
    tags = re.findall(r"#(\d+) received ", consumer.stderr)
    escaped = consumer.count(r"#\d+ received b'.*' \([\d,]+ bytes, not UTF-8\)")
    line = report(
        "garbage pc",
        sent=COUNT + 1,
        delivered=len(set(tags)),
        duplicates=len(tags) - len(set(tags)),
        lost=COUNT + 1 - len(set(tags)),
        seconds=time.monotonic() - started,
        note=f"{escaped} shown as escaped bytes, the rest as text; all acked, queue empty",
    )
    print(line)
    assert len(tags) == len(set(tags)) == COUNT + 1
    assert queue_is_empty(amqp_url, "pc"), "every message should have been acked"
    assert "rejected" not in consumer.stderr and "Traceback" not in consumer.output
    assert not any(c in consumer.stderr for c in "\x1b\x07\r")


@pytest.mark.timeout(180)
def test_distop_server_dead_letters_200_malformed_chunks_and_keeps_serving(
    spawn: Spawn, amqp_url: str, vhost: str, report: Report
) -> None:
    routing = {"reply_to": "nowhere", "correlation_id": "job:0"}
    good = json.dumps({"op": "nop", "chunk": [1], "params": {}}).encode()
    garbage = malformed(
        COUNT - 5,
        valid=good,
        wrong_types=[
            *NOT_AN_OBJECT,
            {},
            {"op": 5, "chunk": [1]},
            {"op": "nop", "chunk": "1"},
            {"op": "nop", "chunk": None},
            {"op": "nop", "chunk": [1], "params": []},
            {"op": ["nop"], "chunk": [1]},
        ],
        props=routing,
    )
    garbage = with_odd_properties(garbage)
    garbage += [
        ("reply_to not a reply queue", good, {"reply_to": "victim", "correlation_id": "job:0"}),
        ("reply_to amq.gen-", good, {"reply_to": "amq.gen-", "correlation_id": "job:0"}),
        ("no reply_to", good, {"correlation_id": "job:0", "content_type": "application/json"}),
        ("no correlation_id", good, {"reply_to": "nowhere", "content_type": "application/json"}),
        ("no properties", good, {}),
    ]
    started = time.monotonic()
    server = spawn("tests/distop_server.py")
    server.wait_for("serving")
    publish(amqp_url, "", WORK_QUEUE, garbage)

    wait_until(
        lambda: server.count("rejected a malformed message") >= COUNT or server.popen.poll() is not None,
        90,
        "every rejection",
    )
    with NopOp([1, 2, 3], group_size=2, rabbit_host=amqp_url) as op:
        op.call()
        assert op.get_result(timeout=30) == [1, 2, 3]
    wait_until(lambda: queue_depth(vhost, DEAD_LETTER_QUEUE) == COUNT, 30, "every reject dead-lettered")
    dead = queue_depth(vhost, DEAD_LETTER_QUEUE)
    line = report(
        "garbage distop server",
        sent=COUNT + 2,
        delivered=server.count("rejected a malformed message") + server.count(r"chunk \S+: nop"),
        duplicates=0,
        lost=0,
        seconds=time.monotonic() - started,
        note=f"{dead} in {DEAD_LETTER_QUEUE}, work queue empty",
    )
    print(line)
    assert server.count("rejected a malformed message") == COUNT
    assert queue_depth(vhost, WORK_QUEUE) == 0
    assert server.popen.poll() is None and "Traceback" not in server.output


class NopOp(DistOp):
    OP_NAME = "nop"

    def gather(self, partials: dict) -> list:
        return [x for part in partials.values() for x in part]


@pytest.mark.timeout(120)
def test_distop_client_ignores_200_malformed_replies(
    spawn: Spawn, amqp_url: str, vhost: str, report: Report, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="distop")
    started = time.monotonic()
    with NopOp([1, 2, 3, 4], group_size=2, rabbit_host=amqp_url) as op:
        job = op.call()  # no server yet: the job waits
        queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name")
        (reply_queue,) = [name for name in queues.split() if name.startswith("amq.gen-")]
        # Replies that name the job's own chunks, and strangers.
        ids = [f"{job}:0", f"{job}:2", f"{job}:1", f"{job}:x", "nope", f"{job}"]
        # Odd properties too, except the correlation id, chosen here.
        garbage = [
            (label, body, {**props, "correlation_id": ids[i % len(ids)]})
            for i, (label, body, props) in enumerate(
                with_odd_properties(
                    malformed(
                        COUNT,
                        valid=json.dumps({"result": [1, 2]}).encode(),
                        wrong_types=[
                            *NOT_AN_OBJECT,
                            {},
                            {"error": "x"},
                            {"error": None},
                            {"error": {"type": 1}},
                        ],
                    ),
                    keep=("correlation_id",),
                )
            )
        ]
        publish(amqp_url, "", reply_queue, garbage)
        wait_until(lambda: queue_depth(vhost, reply_queue) == 0, 30, "the client to read every reply")
        spawn("tests/distop_server.py").wait_for("serving")
        assert op.get_result(job, timeout=30) == [1, 2, 3, 4]
        result_replies = 2  # the job's result is exact: both partials arrived
    ignored = sum(1 for r in caplog.records if "malformed reply" in r.getMessage())
    # Every reply the client read and dropped is logged (unknown ids at debug level).
    dropped = sum(1 for r in caplog.records if r.getMessage().startswith("dropped"))
    line = report(
        "garbage distop client",
        sent=COUNT + 2,
        delivered=dropped + result_replies,
        duplicates=0,
        lost=COUNT + 2 - dropped - result_replies,
        seconds=time.monotonic() - started,
        note=f"{ignored} malformed replies to its chunks ignored, the rest unknown ids",
    )
    print(line)
    assert ignored == sum(1 for i in range(COUNT) if i % len(ids) < 2)
    assert dropped == COUNT


def envelope(**fields: object) -> dict:
    return {"kind": "say", "sender": "mallory", "sender_id": "x" * 32, "text": "hi", "time": 1.7e9, **fields}


@pytest.mark.timeout(120)
def test_pikachat_receiver_skips_200_malformed_messages_and_keeps_listening(
    spawn: Spawn, amqp_url: str, vhost: str, report: Report
) -> None:
    garbage = with_odd_properties(
        malformed(
            COUNT,
            valid=json.dumps(envelope()).encode(),
            wrong_types=[
                *NOT_AN_OBJECT,
                {},
                envelope(kind="shout"),
                envelope(kind=None),
                envelope(text=5),
                envelope(sender=""),
                envelope(sender=["ash"]),
                envelope(sender_id="y" * 65),
                envelope(time="noon"),
                envelope(time=True),
                envelope(time=-1),
                envelope(time=1e300),
            ],
        )
    )
    started = time.monotonic()
    receiver = spawn("pikachat/receive.py")
    receiver.wait_for("listening on exchange 'pikachat'")
    publish(amqp_url, "pikachat", "", garbage)
    sender = spawn("pikachat/send.py", "--name", "ash", stdin=True)
    sender.send("still here")
    sender.close_stdin()
    assert sender.wait() == 0, sender.output

    receiver.wait_for(r"ash: still here$", timeout=60)
    queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages")
    skipped = receiver.count(r"skipped a malformed message \(\d+ bytes\)")
    line = report(
        "garbage pikachat",
        sent=COUNT + 1,
        delivered=skipped + len(receiver.stdout_lines),
        duplicates=0,
        lost=0,
        seconds=time.monotonic() - started,
        note=f"{skipped} skipped, queue empty",
    )
    print(line)
    assert skipped == COUNT
    assert [row.split("\t")[1] for row in queues.splitlines()] == ["0"]
    assert receiver.stdout_lines[-1].endswith("ash: still here") and len(receiver.stdout_lines) == 1
    assert receiver.popen.poll() is None and "Traceback" not in receiver.output
