"""The pc example, run as real processes against a real broker."""

from __future__ import annotations

import json
import re
import signal

import pika
import pytest

from tests.conftest import (
    BrokerNode,
    Spawn,
    queue_depth,
    rabbitmqctl,
    run_to_end,
    wait_until,
)

RECEIVED = re.compile(r"#(\d+) received '(.*)'( \(redelivered\))?$")


def received(proc) -> list[str]:
    """The texts a consumer logged, in the order it logged them."""
    return [m.group(2) for line in proc.stderr_lines if (m := RECEIVED.search(line))]


def produce(spawn: Spawn, *args: str, **kwargs) -> None:
    proc = run_to_end(spawn, "pc/producer.py", *args, **kwargs)
    assert proc.popen.returncode == 0, proc.output


def test_messages_sent_before_the_consumer_starts_arrive_in_order(spawn: Spawn, vhost: str) -> None:
    produce(spawn, "my", "awesome", "message")
    produce(spawn, "--count", "50", "batch")
    assert queue_depth(vhost, "pc") == 51

    consumer = spawn("pc/consumer.py")
    consumer.wait_for(r"received 'batch 50'")

    assert received(consumer) == ["my awesome message"] + [f"batch {i}" for i in range(1, 51)]
    wait_until(lambda: queue_depth(vhost, "pc") == 0, 10, "every message to be acked")


def test_default_message_and_consumer_started_first(spawn: Spawn) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    produce(spawn)
    consumer.wait_for(r"#1 received 'Hello World!'$")


def test_producer_reports_success(spawn: Spawn) -> None:
    proc = run_to_end(spawn, "pc/producer.py", "--count", "3", "x")
    assert proc.popen.returncode == 0
    assert "sent 3 messages" in proc.stderr and "all confirmed" in proc.stderr


def test_a_killed_consumer_loses_nothing(spawn: Spawn, vhost: str) -> None:
    produce(spawn, "--count", "20", "job")
    slow = spawn("pc/consumer.py", "--work", "0.3")
    slow.wait_for(r"received 'job 3'")
    slow.signal(signal.SIGKILL)
    slow.wait()
    done_before_kill = received(slow)[:-1]  # the last one was in hand, not acked

    fresh = spawn("pc/consumer.py")
    fresh.wait_for(r"received 'job 20'")
    redelivered = [line for line in fresh.stderr_lines if line.endswith("(redelivered)")]

    assert set(done_before_kill) | set(received(fresh)) == {f"job {i}" for i in range(1, 21)}
    assert redelivered, "messages in hand when killed should come back marked redelivered"
    wait_until(lambda: queue_depth(vhost, "pc") == 0, 10, "every message to be acked")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_consumer_stops_cleanly_on_signal(spawn: Spawn, signum: int) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    consumer.signal(signum)
    assert consumer.wait() == 0
    assert "Traceback" not in consumer.output
    assert consumer.stderr_lines[-1].endswith("stopped")


def test_consumer_stops_cleanly_while_handling_and_the_message_survives(spawn: Spawn, vhost: str) -> None:
    produce(spawn, "slow one")
    consumer = spawn("pc/consumer.py", "--work", "30")
    consumer.wait_for("received 'slow one'")
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
    assert "Traceback" not in consumer.output
    wait_until(lambda: queue_depth(vhost, "pc") == 1, 10, "the unfinished message back in the queue")


def test_nothing_is_lost_across_a_broker_restart(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    url = broker_node.url(node_vhost)
    produce(spawn, "--count", "100", "kept", url=url)
    broker_node.restart()

    consumer = spawn("pc/consumer.py", url=url)
    consumer.wait_for(r"received 'kept 100'")
    assert received(consumer) == [f"kept {i}" for i in range(1, 101)]


def test_consumer_reconnects_after_a_broker_restart(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    url = broker_node.url(node_vhost)
    consumer = spawn("pc/consumer.py", url=url)
    consumer.wait_for("waiting for messages")
    broker_node.restart()
    consumer.wait_for("lost the broker")
    wait_until(lambda: consumer.count("waiting for messages") == 2, 60, "the consumer to reconnect")
    produce(spawn, "after the restart", url=url)
    consumer.wait_for("received 'after the restart'")


def test_malformed_messages_are_rejected_and_the_consumer_keeps_serving(
    spawn: Spawn, amqp_url: str, vhost: str
) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in [b"\xff\xfe not utf-8", b'{"text": ', b"[1, 2]", json.dumps({"text": 5}).encode()]:
            channel.basic_publish("", "pc", body)
    produce(spawn, "still here")

    consumer.wait_for("received 'still here'")
    assert consumer.count("rejected") == 4
    wait_until(lambda: queue_depth(vhost, "pc") == 0, 10, "nothing left requeued")


def test_amqp_url_is_honoured(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    consumer = spawn("pc/consumer.py", url=amqp_url + "?heartbeat=7")
    consumer.wait_for("waiting for messages")
    connections = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "timeout")
    rows = [line.split("\t") for line in connections.splitlines()]
    assert [timeout for host, timeout in rows if host == vhost] == ["7"]
