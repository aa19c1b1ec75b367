"""The connection helper: one text in every folder, several broker addresses, no password shown."""

from __future__ import annotations

import difflib

import pytest

from pc import broker
from tests.conftest import ROOT

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
        # A comma inside ssl_options or a password does not start another address.
        ("amqps://u:p@h/%2F?ssl_options={'a':1,'b':2}", ["amqps://u:p@h/%2F?ssl_options={'a':1,'b':2}"]),
        ("amqp://u:a,b@h/%2F", ["amqp://u:a,b@h/%2F"]),
    ],
)
def test_addresses(given: str, expected: list[str]) -> None:
    assert broker.addresses(broker.resolve(given)) == expected
