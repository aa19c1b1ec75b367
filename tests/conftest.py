"""Fixtures shared by the test suite: real brokers, real processes.

- ``amqp_url``: a fresh virtual host on the shared broker (127.0.0.1:5672),
  deleted afterwards, so scripts with fixed queue names never meet another
  test's messages.
- ``spawn``: runs a repository script as a process with ``AMQP_URL`` set and
  collects its output; every process it started is killed at teardown.
- ``broker_node``: a private RabbitMQ node (own name, ports and data) that a
  test may stop, restart or kill without touching the shared broker.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_BROKER = os.environ.get("PYCLASS_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672")
# How to run rabbitmqctl for the shared broker, e.g. "docker exec CONTAINER rabbitmqctl" in CI.
SHARED_RABBITMQCTL = shlex.split(os.environ.get("PYCLASS_RABBITMQCTL", "rabbitmqctl"))
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def rabbitmqctl(*args: str, node: BrokerNode | None = None, timeout: float = 60) -> str:
    """Run rabbitmqctl against the shared broker, or against ``node``; RuntimeError if it fails or hangs."""
    if node is None:
        command = [*SHARED_RABBITMQCTL, *args]
        env = None
    else:
        command = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args]
        env = node.env
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(command)} took more than {timeout} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def make_vhost(node: BrokerNode | None = None) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name, node=node)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*", node=node)
    return name


def queue_depth(vhost: str, queue: str, node: BrokerNode | None = None) -> int | None:
    """Messages in ``queue`` (ready + unacked), or None if it does not exist."""
    out = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages", node=node)
    for line in out.splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    return None


def messages_ready(url: str, queue: str) -> int | None:
    """Messages ready in ``queue`` (None if it does not exist), asked of the queue itself over AMQP.

    Unlike ``queue_depth``, exact at once for a quorum queue, whose figures in
    rabbitmqctl lag by up to 5 s. Messages delivered and not yet acked do not count.
    """
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        try:
            return connection.channel().queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise


def queue_is_empty(url: str, queue: str) -> bool:
    """Whether ``queue`` holds no message, as a basic.get that takes its turn after every earlier change.

    Ask it once the consumers have closed, so that what they had not acked is back.
    """
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        method, _props, _body = connection.channel().basic_get(queue)  # not acked: it stays
        return method is None


@pytest.fixture
def vhost() -> Iterator[str]:
    """A new virtual host on the shared broker, deleted after the test."""
    name = make_vhost()
    yield name
    rabbitmqctl("delete_vhost", name)


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return f"{SHARED_BROKER}/{vhost}"


class Proc:
    """A running script whose stdout and stderr are collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], stdin: bool) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout_lines), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr_lines), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def wait_for(self, pattern: str, timeout: float = 15, stream: str = "any") -> re.Match:
        """Wait until a line of output matches ``pattern``; fail if the process exits first."""
        regex = re.compile(pattern)

        def found() -> re.Match | None:
            lines = {"stdout": self.stdout_lines, "stderr": self.stderr_lines}.get(
                stream, self.stdout_lines + self.stderr_lines
            )
            for line in list(lines):
                if match := regex.search(line):
                    return match
            if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                pytest.fail(
                    f"{self.args[1:]} exited ({self.popen.returncode}) before printing "
                    f"{pattern!r}:\n{self.output}"
                )
            return None

        return wait_until(found, timeout, f"{pattern!r} from {self.args[1:]}")  # type: ignore[return-value]

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.stdout_lines + self.stderr_lines if regex.search(line))

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def close_stdin(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        """Wait for exit and for all output; return the exit status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"{self.args[1:]} did not exit within {timeout} s:\n{self.output}")
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


Spawn = Callable[..., Proc]


@pytest.fixture
def spawn(amqp_url: str) -> Iterator[Spawn]:
    """Start repository scripts as processes: ``spawn("pc/consumer.py", "-q")``.

    ``url`` overrides AMQP_URL (None removes it), ``stdin=True`` gives a pipe,
    ``env`` adds variables. Every process is killed when the test ends.
    """
    started: list[Proc] = []

    def _spawn(
        script: str,
        *args: str,
        url: str | None = amqp_url,
        stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> Proc:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("AMQP_URL", None)
        if url is not None:
            full_env["AMQP_URL"] = url
        proc = Proc([sys.executable, script, *args], full_env, stdin)
        started.append(proc)
        return proc

    yield _spawn
    for proc in started:
        proc.kill()


def run_to_end(spawn: Spawn, script: str, *args: str, timeout: float = 30, **kwargs) -> Proc:
    """Run a script to completion and return it (exit code in ``popen.returncode``)."""
    proc = spawn(script, *args, **kwargs)
    proc.wait(timeout)
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_port() -> int:
    """A free port for a private broker to listen on, below the kernel's range of ephemeral ports.

    A node stopped and started again must get its ports back. free_port()'s come from the ephemeral range,
    which the kernel also gives out as the local end of outgoing connections: while the node is down, any
    test's connection, on any pytest worker, may take its port, and the node cannot start again
    (``eaddrinuse``, seen under ``pytest -n 4``). Below that range only another listener can take it.
    """
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    lowest_ephemeral = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for _ in range(1000):
        port = random.randrange(20000, max(lowest_ephemeral, 20001))
        with socket.socket() as sock:
            try:
                sock.bind(("", port))  # every interface: the Erlang distribution port listens on them all
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range for a private broker")


class BrokerNode:
    """A private RabbitMQ node in a temporary folder, on ports of its own."""

    def __init__(self, base: Path, config: str = "") -> None:
        self.name = f"pyclass-{uuid.uuid4().hex[:8]}@localhost"
        self.port = node_port()
        self.base = base
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n{config}")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(node_port()),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
        }
        self.process: subprocess.Popen | None = None

    def url(self, vhost: str = "%2F", scheme: str = "amqp", port: int | None = None) -> str:
        return f"{scheme}://guest:guest@127.0.0.1:{port or self.port}/{vhost}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        log = open(self.base / "server.out", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        try:
            # The CLI itself takes seconds to start on a busy machine: give it time beyond its own timeout.
            rabbitmqctl("await_startup", "--timeout", "60", node=self, timeout=90)
        except RuntimeError:
            # The CLI may ask before the node has registered itself; ask again.
            wait_until(self._answers, 120, f"private broker {self.name} to start")

    def _answers(self) -> bool:
        if not self.running:
            pytest.fail(f"private broker exited:\n{(self.base / 'server.out').read_text()[-2000:]}")
        try:
            rabbitmqctl("await_startup", "--timeout", "5", node=self, timeout=30)
        except RuntimeError:
            return False
        return True

    def stop(self) -> None:
        """Stop the node gracefully (queues and messages on disk survive)."""
        if self.running:
            rabbitmqctl("stop", node=self)
            assert self.process is not None
            self.process.wait(60)

    def kill(self) -> None:
        """Kill the node's whole process group, as a crash would."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def broker_node() -> Iterator[BrokerNode]:
    """A private broker node for tests that stop or restart a broker."""
    with tempfile.TemporaryDirectory(prefix="pyclass-node-") as tmp:
        node = BrokerNode(Path(tmp))
        node.start()
        yield node
        node.kill()


@pytest.fixture
def node_vhost(broker_node: BrokerNode) -> Iterator[str]:
    """A fresh virtual host on the private node; the node is running at the end of the test."""
    name = make_vhost(broker_node)
    yield name
    if not broker_node.running:
        broker_node.start()
    rabbitmqctl("delete_vhost", name, node=broker_node)


def assert_one_line_error(proc: Proc, reason: str, secret: str, code: int = 1) -> None:
    """The process failed as users are promised: one line naming the broker, no secret, no traceback."""
    assert proc.popen.returncode == code, proc.output
    assert len(proc.stderr_lines) == 1, proc.stderr
    assert reason in proc.stderr
    assert "127.0.0.1" in proc.stderr
    assert secret not in proc.output


# A test may report figures (messages sent, delivered, lost...) with
# ``record_property("figures", line)``; they are printed at the end of the run.
# Under xdist the reports carry them from the workers to this process.
FIGURES: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        lines = [str(value) for name, value in report.user_properties if name == "figures"]
        if lines:
            FIGURES[report.nodeid] = lines


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for nodeid in sorted(FIGURES):
            for line in FIGURES[nodeid]:
                terminalreporter.write_line(line)
