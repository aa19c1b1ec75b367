"""Bad input on every command line: bad arguments exit 2, a bad broker exits 1 with one line.

One table over every script: arguments argparse must refuse (exit 2, its
usage and error), and brokers that cannot be used: nothing listening, an
unknown host, a refused login, an unknown virtual host, a malformed URL
(exit 1, one line on stderr naming the broker, no password, no traceback).
A second table gives every script passwords that are easy to leak: with
"/", "#", "@" in them, percent-encoded, beside an IPv6 address, a bad port
or a malformed ``ssl_options``; no piece of the password may be shown.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import SHARED_BROKER, Spawn, free_port, run_to_end

SECRET = "s3cret-pw"
GOOD = f"{SHARED_BROKER}/%2F"

# Every script that connects, with the arguments that make it connect at once.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "pc/producer.py": (),
    "pc/consumer.py": (),
    "pc/send_one.py": (),
    "pc/consume_one.py": (),
    "distop/callee.py": (),
    "distop/client.py": ("--timeout", "5"),
    "distop/caller.py": (),
    "distop/call_one.py": ("plusone", "1"),
    "distop/call_many.py": ("plusone", "1", "2"),
    "distop/serve_one.py": (),
    "pikachat/receive.py": (),
    "pikachat/send.py": (),
    "pikachat/chat.py": (),
    "pikachat/say_one.py": (),
}

BAD_ARGUMENTS: list[tuple[str, tuple[str, ...], str]] = [
    ("pc/producer.py", ("--count", "0"), "--count must be 1 to 1,000,000"),
    ("pc/producer.py", ("--count", "99999999999999999999"), "--count must be 1 to 1,000,000"),
    ("pc/producer.py", ("--count", "many"), "invalid int value"),
    ("pc/producer.py", ("--nope",), "unrecognized arguments: --nope"),
    ("pc/consumer.py", ("--work", "-1"), "--work must be a number of seconds, 0 or more"),
    ("pc/consumer.py", ("--work", "nan"), "--work must be a number of seconds, 0 or more"),
    ("pc/consumer.py", ("--fail-on", "caf\udcff"), "--fail-on: the text is not UTF-8"),
    ("pc/consumer.py", ("--work", "long"), "invalid float value"),
    ("pc/consumer.py", ("extra",), "unrecognized arguments: extra"),
    ("distop/callee.py", ("rabbit", "extra"), "unrecognized arguments: extra"),
    ("distop/callee.py", ("--nope",), "unrecognized arguments: --nope"),
    ("distop/client.py", ("--size", "0"), "must be at least 1"),
    ("distop/client.py", ("--chunks", "x"), "invalid positive value"),
    ("distop/client.py", ("--param", "esp"), "expected NAME=VALUE"),
    ("distop/client.py", ("--timeout", "-1"), "must be more than 0"),
    ("distop/client.py", ("--nope",), "unrecognized arguments: --nope"),
    ("distop/client.py", ("--timeout", "inf"), "must be a finite number"),
    ("distop/client.py", ("--timeout", "nan"), "must be a finite number"),
    ("distop/client.py", ("--op=",), "argument --op: must not be empty"),
    (
        "distop/client.py",
        ("--op", "caf\udcff"),
        "argument --op: not UTF-8",
    ),  # the byte 0xff, as Python holds it
    ("distop/client.py", ("--param", "esp=NaN"), "JSON cannot carry NaN or infinity"),
    ("distop/client.py", ("--param", "esp=1e999"), "JSON cannot carry NaN or infinity"),
    ("distop/client.py", ("--param", "esp=caf\udcff"), "not UTF-8"),
    ("distop/client.py", ("--size", "1000000000000"), "must be at most 1,000,000"),
    ("distop/caller.py", ("rabbit", "extra"), "unrecognized arguments: extra"),
    ("distop/caller.py", ("--nope",), "unrecognized arguments: --nope"),
    ("distop/call_one.py", ("plusone", "x"), "invalid number value: 'x'"),
    (
        "distop/call_many.py",
        ("plusone", "1", "--chunks", "0"),
        "argument --chunks: must be at least 1, got 0",
    ),
    ("distop/serve_one.py", ("extra",), "unrecognized arguments: extra"),
    ("pikachat/receive.py", ("--name", "ash"), "unrecognized arguments: --name"),
    ("pikachat/receive.py", ("rabbit", "extra"), "unrecognized arguments: extra"),
    ("pikachat/send.py", ("--name", "ash ketchum"), "a name is 1 to 32 letters"),
    ("pikachat/send.py", ("--name",), "expected one argument"),
    ("pikachat/send.py", ("rabbit", "extra"), "unrecognized arguments: extra"),
    ("pikachat/chat.py", ("--name", "a" * 33), "a name is 1 to 32 letters"),
    ("pikachat/chat.py", ("--nope",), "unrecognized arguments: --nope"),
]

# (case, URL, what the line must say, the address it must name)
BAD_BROKERS: list[tuple[str, str, str, str]] = [
    (
        "nothing listening",
        f"amqp://guest:{SECRET}@127.0.0.1:{{closed}}/%2F",
        "connection refused",
        "127.0.0.1",
    ),
    ("unknown host", f"amqp://guest:{SECRET}@no-such-host.invalid:5672/%2F", "unknown host", "no-such-host"),
    ("wrong password", f"amqp://guest:{SECRET}@127.0.0.1:5672/%2F", "login refused", "127.0.0.1"),
    (
        "unknown vhost",
        "amqp://guest:guest@127.0.0.1:5672/no-such-vhost",
        "access refused: NOT_ALLOWED - vhost no-such-vhost not found",
        "127.0.0.1",
    ),
    ("not amqp", f"http://guest:{SECRET}@127.0.0.1:5672/", "must start with amqp://", "127.0.0.1"),
    ("bad query", f"amqp://guest:{SECRET}@127.0.0.1:5672/?heartbeat=soon", "invalid broker URL", "127.0.0.1"),
    ("bad port", f"amqp://guest:{SECRET}@127.0.0.1:99999/", "invalid broker URL", "127.0.0.1:99999"),
    ("bracket in password", f"amqp://guest:{SECRET}]@127.0.0.1:5672/%2F", "write '[' and ']'", "127.0.0.1"),
]

CASES = [
    pytest.param(script, args, GOOD, 2, error, id=f"{script}-{' '.join(args)}")
    for script, args, error in BAD_ARGUMENTS
] + [
    pytest.param(script, args, url, 1, (reason, address), id=f"{script}-{case}")
    for script, args in SCRIPTS.items()
    for case, url, reason, address in BAD_BROKERS
]


@pytest.fixture
def amqp_url() -> str:
    """No test here needs a virtual host of its own: each names its URL."""
    return GOOD


@pytest.mark.parametrize(("script", "args", "url", "code", "expected"), CASES)
def test_bad_input(
    spawn: Spawn, *, script: str, args: tuple[str, ...], url: str, code: int, expected: str | tuple[str, str]
) -> None:
    proc = run_to_end(spawn, script, *args, url=url.format(closed=free_port()))

    assert proc.popen.returncode == code, proc.output
    assert "Traceback" not in proc.output
    assert proc.stdout == ""
    if code == 2:
        assert proc.stderr_lines[0].startswith("usage: "), proc.stderr
        assert "error: " in proc.stderr_lines[-1] and expected in proc.stderr_lines[-1], proc.stderr
    else:
        reason, address = expected
        assert len(proc.stderr_lines) == 1, proc.stderr
        assert reason in proc.stderr and address in proc.stderr
        assert SECRET not in proc.output and ":guest@" not in proc.output


# Message text from the command line, as the shell passed it: "\udcff" is how Python holds the byte 0xff,
# which is not UTF-8. Refused before anything connects: exit 2, one line, nothing published.
NOT_UTF8 = "caf\udcff"


@pytest.mark.parametrize(
    "command",
    [
        ("pc/producer.py", NOT_UTF8),
        ("pc/send_many.py", "3", NOT_UTF8),
        ("pc/send_one.py", NOT_UTF8),
        ("pikachat/say_one.py", NOT_UTF8),
    ],
    ids=lambda command: command[0],
)
def test_message_text_that_is_not_utf8_is_refused_in_one_line(spawn: Spawn, command: tuple[str, ...]) -> None:
    proc = run_to_end(spawn, *command, url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    assert proc.popen.returncode == 2, proc.output
    assert "Traceback" not in proc.output and proc.stdout == ""
    assert proc.stderr_lines[-1].endswith("the message text is not UTF-8"), proc.stderr
    assert len([line for line in proc.stderr_lines if not line.startswith("usage: ")]) == 1, proc.stderr


# (case, URL, the pieces of its password that must never be shown)
HARD_PASSWORDS: list[tuple[str, str, tuple[str, ...]]] = [
    ("slash", "amqp://alice:1234/5678@rabbit/", ("1234", "5678")),
    ("hash", "amqp://alice:99#x@rabbit/", ("99", "#x")),
    ("at", "amqp://alice:p@ss@127.0.0.1:{closed}/%2F", ("p@ss", ":p@")),
    ("percent-encoded", "amqp://alice:p%40ss%2Fw0rd@127.0.0.1:{closed}/%2F", ("p%40ss", "p@ss", "w0rd")),
    ("ipv6", "amqp://alice:s3cr3t@[::1]:{closed}/%2F", ("s3cr3t",)),
    ("bad port", "amqp://alice:pw55@127.0.0.1:99999/", ("pw55",)),
    ("ssl_options garbage", "amqps://alice:pw55@localhost/%2F?ssl_options=garbage", ("pw55",)),
    ("ssl_options unknown", "amqps://alice:pw55@localhost/%2F?ssl_options={'bad':1}", ("pw55",)),
    ("ssl_options unclosed", "amqps://alice:pw55@localhost/%2F?ssl_options={'bad':", ("pw55",)),
    ("ssl_options no file", "amqps://alice:pw55@localhost/%2F?ssl_options={'ca_certs':'/none'}", ("pw55",)),
    ("second address", "amqp://guest:guest@127.0.0.1:{closed}/%2F,amqp://bob:99/88@rabbit/", ("99", "88")),
    ("commas", "amqp://alice:Pw1,h2,Sec9@127.0.0.1:{closed}/%2F", ("Pw1", "Sec9")),
]
COMMANDS = {script: (script, *args) for script, args in SCRIPTS.items()}
COMMANDS.update(
    {f"{package}.broker": ("-m", f"{package}.broker") for package in ("pc", "pikachat", "distop")}
)


@pytest.mark.parametrize(
    ("command", "url", "pieces"),
    [
        pytest.param(command, url, pieces, id=f"{name}-{case}")
        for name, command in COMMANDS.items()
        for case, url, pieces in HARD_PASSWORDS
    ],
)
def test_no_piece_of_a_password_is_shown(
    spawn: Spawn, command: tuple[str, ...], url: str, pieces: tuple[str, ...]
) -> None:
    proc = run_to_end(spawn, *command, url=url.replace("{closed}", str(free_port())), stdin=True)

    assert proc.popen.returncode == 1, proc.output
    assert "Traceback" not in proc.output
    assert len(proc.stderr_lines) == 1, proc.stderr
    assert re.search(r"amqps?://\w+@", proc.stderr), proc.stderr  # the broker is named
    for piece in pieces:
        assert piece not in proc.output
