"""The distop lesson (docs/distop.md and the README's distop section) runs as shown.

Each command is run as the page writes it, by bash with the venv's python first on PATH and AMQP_URL set
to the test's virtual host; what the page says you will see (its ```text block marked
``<!-- output: NAME -->``) is compared with what the command printed, times, job ids and the broker's
address masked. The FooOp example's ```python blocks (marked ``<!-- run: FILE -->``) are saved under
their names and run as the page says.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc
from tests.docs import doc_command, pages

Shell = Callable[..., Proc]


def marked_blocks(kind: str, name: str) -> list[str]:
    """The bodies of the fenced blocks marked ``<!-- KIND: NAME -->`` just above, on every page."""
    pattern = re.compile(rf"<!--\s*{kind}:\s*{re.escape(name)}\s*-->\s*\n```\w*\n(.*?)^```", re.M | re.S)
    blocks = [body for page in pages() for body in pattern.findall(page.read_text())]
    if not blocks:
        pytest.fail(f"no page has a block marked <!-- {kind}: {name} -->")
    return blocks


def masked(line: str) -> str:
    """``line`` with what changes from run to run (times, ids, durations, the broker's URL) masked."""
    line = re.sub(r"\b\d\d:\d\d:\d\d\b", "HH:MM:SS", line)
    line = re.sub(r"\b[0-9a-f]{8}(?:[0-9a-f]{24}\b|\.\.\.)", "JOB", line)
    line = re.sub(r"\b\d+\.\d+ s\b", "N s", line)
    line = re.sub(r"amqps?://[^\s;,]+", "URL", line)
    return " ".join(line.split())


def assert_shows(name: str, lines: list[str], in_order: bool = True) -> None:
    """Every line of each ``<!-- output: NAME -->`` block is among ``lines`` (in order), masked alike."""
    printed = [masked(line) for line in lines]
    for block in marked_blocks("output", name):
        at = 0
        for shown in filter(None, (masked(line) for line in block.splitlines())):
            try:
                at = printed.index(shown, at if in_order else 0) + 1
            except ValueError:
                pytest.fail(f"the page shows {shown!r} from {name}; it printed:\n" + "\n".join(lines))


@pytest.fixture
def shell(amqp_url: str) -> Iterator[Shell]:
    """Run a command as a reader would type it: ``shell("python distop/callee.py", cwd=...)``."""
    started: list[Proc] = []
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def _shell(command: str, cwd: Path = ROOT) -> Proc:
        env = {
            **os.environ,
            "PATH": path,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "AMQP_URL": amqp_url,
        }
        # exec: the process the test holds (and kills) is the command itself, not a shell around it.
        proc = Proc(["bash", "-c", f"cd {cwd} && exec {command}"], env, stdin=False)
        started.append(proc)
        return proc

    yield _shell
    for proc in started:
        proc.kill()


def test_the_run_commands_show_what_the_page_says(shell: Shell) -> None:
    servers = [shell(doc_command("python distop/callee.py")) for _ in range(2)]
    for server in servers:
        server.wait_for("serving")

    client = shell(doc_command("python distop/client.py --op pow --param esp=2 --size 12 --chunks 3"))
    assert client.wait(30) == 0, client.output
    assert client.stderr_lines == []  # no terminal: no progress bar
    assert_shows("distop/client.py", client.stdout_lines)

    caller = shell(doc_command("python distop/caller.py"))
    assert caller.wait(30) == 0, caller.output
    assert_shows("distop/caller.py", caller.stdout_lines)

    for server in servers:
        server.signal(signal.SIGINT)  # Ctrl-C
        assert server.wait() == 0, server.output
    # Each server's log is its own; the page's lines are in one or the other.
    assert_shows("distop/callee.py", [line for s in servers for line in s.stderr_lines], in_order=False)


def test_the_foo_example_runs_as_written(shell: Shell, tmp_path: Path) -> None:
    for name in ("foo_op.py", "foo_executor.py"):
        (block,) = marked_blocks("run", name)
        (tmp_path / name).write_text(block)

    server = shell(doc_command("python foo_executor.py"), cwd=tmp_path)
    server.wait_for("serving foo on 'foo.chunks'")
    client = shell(doc_command("python foo_op.py"), cwd=tmp_path)
    assert client.wait(30) == 0, client.output
    assert_shows("foo_op.py", client.stdout_lines)
    assert client.stdout_lines == [str([x * 10 for x in range(10)])]
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.output
    assert "Traceback" not in server.output
