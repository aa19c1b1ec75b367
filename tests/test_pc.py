"""The pc example, run as real processes against a real broker."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator

import pika
import pytest

from tests.conftest import (
    ROOT,
    BrokerNode,
    Proc,
    Spawn,
    messages_ready,
    queue_is_empty,
    rabbitmqctl,
    run_to_end,
    wait_until,
)
from tests.docs import doc_command
from tests.faults.conftest import blocked_connections, memory_alarm

RECEIVED = re.compile(r"#(\d+) received '(.*)'( \(redelivered\))?$")


def received(proc) -> list[str]:
    """The texts a consumer logged, in the order it logged them."""
    return [m.group(2) for line in proc.stderr_lines if (m := RECEIVED.search(line))]


def stop(consumer) -> None:
    """Stop a consumer as a user would: SIGTERM, exit 0 (acking what it handled)."""
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0, consumer.output


def produce(spawn: Spawn, *args: str, **kwargs) -> None:
    proc = run_to_end(spawn, "pc/producer.py", *args, **kwargs)
    assert proc.popen.returncode == 0, proc.output


# The commands the pages show, run as written ---------------------------------

OUTPUT_OF = re.compile(r"<!--\s*output of:\s*(.*?)\s*-->\s*\n```text\n(.*?)^```", re.M | re.S)


def output_shown(page: str, command: str) -> list[str]:
    """The lines of the ```text block that ``page`` marks ``<!-- output of: COMMAND -->``."""
    blocks = [body for cmd, body in OUTPUT_OF.findall((ROOT / page).read_text()) if cmd == command]
    assert blocks, f"{page} shows no output of {command!r}"
    return blocks[0].splitlines()


def masked(line: str) -> str:
    """A log line with what changes from run to run (time, broker address, speed) masked."""
    line = re.sub(r"^\d\d:\d\d:\d\d ", "HH:MM:SS ", line)
    line = re.sub(r" at amqps?://\S+?(;|$| )", r" at URL\1", line)
    return re.sub(r"in [\d.]+ s \(\d+ msg/s", "in S s (N msg/s", line)


def assert_shows(lines: list[str], shown: list[str]) -> None:
    """The shown lines appear in ``lines``, masked, in order; ``...`` on the page stands for any lines."""
    actual = [masked(line) for line in lines]
    at = 0
    for i, line in enumerate(shown):
        if line == "...":
            continue
        want = masked(line)
        # Right after a line (not after "..."), the next shown line must be the next line.
        window = actual[at:] if i == 0 or shown[i - 1] == "..." else actual[at : at + 1]
        assert want in window, f"the page shows {line!r}, the script printed:\n" + "\n".join(lines)
        at += window.index(want) + 1


@pytest.fixture
def shell(amqp_url: str) -> Iterator[Callable[[str], Proc]]:
    """Run a command as a page shows it: in bash, the venv's python first on PATH (as with pyclassrc)."""
    started: list[Proc] = []

    def _run(command: str) -> Proc:
        env = {
            **os.environ,
            "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "AMQP_URL": amqp_url,
        }
        proc = Proc(["bash", "-c", command], env, stdin=False)
        started.append(proc)
        return proc

    yield _run
    for proc in started:
        proc.kill()


@pytest.mark.parametrize("page", ["docs/pc.md", "README.md"])
def test_the_lesson_runs_as_the_page_shows(shell: Callable[[str], Proc], amqp_url: str, page: str) -> None:
    consumer = shell(doc_command("python pc/consumer.py"))
    consumer.wait_for("waiting for messages")
    one = shell(doc_command("python pc/producer.py my awesome message"))
    assert one.wait(30) == 0, one.output
    if page == "docs/pc.md":
        many = shell(doc_command("python pc/producer.py --count 10000 batch"))
        assert many.wait(120) == 0, many.output
        consumer.wait_for("received 'batch 10000'", 60)
        assert_shows(one.stderr_lines, output_shown(page, "python pc/producer.py my awesome message"))
        assert_shows(many.stderr_lines, output_shown(page, "python pc/producer.py --count 10000 batch"))
    else:
        consumer.wait_for("received 'my awesome message'")
    consumer.signal(signal.SIGINT)  # Ctrl-C
    assert consumer.wait() == 0, consumer.output
    assert_shows(consumer.stderr_lines, output_shown(page, "python pc/consumer.py"))
    assert queue_is_empty(amqp_url, "pc"), "every message should have been acked"


def test_two_slow_consumers_share_the_work_and_take_it_back_as_the_page_shows(
    shell: Callable[[str], Proc],
) -> None:
    first = shell(doc_command("python pc/consumer.py --work 2"))
    first.wait_for("waiting for messages")
    second = shell(doc_command("python pc/consumer.py --work 2"))
    second.wait_for("waiting for messages")
    assert shell(doc_command("python pc/producer.py --count 4 task")).wait(30) == 0
    # The broker deals the four out in turn, two to each at once (prefetch);
    # each consumer handles its first for 2 s before it even logs its second.
    wait_until(lambda: len(received(first)) + len(received(second)) == 2, 15, "one message each")
    killed = first if received(first) == ["task 1"] else second
    survivor = second if killed is first else first
    assert (received(killed), received(survivor)) == (["task 1"], ["task 2"])
    killed.signal(signal.SIGKILL)  # while it handles 'task 1': neither of its two was acked
    killed.wait()
    survivor.wait_for("received 'task 3' \\(redelivered\\)", 20)
    assert received(survivor) == ["task 2", "task 4", "task 1", "task 3"]
    assert_shows(survivor.stderr_lines, output_shown("docs/pc.md", "python pc/consumer.py --work 2"))


def test_send_one_publishes_one_confirmed_persistent_message_as_the_page_shows(
    shell: Callable[[str], Proc], amqp_url: str
) -> None:
    proc = shell(doc_command("python pc/send_one.py Hello"))
    assert proc.wait(30) == 0, proc.output
    assert proc.stdout.splitlines() == output_shown("docs/pc.md", "python pc/send_one.py Hello")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        _method, props, body = connection.channel().basic_get("pc", auto_ack=True)
    assert body == b"Hello"
    assert (props.content_type, props.delivery_mode) == ("text/plain", 2)


def test_send_one_help_shows_how_to_use_it_and_sends_nothing(spawn: Spawn, amqp_url: str) -> None:
    proc = run_to_end(spawn, "pc/send_one.py", "--help")
    assert proc.popen.returncode == 0, proc.output
    assert "python pc/send_one.py [TEXT ...]" in proc.stdout
    assert not messages_ready(amqp_url, "pc"), "--help must not be sent as a message"


# The behaviour behind the lesson ----------------------------------------------


def test_messages_sent_before_the_consumer_starts_arrive_in_order(spawn: Spawn, amqp_url: str) -> None:
    produce(spawn, "my", "awesome", "message")
    produce(spawn, "--count", "50", "batch")
    assert messages_ready(amqp_url, "pc") == 51

    consumer = spawn("pc/consumer.py")
    consumer.wait_for(r"received 'batch 50'")

    assert received(consumer) == ["my awesome message"] + [f"batch {i}" for i in range(1, 51)]
    stop(consumer)
    assert queue_is_empty(amqp_url, "pc"), "every message should have been acked"


def test_ack_each_acks_every_message_as_soon_as_it_is_handled(spawn: Spawn, amqp_url: str) -> None:
    # Killed just after it logged the last of 120 fast messages, a consumer
    # acking in batches still holds many handled but unacked; with --ack-each,
    # at most that last one (logged before it is handled and acked).
    produce(spawn, "--count", "120", "fast")
    consumer = spawn("pc/consumer.py", "--ack-each")
    consumer.wait_for(r"received 'fast 120'")
    consumer.signal(signal.SIGKILL)
    consumer.wait()
    produce(spawn, "end")
    again = spawn("pc/consumer.py")
    again.wait_for(r"received 'end'")
    redelivered = [line for line in again.stderr_lines if line.endswith("(redelivered)")]
    assert len(redelivered) <= 1, redelivered
    assert received(again)[-1] == "end"
    stop(again)
    assert queue_is_empty(amqp_url, "pc"), "every message should have been acked"


def test_default_message_and_consumer_started_first(spawn: Spawn) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    produce(spawn)
    consumer.wait_for(r"#1 received 'Hello World!'$")


def test_producer_reports_success(spawn: Spawn) -> None:
    proc = run_to_end(spawn, "pc/producer.py", "--count", "3", "x")
    assert proc.popen.returncode == 0
    assert "sent 3 messages" in proc.stderr and "all confirmed" in proc.stderr


def test_a_killed_consumer_loses_nothing(spawn: Spawn, amqp_url: str) -> None:
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
    stop(fresh)
    assert queue_is_empty(amqp_url, "pc"), "every message should have been acked"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_consumer_stops_cleanly_on_signal(spawn: Spawn, signum: int) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    consumer.signal(signum)
    assert consumer.wait() == 0
    assert "Traceback" not in consumer.output
    assert consumer.stderr_lines[-1].endswith("stopped")


def test_consumer_stops_cleanly_while_handling_and_the_message_survives(spawn: Spawn, amqp_url: str) -> None:
    produce(spawn, "slow one")
    consumer = spawn("pc/consumer.py", "--work", "30")
    consumer.wait_for("received 'slow one'")
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
    assert "Traceback" not in consumer.output
    wait_until(lambda: messages_ready(amqp_url, "pc") == 1, 10, "the unfinished message back in the queue")


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


def test_any_body_is_shown_escaped_where_needed_and_acked(spawn: Spawn, amqp_url: str) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    bodies = [
        b"Hello World!",  # as the official tutorial's new_task.py sends it: no content type
        b"\xff\xfe not utf-8",
        "red \x1b[31m alert\r\nrtl \u202e".encode(),
        b"\x1b]0;owned\x07 \xc3",
        b"z" * 5000,
    ]
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", "pc", body, mandatory=True)
    produce(spawn, "still here")

    consumer.wait_for("received 'still here'")
    shown = [line.split(" received ", 1)[1] for line in consumer.stderr_lines if " received " in line]
    assert shown == [
        "'Hello World!'",
        "b'\\xff\\xfe not utf-8' (12 bytes, not UTF-8)",
        "'red \\x1b[31m alert\\r\\nrtl \\u202e'",
        "b'\\x1b]0;owned\\x07 \\xc3' (12 bytes, not UTF-8)",
        f"'{'z' * 1000}' (5,000 bytes)",
        "'still here'",
    ]
    assert not any(c in consumer.stderr for c in "\x1b\x07\r\u202e")
    assert "rejected" not in consumer.stderr
    stop(consumer)
    assert queue_is_empty(amqp_url, "pc"), "every message should have been acked"


def test_the_producer_sends_plain_text(spawn: Spawn, amqp_url: str) -> None:
    produce(spawn, "grüße", "aus", "Köln")
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        _method, props, body = connection.channel().basic_get("pc", auto_ack=True)
    assert body == "grüße aus Köln".encode()
    assert props.content_type == "text/plain"
    assert props.delivery_mode == 2


# (what an older pc left, how it declared the queue)
OLDER_QUEUES = {
    "classic": ("pc", {}),
    "quorum without a dead-letter queue": ("pc", {"x-queue-type": "quorum", "x-delivery-limit": 5}),
    "pc.dead with other arguments": ("pc.dead", {"x-queue-type": "quorum", "x-max-length": 10}),
    "classic pc.dead": ("pc.dead", {"x-max-length": 10_000}),
}


@pytest.mark.parametrize("older", OLDER_QUEUES)
@pytest.mark.parametrize("script", ["pc/producer.py", "pc/consumer.py"])
def test_a_queue_left_by_an_older_pc_is_one_line_saying_what_to_do(
    spawn: Spawn, amqp_url: str, vhost: str, script: str, older: str
) -> None:
    queue, arguments = OLDER_QUEUES[older]
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare(queue, durable=True, arguments=arguments)
    proc = run_to_end(spawn, script)
    assert proc.popen.returncode == 1, proc.output
    assert len(proc.stderr_lines) == 1, proc.stderr
    assert f"queue {queue!r} exists with other arguments" in proc.stderr
    assert f"rabbitmqctl delete_queue -p {vhost} {queue}'" in proc.stderr
    assert "PRECONDITION_FAILED" in proc.stderr and "Traceback" not in proc.output


def test_the_queues_are_a_quorum_queue_with_a_delivery_limit_and_a_bounded_quorum_dead_letter_queue(
    spawn: Spawn, vhost: str
) -> None:
    produce(spawn)
    out = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "type", "arguments")
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    assert set(rows) == {"pc", "pc.dead"}
    kind, arguments = rows["pc"]
    assert kind == "quorum"
    assert '{"x-delivery-limit",5}' in arguments
    assert '{"x-dead-letter-exchange",[]}' in arguments
    assert '{"x-dead-letter-routing-key","pc.dead"}' in arguments
    kind, arguments = rows["pc.dead"]
    assert kind == "quorum", "replicated, so that losing one node of a cluster does not lose it"
    assert '{"x-max-length",10000}' in arguments


def test_a_message_over_the_delivery_limit_is_kept_in_pc_dead(spawn: Spawn, amqp_url: str) -> None:
    produce(spawn, "poison")
    # A consumer that gives the message back every time, as one that crashes on it would.
    shown: list[bytes] = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()

        def give_back() -> bool:
            method, _props, body = channel.basic_get("pc")
            if method is not None:
                shown.append(body)
                channel.basic_nack(method.delivery_tag, requeue=True)
            return messages_ready(amqp_url, "pc.dead") == 1

        wait_until(give_back, 30, "the message to be dead-lettered")
        assert shown == [b"poison"] * 6, "delivered once and given back 5 times, then dead-lettered"
        assert messages_ready(amqp_url, "pc") == 0
        _method, props, body = channel.basic_get("pc.dead", auto_ack=True)
    assert body == b"poison" and props.delivery_mode == 2
    assert props.headers["x-first-death-queue"] == "pc"
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    # The pc consumer is not shown it a 7th time.
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    produce(spawn, "after the poison")
    consumer.wait_for("received 'after the poison'")
    assert received(consumer) == ["after the poison"]
    stop(consumer)


@pytest.mark.parametrize("acks", ["batched", "--ack-each"])
def test_a_message_the_handler_fails_on_is_given_back_then_dead_lettered_and_the_consumer_carries_on(
    spawn: Spawn, amqp_url: str, acks: str
) -> None:
    consumer = spawn("pc/consumer.py", "--fail-on", "poison", *([acks] if acks != "batched" else []))
    consumer.wait_for("waiting for messages")
    produce(spawn, "--count", "3", "before")
    produce(spawn, "poison")
    produce(spawn, "--count", "3", "after")
    consumer.wait_for("received 'after 3'")
    wait_until(lambda: messages_ready(amqp_url, "pc.dead") == 1, 30, "the message to be dead-lettered")
    failures = [line for line in consumer.stderr_lines if "could not be handled" in line]
    assert len(failures) == 6, "delivered once and given back 5 times, then dead-lettered"
    assert failures[0].endswith("could not be handled (ValueError: --fail-on 'poison'); giving it back")
    # The others were handled and acked, the batched ones too.
    assert [t for t in received(consumer) if t != "poison"] == [
        f"{w} {i}" for w in ("before", "after") for i in (1, 2, 3)
    ]
    stop(consumer)
    assert consumer.wait() == 0 and "Traceback" not in consumer.output
    assert queue_is_empty(amqp_url, "pc"), "every other message should have been acked"
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        _method, props, body = connection.channel().basic_get("pc.dead", auto_ack=True)
    assert body == b"poison" and props.headers["x-first-death-reason"] == "delivery_limit"


def test_the_consumer_declares_and_consumes_again_when_its_queue_is_deleted(spawn: Spawn, vhost: str) -> None:
    consumer = spawn("pc/consumer.py")
    consumer.wait_for("waiting for messages")
    rabbitmqctl("delete_queue", "-p", vhost, "pc")
    consumer.wait_for(r"WARNING the broker cancelled the consumer \(queue 'pc' deleted\?\); declaring it")
    wait_until(lambda: consumer.count("waiting for messages") == 2, 15, "the consumer to consume again")
    produce(spawn, "after the delete")
    consumer.wait_for("received 'after the delete'")
    assert "Traceback" not in consumer.output


def test_a_queue_deleted_under_a_running_producer_is_one_line_and_exit_1(
    spawn: Spawn, amqp_url: str, vhost: str
) -> None:
    producer = spawn("pc/producer.py", "--count", "300000", "doomed")
    wait_until(lambda: (messages_ready(amqp_url, "pc") or 0) >= 1000, 30, "the producer to be publishing")
    rabbitmqctl("delete_queue", "-p", vhost, "pc")
    assert producer.wait(60) == 1, producer.output
    # RabbitMQ returns what it can no longer route, or (3.10, with messages in
    # flight to a quorum queue) closes the connection, or stops answering on it
    # (then the producer reconnects after CONFIRMS_DUE without a confirm): the
    # producer finds the queue gone when it reconnects. It may stop reading just
    # after returning some: the producer drops the connection after CLOSE_DUE.
    error = producer.stderr_lines[-1]
    assert re.search(
        r"could not route a message to queue 'pc'|queue 'pc' was deleted while we published", error
    )
    assert error.endswith("of 300000 confirmed)") and "Traceback" not in producer.output
    assert messages_ready(amqp_url, "pc") is None, "the producer must not create the queue again"


def test_messages_returned_then_acked_are_one_line_and_exit_1(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    with memory_alarm(broker_node):
        # The broker stops reading from the producer after its declaration,
        # before its first message: it reads them all once the alarm is gone,
        # after the queue is. More than WINDOW messages: an ack makes room for more.
        producer = spawn("pc/producer.py", "--count", "6000", "held", url=broker_node.url(node_vhost))
        wait_until(lambda: blocked_connections(broker_node, node_vhost) == 1, 30, "the producer blocked")
        rabbitmqctl("delete_queue", "-p", node_vhost, "pc", node=broker_node)
    assert producer.wait(30) == 1, producer.output
    assert producer.stderr_lines[-1] == (
        "producer: the broker could not route a message to queue 'pc' (0 of 6000 confirmed)"
    )
    assert "Traceback" not in producer.output


def refuse_publishes(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    """Make the broker nack what is published to ``pc``: a policy that caps it at 1 message, then fill it.

    A quorum queue enforces its length between publishes: the first messages
    overfill it and are confirmed; from then on it refuses (nacks) each one,
    as a channel left pointing at a dead cluster leader does.
    """
    policy = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "full", "^pc$", policy)
    produce(spawn, "--count", "2", "fill")
    wait_until(lambda: (messages_ready(amqp_url, "pc") or 0) >= 1, 10, "a full queue")


REFUSED = re.compile(
    r"WARNING the broker refused \d+ message\(s\); reconnecting in [\d.]+ s to publish the unconfirmed again$"
)


def test_nacked_messages_are_published_again_on_a_new_connection(
    spawn: Spawn, amqp_url: str, vhost: str
) -> None:
    refuse_publishes(spawn, amqp_url, vhost)
    producer = spawn("pc/producer.py", "--count", "5", "again")
    wait_until(
        lambda: producer.count("WARNING the broker refused") >= 3 or producer.popen.poll() is not None,
        15,
        "three refusals",
    )
    assert producer.popen.poll() is None, producer.output  # still trying
    rabbitmqctl("clear_policy", "-p", vhost, "full")
    assert producer.wait(30) == 0, producer.output
    assert "Traceback" not in producer.output
    refusals = [line for line in producer.stderr_lines if "refused" in line]
    assert all(REFUSED.search(line) for line in refusals), refusals
    # Published again after a growing pause (0.1 s, 0.2 s...), not in a tight loop.
    assert len(refusals) <= 10, refusals
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        bodies = []
        while (got := channel.basic_get("pc", auto_ack=True))[0] is not None:
            bodies.append(got[2].decode())
    # Every message confirmed, so every one is there: once, or twice if the broker nacked
    # a message it had taken after all.
    assert {b for b in bodies if b.startswith("again")} == {f"again {i}" for i in range(1, 6)}, bodies


def test_a_producer_nacked_for_30_s_gives_up_with_one_line(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    refuse_publishes(spawn, amqp_url, vhost)
    started = time.monotonic()
    producer = spawn("pc/producer.py", "--count", "3", "refused")
    assert producer.wait(45) == 1, producer.output
    elapsed = time.monotonic() - started
    assert 30 <= elapsed < 40, elapsed
    assert producer.stderr_lines[-1] == (
        "producer: the broker refused every message for 30 s; giving up (0 of 3 confirmed)"
    )
    assert "Traceback" not in producer.output
    # Each new connection after a longer pause, up to 2 s: some 20 tries in 30 s.
    assert 10 <= producer.count("WARNING the broker refused") <= 25, producer.output


def test_a_broker_lost_after_a_nack_is_an_outage_with_its_time_budget(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    url = broker_node.url(node_vhost)
    policy = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    args = ("set_policy", "-p", node_vhost, "--apply-to", "queues", "full", "^pc$", policy)
    rabbitmqctl(*args, node=broker_node)
    produce(spawn, "--count", "2", "fill", url=url)
    wait_until(lambda: (messages_ready(url, "pc") or 0) >= 1, 10, "a full queue")
    producer = spawn("pc/producer.py", "--count", "3", "refused", url=url)
    producer.wait_for("WARNING the broker refused", 15)
    broker_node.stop()  # between two nacks: the pause after a nack, then reconnections that fail
    stopped = time.monotonic()
    assert producer.wait(60) == 1, producer.output
    assert time.monotonic() - stopped < 45
    assert re.fullmatch(
        r"producer: lost amqp://guest@\S+ and could not reconnect within 30 s \(0 of 3 confirmed\)",
        producer.stderr_lines[-1],
    ), producer.output
    assert "Traceback" not in producer.output


def test_a_blocked_producer_says_so_at_once_and_carries_on_when_unblocked(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    with memory_alarm(broker_node):
        producer = spawn("pc/producer.py", "--count", "10", "held", url=broker_node.url(node_vhost))
        producer.wait_for(
            r"WARNING the broker has blocked this connection: .* \(memory or disk alarm\); waiting up to 60 s"
        )
    producer.wait_for("INFO the broker has unblocked this connection")
    assert producer.wait(30) == 0, producer.output
    assert messages_ready(broker_node.url(node_vhost), "pc") == 10


def test_a_producer_blocked_past_its_timeout_gives_up_with_one_line(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    url = broker_node.url(node_vhost) + "?blocked_connection_timeout=2"
    with memory_alarm(broker_node):
        producer = spawn("pc/producer.py", "--count", "10", "held", url=url)
        producer.wait_for("has blocked this connection")
        assert producer.wait(20) == 1, producer.output
    last = producer.stderr_lines[-1]
    assert last.startswith("producer: the broker blocked this connection for 2 s (memory or disk alarm)")
    assert last.endswith("(0 of 10 confirmed)") and "Traceback" not in producer.output


def test_amqp_url_is_honoured(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    consumer = spawn("pc/consumer.py", url=amqp_url + "?heartbeat=7")
    consumer.wait_for("waiting for messages")
    connections = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "timeout")
    rows = [line.split("\t") for line in connections.splitlines()]
    assert [timeout for host, timeout in rows if host == vhost] == ["7"]


FAR_FUTURE = object()  # a header value written as a timestamp past the year 9999, as any publisher may


def test_a_header_pika_cannot_decode_costs_nothing(
    spawn: Spawn, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the consumer's care, pika dropped the connection at that message, again and again, and the
    # delivery limit dead-lettered it with every good message in flight beside it.
    encode = pika.data.encode_value

    def encode_value(pieces: list, value: object) -> int:
        if value is FAR_FUTURE:
            pieces.append(struct.pack(">cQ", b"T", 2**64 - 1))
            return 9
        return encode(pieces, value)

    monkeypatch.setattr(pika.data, "encode_value", encode_value)
    produce(spawn, "--count", "100", "before")  # declares pc and pc.dead as the consumer does
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        headers = {"when": FAR_FUTURE}
        channel.basic_publish("", "pc", b"far future", pika.BasicProperties(headers=headers), mandatory=True)
    produce(spawn, "--count", "100", "after")

    consumer = spawn("pc/consumer.py")
    consumer.wait_for(r"received 'after 100'")
    stop(consumer)
    expected = [f"before {i}" for i in range(1, 101)] + ["far future"] + [f"after {i}" for i in range(1, 101)]
    assert received(consumer) == expected
    assert "lost the broker" not in consumer.output
    assert queue_is_empty(amqp_url, "pc") and not messages_ready(amqp_url, "pc.dead")
