"""The pikachat example, run as real processes against a real broker."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
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
    assert_one_line_error,
    free_port,
    rabbitmqctl,
    run_to_end,
    wait_until,
)
from tests.docs import doc_command
from tests.faults.conftest import memory_alarm
from tests.test_pc import output_shown

EXCHANGE = "pikachat"
READY = r"listening on exchange 'pikachat' at "
CLOCK = re.compile(r"^((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d) (.*)$")


def shown(proc: Proc) -> list[str]:
    """What a receiver printed, without the clock; every line must start with HH:MM:SS."""
    lines = []
    for line in proc.stdout_lines:
        match = CLOCK.match(line)
        assert match, f"not 'HH:MM:SS ...': {line!r}"
        lines.append(match.group(2))
    return lines


def listen(spawn: Spawn, *args: str, **kwargs) -> Proc:
    """Start a receiver and wait until its queue is bound."""
    proc = spawn("pikachat/receive.py", *args, **kwargs)
    proc.wait_for(READY, stream="stderr")
    return proc


def say(
    spawn: Spawn, *lines: str, name: str = "ash", args: tuple[str, ...] = (), code: int = 0, **kwargs
) -> Proc:
    """Pipe ``lines`` into send.py and wait for it to exit with ``code``."""
    proc = spawn("pikachat/send.py", *args, "--name", name, stdin=True, **kwargs)
    for line in lines:
        proc.send(line)
    proc.close_stdin()
    assert proc.wait() == code, proc.output
    return proc


def chat(spawn: Spawn, name: str, *args: str, **kwargs) -> Proc:
    """Start chat.py with an open stdin and wait until it has joined."""
    proc = spawn("pikachat/chat.py", *args, "--name", name, stdin=True, **kwargs)
    proc.wait_for(r"joined 'pikachat' at .* as " + name, stream="stderr")
    return proc


def publish_raw(url: str, *bodies: bytes) -> None:
    """Publish bodies straight to the exchange, as any client of the broker could."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        for body in bodies:
            channel.basic_publish(EXCHANGE, "", body)


def envelope(**fields: object) -> bytes:
    message = {"kind": "say", "sender": "mallory", "sender_id": "x" * 32, "text": "hi", "time": time.time()}
    return json.dumps({**message, **fields}).encode()


def test_every_receiver_gets_every_line_in_order(spawn: Spawn) -> None:
    started = time.time()
    receivers = [listen(spawn), listen(spawn)]
    lines = [f"line {i}" for i in range(1, 31)]
    say(spawn, *lines, name="ash")
    clocks = {time.strftime("%H:%M:%S", time.localtime(t)) for t in range(int(started), int(time.time()) + 2)}

    for receiver in receivers:
        receiver.wait_for(r"ash: line 30$")
        assert shown(receiver) == [f"ash: {line}" for line in lines]
        for line in receiver.stdout_lines:
            assert re.fullmatch(r"\d\d:\d\d:\d\d ash: line \d+", line)
            assert line[:8] in clocks, "the clock shown is the time the line was said"


def test_a_late_receiver_hears_nothing_said_before_it_came(spawn: Spawn) -> None:
    early = listen(spawn)
    say(spawn, "before", name="ash")
    early.wait_for(r"ash: before$")

    late = listen(spawn)
    say(spawn, "after", name="brock")
    late.wait_for(r"brock: after$")
    early.wait_for(r"brock: after$")
    assert shown(late) == ["brock: after"]
    assert shown(early) == ["ash: before", "brock: after"]


def test_a_line_nobody_hears_is_reported_and_the_sender_exits_0(spawn: Spawn) -> None:
    sender = say(spawn, "into the void", "and again", name="ash")
    assert "'into the void' reached no one: nobody is listening" in sender.stderr
    assert "'and again' reached no one: nobody is listening" in sender.stderr
    assert "reconnected" not in sender.stderr  # a returned line leaves the connection as it was
    assert "Traceback" not in sender.output


def run_say_one(spawn: Spawn, command: str) -> Proc:
    """Run a page's ``python pikachat/say_one.py WORDS...`` to its end; it must exit 0 with one line."""
    _python, script, *words = command.split()
    proc = spawn(script, *words)
    assert proc.wait(30) == 0, proc.output
    assert proc.stderr_lines == [] and len(proc.stdout_lines) == 1, proc.output
    return proc


def test_say_one_with_nobody_listening_says_so_as_the_page_shows(spawn: Spawn) -> None:
    command = doc_command("python pikachat/say_one.py hello everyone")
    sayer = run_say_one(spawn, command)
    assert sayer.stdout_lines == output_shown("docs/pikachat.md", command)


