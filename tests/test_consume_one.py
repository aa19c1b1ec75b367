"""pc/consume_one.py, the simplest consumer: as docs/pc.md shows it, with the producers, and its errors."""

from __future__ import annotations

import signal

import pika

from tests.conftest import (
    Proc,
    Spawn,
    assert_one_line_error,
    free_port,
    messages_ready,
    queue_is_empty,
    wait_until,
)
from tests.docs import doc_command
from tests.test_pc import output_shown, produce

WAITING = "waiting for messages on 'pc'; Ctrl-C to stop"


def run_doc(spawn: Spawn, command: str) -> Proc:
    """Start ``command``, a page's ``python SCRIPT ARGS...``, with the test's python."""
    _python, script, *args = command.split()
    return spawn(script, *args)


def ctrl_c(consumer: Proc) -> None:
    """Stop it as a user would: exit 0, nothing on stderr, no traceback."""
    consumer.signal(signal.SIGINT)
    assert consumer.wait() == 0, consumer.output
    assert consumer.stderr_lines == []


def shown(consumer: Proc) -> list[str]:
    return [line for line in consumer.stdout_lines if line.startswith("received ")]


def test_consume_one_shows_what_send_one_sent_as_the_page_shows(spawn: Spawn, amqp_url: str) -> None:
    sender = run_doc(spawn, doc_command("python pc/send_one.py Hello"))
    assert sender.wait(30) == 0, sender.output
    consumer = run_doc(spawn, doc_command("python pc/consume_one.py"))
    consumer.wait_for("received 'Hello'")
    ctrl_c(consumer)
    assert consumer.stdout_lines == output_shown("docs/pc.md", "python pc/consume_one.py")
    assert queue_is_empty(amqp_url, "pc"), "the message should have been acked"


def test_messages_from_the_producer_arrive_in_order(spawn: Spawn, amqp_url: str) -> None:
    consumer = spawn("pc/consume_one.py")
    consumer.wait_for(WAITING)
    produce(spawn, "--count", "3", "task")
    consumer.wait_for("received 'task 3'")
    ctrl_c(consumer)
    assert consumer.stdout_lines == [WAITING, "received 'task 1'", "received 'task 2'", "received 'task 3'"]
    assert queue_is_empty(amqp_url, "pc")


def test_a_body_that_is_not_text_is_shown_and_acked(spawn: Spawn, amqp_url: str) -> None:
    produce(spawn, "first")  # declares pc
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().basic_publish("", "pc", b"\xff\xfe\x1b[2Jend")
    consumer = spawn("pc/consume_one.py")
    consumer.wait_for("end'$")
    ctrl_c(consumer)
    assert shown(consumer) == ["received 'first'", "received '\ufffd\ufffd\\x1b[2Jend'"]
    assert queue_is_empty(amqp_url, "pc")


def test_ctrl_c_loses_nothing(spawn: Spawn, amqp_url: str) -> None:
    # Ctrl-C amid 2,000 messages: those shown were acked, but perhaps the last (shown, not yet acked);
    # the others stay in the queue, or go back to it if they had been pushed to the consumer (prefetch).
    produce(spawn, "--count", "2000", "m")
    consumer = spawn("pc/consume_one.py")
    consumer.wait_for("received 'm 1'")
    ctrl_c(consumer)

    # The consumer exits without closing; the broker requeues what it held once it sees the connection
    # go, a moment later. Wait for that: a message lost for good never comes back, and this times out.
    def accounted() -> int:
        return len(shown(consumer)) + (messages_ready(amqp_url, "pc") or 0)

    wait_until(lambda: accounted() in (2000, 2001), 15, "every message shown or back in the queue")
    assert 0 < (messages_ready(amqp_url, "pc") or 0) < 2000
    again = spawn("pc/consume_one.py")
    again.wait_for("received 'm 2000'", 60)
    ctrl_c(again)
    assert len(set(shown(consumer) + shown(again))) == 2000


def test_a_deleted_queue_ends_it_with_one_line(spawn: Spawn, amqp_url: str) -> None:
    consumer = spawn("pc/consume_one.py")
    consumer.wait_for(WAITING)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_delete("pc")
    assert consumer.wait() == 1, consumer.output
    assert consumer.stderr_lines == ["consume_one: the broker cancelled the consumer (queue 'pc' deleted?)"]


def test_a_queue_declared_otherwise_is_one_line(spawn: Spawn, amqp_url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare("pc", durable=True)  # classic: not as pc/workqueue.py says
    consumer = spawn("pc/consume_one.py")
    assert consumer.wait() == 1, consumer.output
    assert len(consumer.stderr_lines) == 1, consumer.stderr
    assert consumer.stderr.startswith('consume_one: (406, "PRECONDITION_FAILED - inequivalent arg')


def test_an_unreachable_broker_is_one_line(spawn: Spawn) -> None:
    consumer = spawn("pc/consume_one.py", url=f"amqp://guest:s3cret@127.0.0.1:{free_port()}/%2F")
    assert consumer.wait(30) == 1
    assert consumer.stdout_lines == []
    assert_one_line_error(consumer, "connection refused", "s3cret")
    assert consumer.stderr.startswith("consume_one: cannot connect to amqp://guest@127.0.0.1:")
