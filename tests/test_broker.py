"""The connection helper: one text in every folder, several broker addresses, no password shown."""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import signal
import time
import urllib.parse
from pathlib import Path

import pika
import pytest

from distop.protocol import DEAD_LETTER_EXCHANGE, WORK_QUEUE_ARGUMENTS
from pc import broker
from pc.workqueue import DEAD_LETTER_QUEUE_ARGUMENTS, QUEUE, QUEUE_ARGUMENTS
from tests.conftest import (
    ROOT,
    SHARED_BROKER,
    BrokerNode,
    Spawn,
    free_port,
    queue_depth,
    rabbitmqctl,
    run_to_end,
    wait_until,
)
from tests.faults.conftest import blocked_connections, memory_alarm

PACKAGES = ["pc", "pikachat", "distop"]


def test_the_three_helpers_are_one_text() -> None:
    texts = {package: (ROOT / package / "broker.py").read_text() for package in PACKAGES}
    for package, text in texts.items():
        if text != texts["pc"]:
            diff = difflib.unified_diff(
                texts["pc"].splitlines(),
                text.splitlines(),
                "pc/broker.py",
                f"{package}/broker.py",
                lineterm="",
            )
            pytest.fail("the broker helpers differ; copy pc/broker.py over the others:\n" + "\n".join(diff))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("rabbit", ["amqp://guest:guest@rabbit/%2F"]),
        (
            "rabbit1,rabbit2:5673,[::1]:5674",
            [
                "amqp://guest:guest@rabbit1/%2F",
                "amqp://guest:guest@rabbit2:5673/%2F",
                "amqp://guest:guest@[::1]:5674/%2F",
            ],
        ),
        (
            "amqp://u:p@h1:5672/v?heartbeat=5,h2:5673",
            ["amqp://u:p@h1:5672/v?heartbeat=5", "amqp://u:p@h2:5673/v?heartbeat=5"],
        ),
        ("amqp://u:p@h1/%2F,amqps://w:q@h2/x", ["amqp://u:p@h1/%2F", "amqps://w:q@h2/x"]),
        ("rabbit1,amqps://u:p@h2/v", ["amqp://guest:guest@rabbit1/%2F", "amqps://u:p@h2/v"]),
        # A comma inside ssl_options or a password does not start another address.
        ("amqps://u:p@h/%2F?ssl_options={'a':1,'b':2}", ["amqps://u:p@h/%2F?ssl_options={'a':1,'b':2}"]),
        ("amqp://u:a,b@h/%2F", ["amqp://u:a,b@h/%2F"]),
        # A bare host takes the first URL's settings, even after another URL.
        (
            "amqp://a@h1/v1,h2,amqp://b@h3/v3,h4",
            ["amqp://a@h1/v1", "amqp://a@h2/v1", "amqp://b@h3/v3", "amqp://a@h4/v1"],
        ),
        (" amqp://u:p@h1/v,h2\n", ["amqp://u:p@h1/v", "amqp://u:p@h2/v"]),  # spaces around it: dropped
    ],
)
def test_addresses(given: str, expected: list[str]) -> None:
    assert broker.addresses(broker.resolve(given)) == expected


def dead_address() -> str:
    """host:port where nothing listens."""
    return f"127.0.0.1:{free_port()}"


def live_address(amqp_url: str) -> str:
    """host:port of the broker behind ``amqp_url``."""
    return urllib.parse.urlsplit(amqp_url).netloc.rpartition("@")[2]


def live_node(amqp_url: str) -> str:
    """``amqp_url`` as the scripts' log lines name the node they are on: no password."""
    parts = urllib.parse.urlsplit(amqp_url)
    return f"amqp://guest@{live_address(amqp_url)}{parts.path}"


# Every script that connects, with the arguments that make it connect at once.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "pc/producer.py": (),
    "pc/consumer.py": (),
    "distop/callee.py": (),
    "distop/client.py": ("--timeout", "5"),
    "distop/caller.py": (),
    "pikachat/receive.py": (),
    "pikachat/send.py": (),
    "pikachat/chat.py": (),
    "pc/send_one.py": (),
    "pc/send_many.py": ("1",),
    "pikachat/say_one.py": (),
    "distop/call_one.py": ("plusone", "1"),
    "distop/call_many.py": ("plusone", "1"),
    **{f"-m {package}.broker": () for package in PACKAGES},
}
# The scripts that take the broker as their argument.
TAKE_HOST = [
    "distop/callee.py",
    "distop/caller.py",
    "pikachat/receive.py",
    "pikachat/send.py",
    "pikachat/chat.py",
]
TAKE_HOST += [f"-m {package}.broker" for package in PACKAGES]


