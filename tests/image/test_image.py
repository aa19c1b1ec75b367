"""The distop server image, built and run the way the README says.

The image is built from the Dockerfile with the README's ``docker build``
line, then run as containers on the host's network against a test virtual
host on the shared broker; the client runs on the host. Docker is used where
an engine answers, else podman (with the flags this needs on machines without
a registry: the base image is a local stand-in, tests/image/base-image.sh).
With neither the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SHARED_BROKER, Spawn, queue_is_empty, wait_until
from tests.docs import doc_command

pytestmark = pytest.mark.timeout(600)

SERVERS = 3
CI = os.environ.get("CI") == "true"
# podman without a registry: chroot isolation (no nested namespaces here), the
# host's network for pip, and the base image from local storage when present.
PODMAN_BUILD_FLAGS = ["--isolation=chroot", "--network=host", "--pull=missing"]


def grace_period() -> float:
    """The server's ``stop_grace_period`` in docker-compose.yml, in seconds."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    text = compose["services"]["server"].get("stop_grace_period")
    assert text, "docker-compose.yml sets no stop_grace_period for the server"
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"cannot read {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass
class Engine:
    """The docker or podman command line."""

    name: str
    build_flags: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 60) -> str:
        command = [self.name, *args]
        try:
            done = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{shlex.join(command)} did not finish within {timeout} s")
        if done.returncode != 0:
            pytest.fail(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def logs(self, container: str) -> str:
        """What the container printed (the server logs to stderr)."""
        done = subprocess.run(
            [self.name, "logs", container], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout + done.stderr

    def state(self, container: str) -> dict:
        return json.loads(self("inspect", "--format", "{{json .State}}", container))


def answers(command: str) -> bool:
    try:
        done = subprocess.run([command, "info"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def engine() -> Engine:
    if answers("docker"):
        return Engine("docker")
    if answers("podman"):
        return Engine("podman", PODMAN_BUILD_FLAGS)
    reason = "no container engine: neither `docker info` nor `podman info` succeeds"
    if CI:
        pytest.fail(f"{reason} (required under CI)")
    pytest.skip(reason)


@dataclass
class Image:
    tag: str
    figures: str


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[Image]:
    """The image built by the README's command, under a tag of its own; removed afterwards."""
    build = shlex.split(doc_command("docker build -t distopsrv ."))
    assert build == ["docker", "build", "-t", "distopsrv", "."], build
    tag = f"distopsrv:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    engine("build", *engine.build_flags, "-t", tag, ".", timeout=480)
    built = time.monotonic() - started
    size = int(engine("image", "inspect", "--format", "{{.Size}}", tag))
    yield Image(tag, f"{engine.name}: image built in {built:.1f} s, {size / 1e6:.0f} MB")
    engine("rmi", "--force", tag, timeout=120)


@dataclass
class Fleet:
    """The containers a test runs from the image."""

    engine: Engine
    image: Image
    ids: list[str] = field(default_factory=list)

    def start(self, amqp_url: str, *extra: str, command: tuple[str, ...] = ()) -> list[float]:
        """Run SERVERS containers as the README does (``run -d -e AMQP_URL=... image``) and wait
        until each is serving; return the seconds each took from ``run`` to its "serving" line."""
        run = shlex.split(
            doc_command("docker run -d -e AMQP_URL=amqp://guest:guest@rabbit-host:5672/%2F distopsrv")
        )
        assert run[:3] == ["docker", "run", "-d"] and run[-1] == "distopsrv", run
        startup = []
        for _ in range(SERVERS):
            started = time.monotonic()
            # The host's network: the broker is on the host's 127.0.0.1.
            container = self.engine(
                "run", "-d", "--network=host", "-e", f"AMQP_URL={amqp_url}", *extra, self.image.tag, *command
            ).strip()
            self.ids.append(container)
            wait_until(lambda c=container: self._serving(c), 60, f"container {container[:12]} to serve")
            startup.append(time.monotonic() - started)
        return startup

    def _serving(self, container: str) -> bool:
        if "serving" in self.engine.logs(container):
            return True
        state = self.engine.state(container)
        if not state["Running"]:
            pytest.fail(f"container exited ({state['ExitCode']}):\n{self.engine.logs(container)}")
        return False

    def stop(self, grace: float) -> list[float]:
        """``docker stop -t GRACE`` every container at once; return the seconds each stop took."""
        started = time.monotonic()
        stops = [
            subprocess.Popen(
                [self.engine.name, "stop", "-t", f"{grace:.0f}", container],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for container in self.ids
        ]
        took = []
        for stop in stops:
            try:
                _, err = stop.communicate(timeout=grace + 60)
            except subprocess.TimeoutExpired:
                stop.kill()
                pytest.fail(f"{self.engine.name} stop did not return within {grace + 60:.0f} s")
            assert stop.returncode == 0, err
            took.append(time.monotonic() - started)
        return took


@pytest.fixture
def fleet(engine: Engine, image: Image) -> Iterator[Fleet]:
    """Containers from the image; every one the test started is removed at teardown."""
    fleet = Fleet(engine, image)
    yield fleet
    if fleet.ids:
        subprocess.run(
            [engine.name, "rm", "--force", *fleet.ids], capture_output=True, timeout=120, check=False
        )


def served_chunks(log: str, op: str) -> int:
    return len(re.findall(rf"INFO chunk \S+: {op} on \d+ items", log))


def test_containers_serve_a_job_as_non_root_and_stop_cleanly(
    fleet: Fleet, amqp_url: str, spawn: Spawn, record_property
) -> None:
    engine, grace = fleet.engine, grace_period()
    # The README's stop command allows the compose file's grace period.
    stop = shlex.split(doc_command("docker stop -t 30 $(docker ps -q --filter ancestor=distopsrv)"))
    assert stop[:4] == ["docker", "stop", "-t", f"{grace:.0f}"], stop
    startup = fleet.start(amqp_url)

    for container in fleet.ids:
        # Not root, neither by default for `exec` nor as the server itself (PID 1: exec-form CMD).
        assert engine("exec", container, "id", "-u").strip() != "0"
        status = engine("exec", container, "cat", "/proc/1/status")
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids and "0" not in uids.group(1).split(), status
        cmdline = engine("exec", container, "cat", "/proc/1/cmdline").split("\0")
        assert cmdline[:2] == ["python", "distop/callee.py"], cmdline

    client = spawn(
        "distop/client.py", "--op", "pow", "--param", "esp=2", "--size", "120", "--chunks", "12", "-q"
    )
    assert client.wait(60) == 0, client.output
    assert json.loads(client.stdout) == [x**2 for x in range(120)]

    served = [served_chunks(engine.logs(c), "pow") for c in fleet.ids]
    assert sum(served) == 12, served
    assert sum(1 for n in served if n) > 1, f"one container served every chunk: {served}"

    took = fleet.stop(grace)
    for container in fleet.ids:
        state = engine.state(container)
        assert (state["Running"], state["ExitCode"]) == (False, 0), engine.logs(container)
        assert engine.logs(container).rstrip().endswith("INFO stopped")
    assert max(took) < grace, took

    record_property("figures", fleet.image.figures)
    record_property(
        "figures",
        f"{engine.name}: run to serving {min(startup):.2f}-{max(startup):.2f} s; chunks served per "
        f"container {served}; idle stop {max(took):.2f} s",
    )


def test_docker_stop_lets_each_container_finish_its_chunk(
    fleet: Fleet, vhost: str, spawn: Spawn, tmp_path: Path, record_property
) -> None:
    """Containers of the image run the test server, whose ``sleep`` op keeps a chunk in hand."""
    engine, grace = fleet.engine, grace_period()
    seconds = 4
    assert seconds < grace
    server = ROOT / "tests" / "distop_server.py"
    # The op notes each start in runs/log, shared with the host (the server is not root).
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)
    runs_log = runs / "log"
    fleet.start(
        f"{SHARED_BROKER}/{vhost}",
        *("-v", f"{server}:/app/distop_server.py:ro", "-v", f"{runs}:/runs"),
        command=("python", "distop_server.py"),
    )

    client = spawn(
        "distop/client.py", "--op", "sleep", "--param", f"seconds={seconds}", "--param", "log=/runs/log",
        "--size", "30", "--chunks", str(SERVERS), "-q",
    )  # fmt: skip

    def started() -> int:
        return runs_log.read_text().count("start") if runs_log.exists() else 0

    wait_until(lambda: started() == SERVERS, 30, f"each of the {SERVERS} servers to take a chunk")

    took = fleet.stop(grace)
    for container in fleet.ids:
        state = engine.state(container)
        log = engine.logs(container)
        assert (state["Running"], state["ExitCode"]) == (False, 0), log
        # What a user reads in `docker logs`: asked to stop, finished the chunk, stopped.
        stopping = log.index("stopping after the chunk in hand")
        finished = re.search(r"INFO chunk \S+: sleep on 10 items", log)
        assert finished and finished.start() > stopping, log
        assert log.rstrip().endswith("INFO stopped"), log
    assert max(took) < grace, took

    # Every chunk was finished in its container, so the job completes with no server left.
    assert client.wait(30) == 0, client.output
    assert json.loads(client.stdout) == list(range(30))
    assert started() == SERVERS, "a chunk ran twice"
    assert queue_is_empty(f"{SHARED_BROKER}/{vhost}", "distop.chunks")
    record_property(
        "figures",
        f"{engine.name}: {SERVERS} containers stopped mid-chunk ({seconds} s op) finished it and "
        f"exited 0 in {min(took):.1f}-{max(took):.1f} s (grace {grace:.0f} s)",
    )
