"""The set-up a newcomer relies on: pyclassrc, and make's targets when no broker answers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

VENV = ROOT / "venv"
needs_venv = pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="run `make venv` first")


def run(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60, check=False
    )


@needs_venv
def test_pyclassrc_activates_the_venv_and_puts_the_root_on_pythonpath(tmp_path: Path) -> None:
    # From another directory, as a user sourcing it by path would.
    done = subprocess.run(
        ["bash", "-c", f"source {ROOT}/pyclassrc && python -c 'import distop.ops' && command -v python"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent.resolve() == (VENV / "bin").resolve()


@needs_venv
@pytest.mark.parametrize("target", ["check-broker", "demo"])
def test_make_says_in_one_line_when_no_broker_answers(target: str) -> None:
    done = run(
        f"make --no-print-directory {target}", AMQP_URL=f"amqp://guest:s3cret@127.0.0.1:{free_port()}/"
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1, done.stderr
    assert "connection refused" in ours[0] and "rabbitmq-server -detached" in ours[0]
    assert "docker run -d --name some-rabbit -p 5672:5672 rabbitmq:3" in ours[0]
    assert "s3cret" not in done.stdout + done.stderr