def script_args(script: str) -> list[str]:
    """The arguments that run ``script``, a key of SCRIPTS."""
    return [*script.split(), *SCRIPTS[script]]


@pytest.mark.parametrize(
    ("script", "given"),
    [(script, "AMQP_URL") for script in SCRIPTS] + [(script, "argument") for script in TAKE_HOST],
)
def test_two_dead_addresses_give_one_line_naming_both(spawn: Spawn, script: str, given: str) -> None:
    first, second = dead_address(), dead_address()
    if given == "AMQP_URL":
        proc = run_to_end(
            spawn, *script_args(script), url=f"amqp://guest:s3cret@{first}/%2F,{second}", stdin=True
        )
    else:
        proc = run_to_end(spawn, *script_args(script), f"{first},{second}", url=None, stdin=True)
    assert proc.popen.returncode == 1, proc.output
    assert len(proc.stderr_lines) == 1, proc.stderr
    assert "Traceback" not in proc.output and "s3cret" not in proc.output
    line = proc.stderr_lines[0]
    assert f"{first}/%2F: connection refused; " in line and f"{second}/%2F: connection refused; " in line


def test_pc_skips_a_dead_address(spawn: Spawn, amqp_url: str) -> None:
    vhost = urllib.parse.urlsplit(amqp_url).path
    dead = f"amqp://guest:guest@{dead_address()}{vhost}"
    producer = run_to_end(spawn, "pc/producer.py", "over", "there", url=f"{dead},{amqp_url}")
    assert producer.popen.returncode == 0, producer.output
    # A bare host:port takes the credentials and virtual host of the first URL.
    consumer = spawn("pc/consumer.py", url=f"{dead},{live_address(amqp_url)}")
    consumer.wait_for(r"received 'over there'")
    # Its log names the node it is on, not every address it was given.
    (ready,) = [line for line in consumer.stderr_lines if "waiting for messages" in line]
    assert ready.endswith(f"waiting for messages on 'pc' at {live_node(amqp_url)}; Ctrl-C to stop"), ready


def test_send_many_skips_a_dead_address(spawn: Spawn, amqp_url: str) -> None:
    vhost = urllib.parse.urlsplit(amqp_url).path
    dead = f"amqp://guest:guest@{dead_address()}{vhost}"
    sender = run_to_end(spawn, "pc/send_many.py", "5", "y", url=f"{dead},{live_address(amqp_url)}")
    assert sender.popen.returncode == 0, sender.output
    assert sender.stdout_lines == ["sent 5 messages to 'pc', all confirmed"]


@pytest.mark.parametrize("package", PACKAGES)
def test_an_amqp_url_with_spaces_around_it_is_used(spawn: Spawn, amqp_url: str, package: str) -> None:
    proc = run_to_end(spawn, "-m", f"{package}.broker", url=f"  {amqp_url}\n")
    assert proc.popen.returncode == 0, proc.output


@pytest.mark.parametrize("url", ["amqp://guest:s3cret@h1/v,,h2", "amqp://guest:s3cret@h1/v,", ",h1"])
def test_an_empty_address_is_one_line(spawn: Spawn, url: str) -> None:
    proc = run_to_end(spawn, "pc/send_one.py", url=url)
    assert proc.popen.returncode == 1, proc.output
    assert proc.stderr_lines == ["send_one: invalid broker URL: an address between commas is empty"]


def test_distop_skips_a_dead_address(spawn: Spawn, amqp_url: str) -> None:
    server = spawn("distop/callee.py", f"{dead_address()},{amqp_url}", url=None)
    server.wait_for(rf"serving .* on 'distop.chunks' at {re.escape(live_node(amqp_url))}; Ctrl-C to stop$")
    vhost = urllib.parse.urlsplit(amqp_url).path
    dead = f"amqp://guest:guest@{dead_address()}{vhost}"
    client = run_to_end(
        spawn, "distop/client.py", "--op", "pow", "--param", "esp=2", "--size", "5", url=f"{dead},{amqp_url}"
    )
    assert client.popen.returncode == 0, client.output
    assert json.loads(client.stdout) == [x**2 for x in range(5)]