def test_say_one_reaches_every_receiver_and_says_so(spawn: Spawn) -> None:
    first, second = listen(spawn), listen(spawn)
    sayer = run_say_one(spawn, doc_command("python pikachat/say_one.py hello everyone"))
    assert sayer.stdout_lines == ["said 'hello everyone' to everyone listening (confirmed)"]
    for receiver in (first, second):
        receiver.wait_for("say_one: hello everyone$", stream="stdout")
        assert shown(receiver) == ["say_one: hello everyone"]


def test_say_one_cuts_a_long_line_so_that_receivers_take_it(spawn: Spawn) -> None:
    receiver = listen(spawn)
    sayer = spawn("pikachat/say_one.py", "x" * 20_000)  # whole, its body would be over MAX_BODY: skipped
    assert sayer.wait(30) == 0, sayer.output
    receiver.wait_for("say_one: x+$", stream="stdout")
    assert shown(receiver) == ["say_one: " + "x" * 2000]


def test_say_one_help_prints_its_usage_and_says_nothing(spawn: Spawn) -> None:
    receiver = listen(spawn)
    for flag in ("--help", "-h"):
        for url in (None, f"amqp://guest:guest@127.0.0.1:{free_port()}/"):  # the test's broker, then none
            helped = run_to_end(spawn, "pikachat/say_one.py", flag, **({"url": url} if url else {}))
            assert helped.popen.returncode == 0, helped.output
            assert "python pikachat/say_one.py [TEXT...]" in helped.stdout, helped.output
            assert helped.stderr == "" and "said" not in helped.stdout
    run_say_one(spawn, "python pikachat/say_one.py after help")
    receiver.wait_for("say_one: after help$", stream="stdout")
    assert shown(receiver) == ["say_one: after help"]


def test_without_a_name_the_sender_is_a_pokemon_with_a_number(spawn: Spawn) -> None:
    receiver = listen(spawn)
    sender = spawn("pikachat/send.py", stdin=True)
    sender.send("hi")
    sender.close_stdin()
    assert sender.wait() == 0, sender.output

    match = receiver.wait_for(r"^\d\d:\d\d:\d\d ([a-z]+\d{1,2}): hi$")
    assert f" as {match.group(1)};" in sender.stderr


def test_chat_shows_others_lines_not_its_own_and_who_comes_and_goes(spawn: Spawn) -> None:
    ash = chat(spawn, "ash")
    brock = chat(spawn, "brock")
    ash.wait_for(r"\* brock joined$")

    ash.send("hello from ash")
    brock.wait_for(r"ash: hello from ash$")
    brock.send("hi ash")
    ash.wait_for(r"brock: hi ash$")  # after its own line, had it been echoed

    brock.close_stdin()
    assert brock.wait() == 0, brock.output
    ash.wait_for(r"\* brock left$")
    ash.close_stdin()
    assert ash.wait() == 0, ash.output

    assert shown(ash) == ["* brock joined", "brock: hi ash", "* brock left"]
    assert shown(brock) == ["ash: hello from ash"]


