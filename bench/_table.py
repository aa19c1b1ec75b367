"""What the benchmark scripts share: medians, ratios against a baseline, the versions measured.

Absolute rates drift on a shared machine, and other work slows down some runs
and not others. So each question compares our script with a baseline run back
to back with it, round after round (the side that goes first alternating), and
judges the median of the rounds' ratios against its goal: a burst of load
elsewhere spoils a round or two, not the verdict.
"""

from __future__ import annotations

import os
import resource
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import pika

# How to run rabbitmqctl for the broker measured, e.g. "docker exec CONTAINER rabbitmqctl".
RABBITMQCTL = shlex.split(os.environ.get("PYCLASS_RABBITMQCTL", "rabbitmqctl"))
SIDES = ("baseline", "ours")


@dataclass
class Comparison:
    """One question: our rates against the baseline's, round by round."""

    question: str
    goal: float  # the least acceptable ratio ours / baseline
    rates: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in SIDES})
    # CPU seconds per item that the measured process used, where measured.
    cpu: dict[str, list[float]] = field(default_factory=lambda: {side: [] for side in SIDES})

    def add(self, side: str, rate: float, cpu: float | None = None) -> None:
        self.rates[side].append(rate)
        if cpu is not None:
            self.cpu[side].append(cpu)

    def median(self, side: str) -> float:
        return statistics.median(self.rates[side])

    @property
    def ratio(self) -> float:
        """The median over rounds of ours / baseline."""
        return statistics.median(
            o / b for o, b in zip(self.rates["ours"], self.rates["baseline"], strict=True)
        )

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal


def children_cpu() -> float:
    """CPU seconds used so far by child processes that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to show how busy the machine was."""
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl; raise RuntimeError with its error output if it fails."""
    try:
        done = subprocess.run([*RABBITMQCTL, *args], check=False, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{RABBITMQCTL[0]} not found (set PYCLASS_RABBITMQCTL)") from exc
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def versions() -> str:
    """One line naming what was measured."""
    return (
        f"Python {sys.version.split()[0]}, pika {pika.__version__}, "
        f"RabbitMQ {rabbitmqctl('version')}, {os.cpu_count()} CPUs"
    )


def table(comparisons: list[Comparison], unit: str = "msg/s", item: str = "msg") -> str:
    """Median rates, median ratio and verdict per question, as a Markdown table."""
    lines = [
        f"| question | baseline ({unit}) | ours ({unit}) | ours / baseline | goal | met "
        f"| CPU µs/{item}, baseline / ours |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for c in comparisons:
        cpu = (
            " / ".join(f"{statistics.median(c.cpu[side]) * 1e6:.1f}" for side in SIDES)
            if all(c.cpu.values())
            else "-"
        )
        lines.append(
            f"| {c.question} | {c.median('baseline'):,.0f} | {c.median('ours'):,.0f} | {c.ratio:.2f} "
            f"| ≥ {c.goal:.2f} | {'yes' if c.met else 'NO'} | {cpu} |"
        )
    return "\n".join(lines)
