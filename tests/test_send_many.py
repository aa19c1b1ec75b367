"""pc/send_many.py, the pipelined publish with nothing retried: as docs/pc.md shows it, and its errors."""

from __future__ import annotations

import re
import signal

import pika

from tests.conftest import (
    Spawn,
    assert_one_line_error,
    free_port,
    messages_ready,
    rabbitmqctl,
    run_to_end,
    wait_until,
)
from tests.docs import doc_command


def test_the_page_command_publishes_every_message_confirmed_and_in_order(spawn: Spawn, amqp_url: str) -> None:
    _python, script, *args = doc_command("python pc/send_many.py 10000 batch").split()
    sender = run_to_end(spawn, script, *args, timeout=60)
    assert sender.popen.returncode == 0, sender.output
    assert sender.stdout_lines == ["sent 10000 messages to 'pc', all confirmed"]
    assert messages_ready(amqp_url, "pc") == 10000
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        bodies = [channel.basic_get("pc", auto_ack=True)[2] for _ in range(10000)]
    assert bodies == [f"batch {i}".encode() for i in range(1, 10001)]


def test_a_queue_declared_otherwise_is_one_line_and_exit_1(spawn: Spawn, amqp_url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare("pc")  # a classic queue, not pc's quorum queue
    sender = run_to_end(spawn, "pc/send_many.py", "3")
    assert sender.popen.returncode == 1, sender.output
    assert sender.stdout == ""
    assert len(sender.stderr_lines) == 1, sender.stderr
    assert sender.stderr_lines[0].startswith("send_many: the broker closed the channel: (406, ")
    assert sender.stderr_lines[0].endswith("(0 of 3 confirmed)")
    assert messages_ready(amqp_url, "pc") == 0


def test_no_broker_is_one_line_and_exit_1(spawn: Spawn) -> None:
    sender = run_to_end(spawn, "pc/send_many.py", "3", url=f"amqp://alice:s3cr3t@127.0.0.1:{free_port()}/%2F")
    assert_one_line_error(sender, "connection refused", "s3cr3t")
    assert "Traceback" not in sender.output


def test_a_malformed_url_and_a_bad_count_are_one_line(spawn: Spawn) -> None:
    sender = run_to_end(spawn, "pc/send_many.py", "3", url="http://alice:s3cr3t@rabbit/")
    assert sender.popen.returncode == 1, sender.output
    assert sender.stderr_lines == [
        "send_many: invalid broker URL http://alice@rabbit/: it must start with amqp:// or amqps://"
    ]
    counted = run_to_end(spawn, "pc/send_many.py", "0")
    assert counted.popen.returncode == 2
    assert counted.stderr_lines[-1] == (
        "send_many.py: error: count must be 1 to 1,000,000 (every message is held in memory until confirmed)"
    )


def test_ctrl_c_says_how_many_were_confirmed(spawn: Spawn, amqp_url: str) -> None:
    sender = spawn("pc/send_many.py", "300000")
    wait_until(lambda: (messages_ready(amqp_url, "pc") or 0) >= 1000, 30, "send_many to be publishing")
    sender.signal(signal.SIGINT)
    assert sender.wait(15) == 1, sender.output
    last = re.fullmatch(r"send_many: interrupted \((\d+) of 300000 confirmed\)", sender.stderr_lines[-1])
    assert last, sender.output
    # Those it counts as confirmed are in the queue; more may be (queued, their confirms on the way).
    assert 0 < int(last.group(1)) <= (messages_ready(amqp_url, "pc") or 0) < 300000
    assert "Traceback" not in sender.output


def test_a_queue_deleted_under_it_is_one_line_and_exit_1(spawn: Spawn, amqp_url: str, vhost: str) -> None:
    sender = spawn("pc/send_many.py", "300000", "doomed")
    wait_until(lambda: (messages_ready(amqp_url, "pc") or 0) >= 1000, 30, "send_many to be publishing")
    rabbitmqctl("delete_queue", "-p", vhost, "pc")
    # RabbitMQ 3.10 returns what it can no longer route, or closes the connection, or stops answering on it:
    # then no confirm comes for 10 s (pc/watchdog.py), and an unanswered close is dropped 10 s later.
    assert sender.wait(45) == 1, sender.output
    assert len(sender.stderr_lines) == 1, sender.stderr
    assert sender.stderr_lines[0].startswith("send_many: ") and "Traceback" not in sender.output
    assert re.search(r"\(\d+ of 300000 confirmed\)$", sender.stderr_lines[0]), sender.stderr