def test_pikachat_skips_a_dead_address(spawn: Spawn, amqp_url: str) -> None:
    vhost = urllib.parse.urlsplit(amqp_url).path
    dead = f"amqp://guest:guest@{dead_address()}{vhost}"
    receiver = spawn("pikachat/receive.py", f"{dead},{live_address(amqp_url)}", url=None)
    node = re.escape(live_node(amqp_url))
    receiver.wait_for(rf"listening on exchange 'pikachat' at {node}$", stream="stderr")
    sender = spawn("pikachat/send.py", "--name", "ash", url=f"{dead},{amqp_url}", stdin=True)
    sender.wait_for(rf"sending to exchange 'pikachat' at {node} as ash;", stream="stderr")
    sender.send("through the second node")
    receiver.wait_for(r"ash: through the second node$")
    sender.close_stdin()
    assert sender.wait() == 0, sender.output


@pytest.mark.parametrize("package", PACKAGES)
def test_check_broker_skips_a_dead_address(spawn: Spawn, amqp_url: str, package: str) -> None:
    proc = run_to_end(
        spawn, "-m", f"{package}.broker", url=f"amqp://guest:guest@{dead_address()}/%2F,{amqp_url}"
    )
    assert proc.popen.returncode == 0, proc.output
    assert proc.stdout.startswith("broker answers at amqp://guest@127.0.0.1:")


@pytest.mark.parametrize("script", ["pc/consumer.py", "pikachat/receive.py", "distop/callee.py"])
def test_a_refused_connection_says_what_the_broker_said(
    spawn: Spawn, amqp_url: str, vhost: str, script: str
) -> None:
    rabbitmqctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
    proc = run_to_end(spawn, script, url=amqp_url)
    assert proc.popen.returncode == 1, proc.output
    assert len(proc.stderr_lines) == 1, proc.stderr
    assert proc.stderr_lines[0].endswith(
        f"access refused: NOT_ALLOWED - access to vhost '{vhost}' refused for user 'guest': "
        "connection limit (0) is reached"
    ), proc.stderr