def test_piped_chat_says_its_lines_then_leaves(spawn: Spawn) -> None:
    receiver = listen(spawn)
    misty = spawn("pikachat/chat.py", "--name", "misty", stdin=True)
    for line in ["one", "", "two"]:
        misty.send(line)
    misty.close_stdin()
    assert misty.wait() == 0, misty.output

    receiver.wait_for(r"\* misty left$")
    assert shown(receiver) == ["* misty joined", "misty: one", "misty: two", "* misty left"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_chat_leaves_on_signal(spawn: Spawn, signum: int) -> None:
    receiver = listen(spawn)
    misty = chat(spawn, "misty")
    receiver.wait_for(r"\* misty joined$")
    misty.signal(signum)
    assert misty.wait() == 0, misty.output
    assert "Traceback" not in misty.output
    receiver.wait_for(r"\* misty left$")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_receive_and_send_stop_cleanly_on_signal(spawn: Spawn, signum: int) -> None:
    receiver = listen(spawn)
    sender = spawn("pikachat/send.py", stdin=True)
    sender.wait_for("sending to exchange 'pikachat'")
    for proc in (receiver, sender):
        proc.signal(signum)
        assert proc.wait() == 0, proc.output
        assert "Traceback" not in proc.output
    assert receiver.stderr_lines[-1].endswith("stopped")


def test_escape_sequences_from_the_network_are_shown_harmless(spawn: Spawn, amqp_url: str) -> None:
    receiver = listen(spawn)
    nasty = "\x1b[31mred\x1b[0m \x1b]0;pwned\x07 del\x7f csi\x9b2J \u202eevil cr\rhere tab\tend"
    say(spawn, nasty, name="ash")
    publish_raw(
        amqp_url,
        envelope(sender="\x1b[2Jmallory\x00", text="\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\"),
        envelope(sender="m" * 100, text="x" * 5000),
        json.dumps({**json.loads(envelope()), "text": "lone \ud800 surrogate"}).encode(),
        envelope(kind="join", sender="\x1b[5mblink", text="\x1b[31mignored"),
    )
    receiver.wait_for(r"blink joined$")

    for control in "\x1b\x07\x7f\x9b\x00\u202e\ud800":
        assert control not in receiver.stdout
    assert shown(receiver) == [
        r"ash: \x1b[31mred\x1b[0m \x1b]0;pwned\x07 del\x7f csi\x9b2J \u202eevil cr\x0dhere tab\x09end",
        r"\x1b[2Jmallory\x00: \x1b]8;;http://evil\x1b\link\x1b]8;;\x1b" + "\\",
        "m" * 31 + "…: " + "x" * 1999 + "…",
        r"mallory: lone \ud800 surrogate",
        r"* \x1b[5mblink joined",
    ]


def test_malformed_messages_are_skipped_and_the_receiver_keeps_listening(spawn: Spawn, amqp_url: str) -> None:
    receiver = listen(spawn)
    misty = chat(spawn, "misty")
    bodies = [
        b"\xff\xfe not utf-8",
        b"not json",
        b"[1, 2]",
        b"{}",
        b"[" * 10_000,  # nested too deeply for the parser
        b" " * 100_000,  # too big to look at
        envelope(text=5),
        envelope(sender=""),
        envelope(sender_id=None),
        envelope(kind="shout"),
        envelope(time="noon"),
        envelope(time=True),
        envelope(time=1e300),
        envelope().replace(b'"time": ', b'"time": NaN, "was": '),
    ]
    publish_raw(amqp_url, *bodies)
    say(spawn, "still here", name="ash")

    for proc in (receiver, misty):
        proc.wait_for(r"ash: still here$")
        assert proc.count(r"WARNING skipped a malformed message \(\d+ bytes\): ") == len(bodies), proc.stderr
        assert "Traceback" not in proc.output
    assert shown(receiver) == ["* misty joined", "ash: still here"]
    assert shown(misty) == ["ash: still here"]
    assert receiver.count(r"\(100000 bytes\): too big") == 1
    assert receiver.count(r"nested too deeply") == 1


def test_receivers_survive_a_broker_restart(spawn: Spawn, broker_node: BrokerNode, node_vhost: str) -> None:
    url = broker_node.url(node_vhost)
    receiver = listen(spawn, url=url)
    misty = chat(spawn, "misty", url=url)
    say(spawn, "before the restart", url=url)
    receiver.wait_for(r"ash: before the restart$")

    broker_node.restart()
    for proc in (receiver, misty):
        proc.wait_for(r"WARNING lost the broker", stream="stderr")
        wait_until(lambda p=proc: p.count(READY) == 2, 60, "the receiver to listen again")

    say(spawn, "after the restart", url=url)
    misty.send("misty is back")
    receiver.wait_for(r"misty: misty is back$")
    misty.wait_for(r"ash: after the restart$")
    assert shown(receiver) == [
        "* misty joined",
        "ash: before the restart",
        "ash: after the restart",
        "misty: misty is back",
    ]
    assert shown(misty) == ["ash: before the restart", "ash: after the restart"]
    assert "Traceback" not in receiver.output + misty.output


def test_a_sender_reports_the_line_lost_with_the_broker_and_goes_on(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    url = broker_node.url(node_vhost)
    receiver = listen(spawn, url=url)
    sender = spawn("pikachat/send.py", "--name", "ash", url=url, stdin=True)
    sender.send("one")
    receiver.wait_for(r"ash: one$")

    broker_node.stop()
    sender.wait_for("lost the broker", stream="stderr")
    sender.send("into the outage")
    sender.wait_for(r"could not send 'into the outage': cannot connect to amqp://guest@127.0.0.1")

    broker_node.start()
    wait_until(lambda: receiver.count(READY) == 2, 60, "the receiver to listen again")
    sender.send("two")
    receiver.wait_for(r"ash: two$")
    sender.close_stdin()
    assert sender.wait() == 1, sender.output  # one line was not sent

    assert shown(receiver) == ["ash: one", "ash: two"]
    assert sender.count("into the outage") == 1
    assert sender.stderr_lines[-1].endswith("1 line(s) could not be sent")
    assert "Traceback" not in sender.output


SCRIPTS = ["pikachat/receive.py", "pikachat/send.py", "pikachat/chat.py"]


@pytest.mark.parametrize(
    ("url", "reason", "given"),
    [
        ("amqp://guest:s3cret-pw@127.0.0.1:{closed}/", "connection refused", "AMQP_URL"),
        ("amqp://guest:s3cret-pw@127.0.0.1:{closed}/", "connection refused", "RABBIT_HOST"),
        ("amqp://guest:s3cret-pw@127.0.0.1:5672/%2F", "login refused", "AMQP_URL"),
        ("amqp://guest:s3cret-pw@127.0.0.1:5672/%2F", "login refused", "RABBIT_HOST"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "access refused", "AMQP_URL"),
        ("http://guest:s3cret-pw@127.0.0.1:5672/", "must start with amqp://", "RABBIT_HOST"),
        ("amqp://guest:s3cret-pw@127.0.0.1:5672/?heartbeat=soon", "invalid broker URL", "AMQP_URL"),
    ],
)
def test_bad_broker_gives_one_line_and_exit_1(spawn: Spawn, url: str, reason: str, given: str) -> None:
    url = url.format(closed=free_port())
    password = re.search(r"guest:([^@]*)@", url).group(1)
    for script in SCRIPTS:
        if given == "AMQP_URL":
            proc = run_to_end(spawn, script, url=url, stdin=True)
        else:
            proc = run_to_end(spawn, script, url, url=None, stdin=True)
        assert_one_line_error(proc, reason, secret=f":{password}@")
        assert proc.stderr.startswith(script.split("/")[1].removesuffix(".py") + ": ")


def test_an_exchange_of_another_type_gives_one_line_and_exit_1(spawn: Spawn, amqp_url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().exchange_declare(EXCHANGE, exchange_type="direct")
    for script in SCRIPTS:
        proc = run_to_end(spawn, script, stdin=True)
        reason = "refused: (406, \"PRECONDITION_FAILED - inequivalent arg 'type'"
        assert_one_line_error(proc, reason, secret=":guest@")


def test_a_bad_rabbit_host_is_not_echoed(spawn: Spawn) -> None:
    for script in SCRIPTS:
        proc = run_to_end(spawn, script, "alice:s3cret-pw@rabbit", stdin=True)
        assert proc.popen.returncode == 1
        assert len(proc.stderr_lines) == 1, proc.stderr
        assert "invalid broker host" in proc.stderr
        assert "s3cret" not in proc.output


def test_rabbit_host_may_be_a_host_name_or_a_url(
    spawn: Spawn, broker_node: BrokerNode, amqp_url: str
) -> None:
    # AMQP_URL points nowhere: only the argument can make these work.
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    host = f"localhost:{broker_node.port}"
    by_name = spawn("pikachat/receive.py", host, url=nowhere)
    by_name.wait_for(READY + re.escape(f"amqp://guest@localhost:{broker_node.port}/%2F"))
    say(spawn, "by host name", args=(host,), url=nowhere)
    by_name.wait_for(r"ash: by host name$")

    by_url = spawn("pikachat/receive.py", amqp_url, url=nowhere)
    by_url.wait_for(READY)
    say(spawn, "by URL", args=(amqp_url,), url=nowhere)
    by_url.wait_for(r"ash: by URL$")

    assert shown(by_name) == ["ash: by host name"]
    assert shown(by_url) == ["ash: by URL"]


def test_an_idle_sender_keeps_its_connection(spawn: Spawn, amqp_url: str) -> None:
    url = amqp_url + "?heartbeat=1"
    receiver = listen(spawn, url=url)
    sender = spawn("pikachat/send.py", "--name", "ash", url=url, stdin=True)
    sender.send("one")
    receiver.wait_for(r"ash: one$")
    # The idle time is what is tested: the broker drops a connection silent
    # for two heartbeat intervals, unless the sender answers while it waits.
    time.sleep(4)
    sender.send("two")
    receiver.wait_for(r"ash: two$")
    sender.close_stdin()
    assert sender.wait() == 0, sender.output
    assert "lost the broker" not in sender.output


def test_a_long_line_is_cut(spawn: Spawn) -> None:
    receiver = listen(spawn)
    sender = say(spawn, "y" * 3000, name="ash")
    assert "line of 3000 characters cut to 2000" in sender.stderr
    receiver.wait_for(r"ash: y+$")
    assert shown(receiver) == ["ash: " + "y" * 2000]


def test_a_line_longer_than_the_input_buffer_is_still_one_message(spawn: Spawn) -> None:
    receiver = listen(spawn)
    sender = say(spawn, "z" * 200_000, "after", name="ash")
    receiver.wait_for(r"ash: after$")
    assert shown(receiver) == ["ash: " + "z" * 2000, "ash: after"]
    assert sender.count("cut to 2000") == 1, sender.stderr


BAD_NAME = "argument --name: a name is 1 to 32 letters, digits, '_', '.' or '-'"
BAD_ARGUMENTS = [
    (("pikachat/send.py", "--name", "ash ketchum"), BAD_NAME),
    (("pikachat/send.py", "--name", ""), BAD_NAME),
    (("pikachat/send.py", "--name", "a" * 33), BAD_NAME),
    (("pikachat/chat.py", "--name", "ash:"), BAD_NAME),
    (("pikachat/chat.py", "--name", "\x1b[31mash"), BAD_NAME),
    (("pikachat/send.py", "host-a", "host-b"), "unrecognized arguments: host-b"),
    (("pikachat/receive.py", "--name", "ash"), "unrecognized arguments: --name"),
]


def test_bad_arguments_exit_2(spawn: Spawn) -> None:
    for args, error in BAD_ARGUMENTS:
        proc = run_to_end(spawn, *args, stdin=True)
        assert proc.popen.returncode == 2, (args, proc.output)
        assert proc.stderr_lines[-1].endswith(f"error: {error}"), (args, proc.stderr)
        assert "Traceback" not in proc.output


def delete_exchange(url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        connection.channel().exchange_delete(EXCHANGE)


def test_an_exchange_deleted_mid_run_costs_one_line_and_the_sender_goes_on(
    spawn: Spawn, amqp_url: str
) -> None:
    sender = spawn("pikachat/send.py", "--name", "ash", stdin=True)
    sender.send("one")
    sender.wait_for(r"'one' reached no one")
    delete_exchange(amqp_url)
    sender.send("two")
    sender.wait_for(r"ERROR could not send 'two': the broker closed the channel: \(404, \"NOT_FOUND")
    receiver = listen(spawn)  # declares the exchange again
    sender.send("three")
    receiver.wait_for(r"ash: three$")
    sender.close_stdin()
    assert sender.wait() == 1, sender.output
    assert sender.stderr_lines[-1].endswith("1 line(s) could not be sent")
    assert sender.count("'two'") == 1
    assert "Traceback" not in sender.output
    assert shown(receiver) == ["ash: three"]


RESUBSCRIBED = (
    r"WARNING our binding was deleted \(NOT_FOUND - no exchange 'pikachat' in vhost .*\); subscribing again$"
)


def say_until_heard(spawn: Spawn, *listeners: Proc, timeout: float = 20) -> list[int]:
    """Say "after 1", "after 2"... with say_one.py until every listener shows one; return the numbers said."""
    said: list[int] = []

    def heard() -> bool:
        said.append(len(said) + 1)
        sayer = run_to_end(spawn, "pikachat/say_one.py", f"after {said[-1]}")
        assert sayer.popen.returncode == 0, sayer.output
        return any(all(p.count(rf"say_one: after {n}$") for p in listeners) for n in said)

    wait_until(heard, timeout, "every listener to hear a line said after the exchange was deleted")
    for listener in listeners:
        listener.wait_for(rf"say_one: after {said[-1]}$", stream="stdout")
    return said


def heard_from_then_on(proc: Proc, said: list[int], before: tuple[str, ...] = ()) -> None:
    """After the lines ``before``: once the listener hears again, every line said after, once and in order."""
    lines = shown(proc)
    assert tuple(lines[: len(before)]) == before and len(lines) > len(before), proc.output
    first = int(lines[len(before)].rpartition(" ")[2])
    assert lines[len(before) :] == [f"say_one: after {n}" for n in said if n >= first], proc.output


@pytest.mark.parametrize("script", ["pikachat/receive.py", "pikachat/chat.py"])
def test_a_listener_whose_exchange_is_deleted_says_so_and_subscribes_again(
    spawn: Spawn, amqp_url: str, script: str
) -> None:
    listener = chat(spawn, "misty") if script.endswith("chat.py") else listen(spawn)
    delete_exchange(amqp_url)
    # Nobody declares it again: the listener finds it gone, says so, and declares and binds anew.
    listener.wait_for(RESUBSCRIBED, timeout=10, stream="stderr")
    wait_until(lambda: listener.count(READY) == 2, 10, "the listener to listen again")
    assert say_until_heard(spawn, listener) == [1], "listening again, it hears the first line said"
    assert shown(listener) == ["say_one: after 1"]
    assert listener.count("WARNING") == 1, listener.stderr
    assert "Traceback" not in listener.output


def test_a_receiver_whose_queue_is_deleted_subscribes_again(spawn: Spawn, vhost: str) -> None:
    receiver = listen(spawn)
    queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name").split()
    assert len(queues) == 1 and queues[0].startswith("amq.gen-"), queues
    rabbitmqctl("delete_queue", "-p", vhost, queues[0])  # exclusive: no other connection may delete it
    receiver.wait_for(r"WARNING the broker cancelled our subscription \(queue deleted\?\); listening again$")
    wait_until(lambda: receiver.count(READY) == 2, 10, "the receiver to listen again")
    assert say_until_heard(spawn, receiver) == [1]
    assert receiver.count("WARNING") == 1, receiver.stderr
    assert "Traceback" not in receiver.output


def test_a_listener_hears_again_when_the_exchange_is_deleted_and_declared_again_at_once(
    spawn: Spawn, amqp_url: str
) -> None:
    receiver = listen(spawn)
    misty = chat(spawn, "misty")
    receiver.wait_for(r"\* misty joined$")
    delete_exchange(amqp_url)
    # say_one.py declares the exchange again at once, without the listeners' bindings: each binds again
    # at its next check, and says so only if it found the exchange still gone.
    said = say_until_heard(spawn, receiver, misty)
    heard_from_then_on(receiver, said, before=("* misty joined",))
    heard_from_then_on(misty, said)
    for proc in (receiver, misty):
        assert proc.count(RESUBSCRIBED) <= 1, proc.stderr  # if it looked before say_one.py declared it
        assert "Traceback" not in proc.output


def blocked_sender(spawn: Spawn, script: str, url: str, *, receiver_stays: bool = True) -> Proc:
    """Start ``script`` as ash with an open stdin, and wait until a line of it is heard.

    ``receiver_stays=False``: the receiver that heard it is then stopped, so that no listener declares
    the exchange again (each checks its binding every 2 s) behind a test that deletes it.
    """
    receiver = listen(spawn, url=url)
    proc = spawn(script, "--name", "ash", url=url, stdin=True)
    proc.wait_for(r"(sending to exchange|joined) 'pikachat'", stream="stderr")
    proc.send("one")
    receiver.wait_for(r"ash: one$")
    if not receiver_stays:
        receiver.signal(signal.SIGTERM)
        assert receiver.wait() == 0, receiver.output
    return proc


BLOCKED = r"WARNING the broker is blocking publishers \(low on memory\): 'two' waits, for {} s at most$"


@pytest.mark.parametrize("script", ["pikachat/send.py", "pikachat/chat.py"])
def test_a_blocked_sender_says_so_at_once_and_gives_up_after_the_timeout(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, script: str
) -> None:
    proc = blocked_sender(spawn, script, broker_node.url(node_vhost) + "?blocked_connection_timeout=3")
    with memory_alarm(broker_node):
        asked = time.monotonic()
        proc.send("two")
        proc.wait_for(BLOCKED.format(3), timeout=2, stream="stderr")
        assert proc.wait(15) == 1, proc.output
        waited = time.monotonic() - asked
    gave_up = "ERROR gave up on 'two': the broker blocked it for 3 s"
    assert proc.stderr_lines[-1].endswith(gave_up), proc.stderr
    assert 3 <= waited < 10
    assert proc.count("blocking publishers") == 1
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("script", ["pikachat/send.py", "pikachat/chat.py"])
def test_a_second_ctrl_c_stops_a_blocked_sender_and_names_the_lost_line(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, script: str
) -> None:
    # The default timeout: only the second Ctrl-C can end it within the test.
    proc = blocked_sender(spawn, script, broker_node.url(node_vhost))
    with memory_alarm(broker_node):
        proc.send("two")
        proc.wait_for(BLOCKED.format(60), timeout=5, stream="stderr")
        proc.signal(signal.SIGINT)  # finish the line in hand: it is still blocked
        with pytest.raises(subprocess.TimeoutExpired):
            proc.popen.wait(1)
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 1, proc.output
    assert proc.stderr_lines[-2:] == [
        proc.stderr_lines[-2][:9] + "ERROR could not send 'two': stopped before the broker confirmed it",
        proc.stderr_lines[-1][:9] + "ERROR 1 line(s) could not be sent",
    ], proc.stderr
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("script", ["pikachat/send.py", "pikachat/chat.py"])
def test_two_ctrl_c_with_nothing_in_flight_end_with_0(spawn: Spawn, script: str) -> None:
    proc = spawn(script, "--name", "ash", stdin=True)
    proc.wait_for(r"(sending to exchange|joined) 'pikachat'", stream="stderr")
    proc.signal(signal.SIGINT)
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output
    assert "Traceback" not in proc.output


class Tmux:
    """A terminal of 100 x 20 characters on a tmux server of its own, running ``command``."""

    def __init__(self, socket: str, command: str) -> None:
        self._tmux = ["tmux", "-S", socket]
        self._run("new-session", "-d", "-x", "100", "-y", "20", command)

    def _run(self, *args: str) -> str:
        done = subprocess.run([*self._tmux, *args], check=True, capture_output=True, text=True, timeout=10)
        return done.stdout

    def type(self, text: str) -> None:
        self._run("send-keys", "-l", text)

    def key(self, name: str) -> None:
        self._run("send-keys", name)

    def rows(self) -> list[str]:
        """The screen's rows, without the empty ones at the bottom."""
        rows = self._run("capture-pane", "-p").rstrip("\n").split("\n")
        while rows and not rows[-1].strip():
            rows.pop()
        return rows

    def wait_for(self, condition: Callable[[list[str]], bool], what: str) -> list[str]:
        """Wait until the screen's rows satisfy ``condition``, and return them."""

        def check() -> list[str] | None:
            rows = self.rows()
            return rows if rows and condition(rows) else None

        return wait_until(check, 15, what)  # type: ignore[return-value]

    def kill(self) -> None:
        subprocess.run([*self._tmux, "kill-server"], check=False, capture_output=True, timeout=10)


@pytest.mark.skipif(
    shutil.which("tmux") is None and not os.environ.get("CI"),
    reason="tmux is not installed (apt-get install tmux)",
)
def test_in_a_terminal_a_line_that_arrives_goes_above_the_half_typed_one(
    spawn: Spawn, amqp_url: str, tmp_path
) -> None:
    receiver = listen(spawn)
    env = f"PYTHONPATH={shlex.quote(str(ROOT))} AMQP_URL={shlex.quote(amqp_url)}"
    chat_py = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'pikachat/chat.py'))}"
    tmux = Tmux(str(tmp_path / "tmux"), f"env {env} {chat_py} --name ash; echo EXIT=$?; sleep 60")
    try:
        tmux.wait_for(lambda rows: any("joined 'pikachat'" in row for row in rows), "chat.py to join")
        receiver.wait_for(r"\* ash joined$")
        tmux.type("hi brock, half-ty")
        tmux.wait_for(lambda rows: rows[-1].endswith("hi brock, half-ty"), "the half-typed line")

        say(spawn, "are you there?", name="brock")
        rows = tmux.wait_for(lambda rows: any("brock: are you there?" in row for row in rows), "brock's line")
        assert CLOCK.match(rows[-2]) and rows[-2].endswith(" brock: are you there?"), rows
        assert rows[-1] == "> hi brock, half-ty", rows

        tmux.type("ped")
        tmux.key("Enter")
        receiver.wait_for(r"ash: hi brock, half-typed$")
        tmux.key("C-d")
        rows = tmux.wait_for(lambda rows: rows[-1] == "EXIT=0", "chat.py to leave with exit status 0")
        assert rows[-3:-1] == [rows[-3][:9] + "brock: are you there?", "> hi brock, half-typed"], rows
        receiver.wait_for(r"\* ash left$")
        assert shown(receiver) == [
            "* ash joined",
            "brock: are you there?",
            "ash: hi brock, half-typed",
            "* ash left",
        ]
    finally:
        tmux.kill()


def test_a_channel_closed_under_a_blocked_line_costs_one_line(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    url = broker_node.url(node_vhost)
    sender = blocked_sender(spawn, "pikachat/send.py", url, receiver_stays=False)
    with memory_alarm(broker_node):
        sender.send("two")
        sender.wait_for(BLOCKED.format(60), timeout=5, stream="stderr")
        delete_exchange(url)  # the broker reads "two" when the alarm ends, for an exchange now gone
    sender.wait_for(r"ERROR could not send 'two': the broker closed the channel: \(404, \"NOT_FOUND")
    receiver = listen(spawn, url=url)  # the first receiver's binding went with the exchange
    sender.send("three")
    receiver.wait_for(r"ash: three$")
    sender.close_stdin()
    assert sender.wait() == 1, sender.output
    assert sender.count("'two'") == 2  # blocked, then not sent
    assert sender.stderr_lines[-1].endswith("1 line(s) could not be sent")
    assert "Traceback" not in sender.output


# The lesson page's commands, run as written, and what it says you will see.

PAGE = (ROOT / "docs/pikachat.md").read_text()
RECEIVER_SEES = """\
10:41:00 INFO listening on exchange 'pikachat' at amqp://guest@localhost:5672/%2F
10:41:09 * misty joined
10:41:12 misty: hi all
10:41:15 brock: hi misty
10:41:20 ash: hello everyone
10:41:20 ash: bye
10:41:25 say_one: hello everyone
10:41:30 * misty left
"""
NOBODY_HEARS = (
    "10:40:58 INFO sending to exchange 'pikachat' at amqp://guest@localhost:5672/%2F as ash;"
    " one message per line, Ctrl-D to end\n"
    "10:40:58 WARNING 'hello?' reached no one: nobody is listening\n"
)


def masked(lines: list[str]) -> list[str]:
    """Lines with the clock and the broker's address masked: they differ from run to run."""
    lines = [CLOCK.sub(r"HH:MM:SS \2", line) for line in lines]
    return [re.sub(r" at amqp://\S+", " at URL", line) for line in lines]


@pytest.fixture
def shell(amqp_url: str) -> Iterator[Callable[..., Proc]]:
    """Run a command line as a page shows it, with the venv's python first on PATH; killed at the end."""
    started: list[Proc] = []
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "AMQP_URL": amqp_url,
    }

    def run(command: str, stdin: bool = False) -> Proc:
        proc = Proc(["bash", "-c", command], env, stdin)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.kill()


def test_the_lesson_runs_as_the_page_shows(shell: Callable[..., Proc]) -> None:
    assert RECEIVER_SEES in PAGE
    assert RECEIVER_SEES in (ROOT / "README.md").read_text()
    receiver = shell(doc_command("python pikachat/receive.py"))
    receiver.wait_for(READY, stream="stderr")
    misty = shell(doc_command("python pikachat/chat.py --name misty"), stdin=True)
    receiver.wait_for(r"\* misty joined$")
    misty.send("hi all")
    receiver.wait_for(r"misty: hi all$")
    brock = shell(doc_command("python pikachat/send.py --name brock"), stdin=True)
    brock.send("hi misty")
    receiver.wait_for(r"brock: hi misty$")
    brock.close_stdin()  # Ctrl-D
    assert brock.wait() == 0, brock.output
    ash = shell(doc_command(r"printf 'hello everyone\nbye\n' | python pikachat/send.py --name ash"))
    assert ash.wait() == 0, ash.output
    misty.wait_for(r"ash: bye$")
    once = shell(doc_command("python pikachat/say_one.py hello everyone"))
    assert once.wait() == 0, once.output
    assert once.stdout_lines == ["said 'hello everyone' to everyone listening (confirmed)"]
    misty.wait_for(r"say_one: hello everyone$")
    misty.close_stdin()
    assert misty.wait() == 0, misty.output
    receiver.wait_for(r"\* misty left$")
    receiver.signal(signal.SIGINT)
    assert receiver.wait() == 0, receiver.output

    expected = masked(RECEIVER_SEES.splitlines())
    assert masked(receiver.stderr_lines[:1]) == expected[:1]
    assert masked(receiver.stdout_lines) == expected[1:]
    # chat.py shows the same, less misty's own lines.
    others = [line for line in expected[1:] if not re.search(r"misty:|\* misty", line)]
    assert masked(misty.stdout_lines) == others


def test_the_page_names_the_scripts_that_take_rabbit_host(spawn: Spawn) -> None:
    page = " ".join(PAGE.split())
    scripts = r"((?:`pikachat/\w+\.py`(?:, | and )?)+)"
    takes = re.search(scripts + r" take the broker as an optional first argument, `RABBIT_HOST`", page)
    assert takes, "the page names the scripts that take RABBIT_HOST"
    named = set(re.findall(r"`pikachat/(\w+\.py)`", takes.group(1)))
    for script in ("receive.py", "send.py", "chat.py", "say_one.py"):
        usage = run_to_end(spawn, f"pikachat/{script}", "--help").stdout
        assert ("RABBIT_HOST" in usage) == (script in named), (script, usage)
    assert "`pikachat/say_one.py` takes no broker argument: every argument is the text to say" in page
    assert "AMQP_URL" in run_to_end(spawn, "pikachat/say_one.py", "--help").stdout


def test_a_line_nobody_hears_comes_back_as_the_page_shows(shell: Callable[..., Proc]) -> None:
    assert NOBODY_HEARS in PAGE
    sender = shell(doc_command(r"printf 'hello?\n' | python pikachat/send.py --name ash"))
    assert sender.wait() == 0, sender.output
    assert masked(sender.stderr_lines) == masked(NOBODY_HEARS.splitlines())
