"""Helpers for the fault suite: figures, delivery tallies, a broker held by a memory alarm.

Every scenario that stops or restarts a broker does it to the private node of
``broker_node`` (tests/conftest.py), never to the shared broker.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import BrokerNode, Proc, rabbitmqctl


@dataclass
class Tally:
    """What a set of receivers logged, against what was sent."""

    sent: list[str]
    seen: list[str]

    @property
    def delivered(self) -> int:
        """How many of the sent messages arrived at least once."""
        return len(set(self.sent) & set(self.seen))

    @property
    def lost(self) -> list[str]:
        seen = set(self.seen)
        return [text for text in self.sent if text not in seen]

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first of each message."""
        return sum(n - 1 for n in Counter(self.seen).values())

    @property
    def strangers(self) -> set[str]:
        """Texts that arrived but were never sent."""
        return set(self.seen) - set(self.sent)


Report = Callable[..., str]


@pytest.fixture
def report(record_property: Callable[[str, object], None]) -> Report:
    """Record the scenario's figures as one line, printed in the run's summary."""

    def _report(
        scenario: str,
        *,
        sent: int,
        delivered: int,
        duplicates: int,
        lost: int,
        seconds: float,
        note: str = "",
    ) -> str:
        line = (
            f"{scenario:<22} sent {sent:>6}  delivered {delivered:>6}  duplicates {duplicates:>4}  "
            f"lost {lost}  {seconds:5.1f} s"
        )
        if note:
            line += f"  ({note})"
        record_property("figures", line)
        return line

    return _report


def matches(procs: Iterable[Proc], regex: re.Pattern[str]) -> list[re.Match[str]]:
    """Every line of the processes' output that matches ``regex``, process by process."""
    return [
        m
        for proc in procs
        for line in list(proc.stdout_lines + proc.stderr_lines)
        if (m := regex.search(line))
    ]


def blocked_connections(node: BrokerNode, vhost: str) -> int:
    out = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "state", node=node)
    return sum(1 for line in out.splitlines() if line.split("\t") == [vhost, "blocked"])


@contextlib.contextmanager
def memory_alarm(node: BrokerNode) -> Iterator[None]:
    """Raise a memory alarm: the node stops reading from connections that publish.

    Publishers then hold unconfirmed messages for as long as we like, which
    makes "the broker went away mid-run" deterministic. A restart clears the
    alarm (the threshold set here is not persisted); so does leaving the block.
    """
    rabbitmqctl("set_vm_memory_high_watermark", "0", node=node)
    try:
        yield
    finally:
        if node.running:
            rabbitmqctl("set_vm_memory_high_watermark", "0.4", node=node)