def test_a_producer_that_loses_its_node_goes_on_with_the_next(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str
) -> None:
    # Two separate brokers stand in for two nodes: the same virtual host on each.
    rabbitmqctl("add_vhost", node_vhost)
    try:
        rabbitmqctl("set_permissions", "-p", node_vhost, "guest", ".*", ".*", ".*")
        # On a cluster the queue is on every node: declare it on the second too.
        with pika.BlockingConnection(pika.URLParameters(f"{SHARED_BROKER}/{node_vhost}")) as connection:
            connection.channel().queue_declare(QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
        url = f"{broker_node.url(node_vhost)},{live_address(SHARED_BROKER + '/')}"
        with memory_alarm(broker_node):  # the first node takes nothing, so it is lost mid-run
            producer = spawn("pc/producer.py", "--count", "100", "x", url=url)
            producer.wait_for("the broker has blocked this connection")
            broker_node.kill()
        assert producer.wait(60) == 0, producer.output
        assert "Traceback" not in producer.output
        # All of them went to the next node (the broker counts a queue's messages every few seconds).
        wait_until(lambda: queue_depth(node_vhost, QUEUE) == 100, 30, "100 messages on the next node")
    finally:
        rabbitmqctl("delete_vhost", node_vhost)


# What the short publishers that count add to a line saying why they gave up.
COUNTED = {"send_many": " (0 of 5 confirmed)", "call_many": " (0 of 1 chunks answered)"}
# The short publishers, with the arguments that make each publish at once.
SHORT_PUBLISHERS: dict[str, tuple[str, ...]] = {
    "pc/send_one.py": ("held",),
    "pc/send_many.py": ("5", "held"),
    "pikachat/say_one.py": ("held",),
    "distop/call_one.py": ("plusone", "1"),
    "distop/call_many.py": ("plusone", "1"),
}


@pytest.mark.parametrize("script", SHORT_PUBLISHERS)
def test_a_blocked_short_publisher_gives_up_in_one_line(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, script: str
) -> None:
    url = broker_node.url(node_vhost) + "?blocked_connection_timeout=2"
    with memory_alarm(broker_node):
        started = time.monotonic()
        proc = spawn(script, *SHORT_PUBLISHERS[script], url=url)
        assert proc.wait(30) == 1, proc.output
        assert time.monotonic() - started >= 2
    name = Path(script).stem
    line = f"{name}: the broker blocked the connection (memory or disk alarm); gave up"
    assert proc.stderr_lines == [line + COUNTED.get(name, "")]


def test_blocked_for_applies_where_the_url_sets_no_timeout() -> None:
    first, second = broker.parameters("amqp://h1/v?blocked_connection_timeout=2,h2", blocked_for=60)
    assert (first.blocked_connection_timeout, second.blocked_connection_timeout) == (2, 2)
    assert broker.parameters("amqp://h1/v", blocked_for=60)[0].blocked_connection_timeout == 60
    assert broker.parameters("amqp://h1/v")[0].blocked_connection_timeout is None  # consumers, servers


@pytest.mark.parametrize("script", SHORT_PUBLISHERS)
def test_ctrl_c_ends_a_blocked_short_publisher_at_once(
    spawn: Spawn, broker_node: BrokerNode, node_vhost: str, script: str
) -> None:
    with memory_alarm(broker_node):
        proc = spawn(script, *SHORT_PUBLISHERS[script], url=broker_node.url(node_vhost))  # blocked for 60 s
        wait_until(lambda: blocked_connections(broker_node, node_vhost) == 1, 30, f"{script} blocked")
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 1, proc.output
    name = Path(script).stem
    confirmed = " (0 of 5 confirmed)" if name == "send_many" else ""  # call_many: no count when interrupted
    assert proc.stderr_lines == [f"{name}: interrupted{confirmed}"]


# What each short publisher publishes to, and the line it says when the broker refuses (nacks) it.
REFUSED: dict[str, tuple[str, str]] = {
    "pc/send_one.py": ("pc", "send_one: the broker refused the message (a nack)"),
    "pc/send_many.py": ("pc", "send_many: the broker refused 1 message(s) (0 of 5 confirmed)"),
    "pikachat/say_one.py": ("chat.full", "say_one: the broker refused the line (a nack)"),
    "distop/call_one.py": ("distop.chunks", "call_one: the broker refused the chunk (a nack)"),
    "distop/call_many.py": (
        "distop.chunks",
        "call_many: the broker refused a chunk (a nack) (0 of 1 chunks answered)",
    ),
}


@pytest.mark.parametrize("script", SHORT_PUBLISHERS)
def test_a_short_publisher_refused_by_the_broker_says_so_in_one_line(
    spawn: Spawn, amqp_url: str, vhost: str, script: str
) -> None:
    queue, line = REFUSED[script]
    # Full at one message, and says so with a nack (overflow reject-publish). A quorum queue enforces its
    # length between publishes: the first two overfill it, and from then on it refuses each one.
    policy = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "full", f"^{queue}$", policy)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        if queue == "chat.full":  # a listener whose queue is full: the fanout exchange cannot deliver to it
            channel.exchange_declare("pikachat", exchange_type="fanout", durable=True)
            channel.queue_declare(queue)
            channel.queue_bind(queue, "pikachat")
        else:  # the queue as the script declares it
            if queue == "pc":
                channel.queue_declare("pc.dead", durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS)
            else:
                channel.exchange_declare(DEAD_LETTER_EXCHANGE, "headers", durable=True)
            arguments = QUEUE_ARGUMENTS if queue == "pc" else WORK_QUEUE_ARGUMENTS
            channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.confirm_delivery()
        for body in (b"fill 1", b"fill 2"):
            with contextlib.suppress(pika.exceptions.NackError):
                channel.basic_publish("", queue, body)
    wait_until(lambda: queue_depth(vhost, queue) >= 1, 10, f"a full {queue}")
    proc = run_to_end(spawn, script, *SHORT_PUBLISHERS[script])
    assert proc.popen.returncode == 1, proc.output
    assert proc.stderr_lines == [line]
