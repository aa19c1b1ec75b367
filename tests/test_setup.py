"""The set-up a newcomer relies on: pyclassrc, and make's targets when no broker answers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.docs import doc_command

VENV = ROOT / "venv"
needs_venv = pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="run `make venv` first")


def run(command: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
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


@needs_venv
def test_make_venv_then_source_pyclassrc_gives_the_python_that_runs_the_examples() -> None:
    done = run(
        f"{doc_command('make venv')} >/dev/null && {doc_command('source pyclassrc')} && command -v python"
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent.resolve() == (VENV / "bin").resolve()


@needs_venv
def test_make_demo_runs_every_example_end_to_end(amqp_url: str) -> None:
    done = run(doc_command("make demo"), timeout=240, AMQP_URL=amqp_url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for example in ("pc", "pikachat", "distop"):
        assert f"=== {example}" in done.stdout


def test_ci_runs_the_readme_test_command() -> None:
    # `make test` runs this suite, so a test cannot run it; CI does, as the README writes it.
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert doc_command("make test") in [line.strip() for line in ci]
