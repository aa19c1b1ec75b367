"""Bad input on every command line: bad arguments exit 2, a bad broker exits 1 with one line.

One table over every script: arguments argparse must refuse (exit 2, its
usage and error), and brokers that cannot be used: nothing listening, an
unknown host, a refused login, an unknown virtual host, a malformed URL
(exit 1, one line on stderr naming the broker, no password, no traceback).
"""

from __future__ import annotations

import pytest

from tests.conftest import SHARED_BROKER, Spawn, free_port, run_to_end

SECRET = "s3cret-pw"
GOOD = f"{SHARED_BROKER}/%2F"

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
}

BAD_ARGUMENTS: list[tuple[str, tuple[str, ...], str]] = [
    ("pc/producer.py", ("--count", "0"), "--count must be at least 1"),
    ("pc/producer.py", ("--count", "many"), "invalid int value"),
    ("pc/producer.py", ("--nope",), "unrecognized arguments: --nope"),
    ("pc/consumer.py", ("--work", "-1"), "--work must not be negative"),
    ("pc/consumer.py", ("--work", "long"), "invalid float value"),
    ("pc/consumer.py", ("extra",), "unrecognized arguments: extra"),
    ("distop/callee.py", ("rabbit", "extra"), "unrecognized arguments: extra"),
    ("distop/callee.py", ("--nope",), "unrecognized arguments: --nope"),
    ("distop/client.py", ("--size", "0"), "must be at least 1"),
    ("distop/client.py", ("--chunks", "x"), "invalid positive value"),
    ("distop/client.py", ("--param", "esp"), "expected NAME=VALUE"),
    ("distop/client.py", ("--timeout", "-1"), "must be more than 0"),
    ("distop/client.py", ("--nope",), "unrecognized arguments: --nope"),
    ("distop/caller.py", ("rabbit", "extra"), "unrecognized arguments: extra"),
    ("distop/caller.py", ("--nope",), "unrecognized arguments: --nope"),
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
    ("unknown vhost", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "access refused", "127.0.0.1"),
    ("not amqp", f"http://guest:{SECRET}@127.0.0.1:5672/", "must start with amqp://", "127.0.0.1"),
    ("bad query", f"amqp://guest:{SECRET}@127.0.0.1:5672/?heartbeat=soon", "invalid broker URL", "127.0.0.1"),
    # No address to name: the URL does not parse.
    ("bad port", f"amqp://guest:{SECRET}@127.0.0.1:99999/", "invalid broker URL", ""),
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
