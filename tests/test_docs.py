"""The pages teach what the code does: excerpts are the real code; a test runs every command shown."""

from __future__ import annotations

import ast

import pytest

from tests.docs import ROOT, documented_commands, excerpt_mismatch, excerpts

# A lesson's core fits on a screen.
MAX_EXCERPT_LINES = 25


def commands_run_by_tests() -> set[str]:
    """The literal arguments of every ``doc_command(...)`` call in the test suite."""
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "doc_command"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(node.args[0].value)
    return found


def test_the_pages_show_commands() -> None:
    assert documented_commands(), "no page shows a command in an ```sh block"


@pytest.mark.parametrize("command", sorted(documented_commands()))
def test_every_command_a_page_shows_is_run_by_a_test(command: str) -> None:
    where = ", ".join(documented_commands()[command])
    assert command in commands_run_by_tests(), f"{where} shows {command!r}, but no test runs it (doc_command)"


@pytest.mark.parametrize("excerpt", excerpts(), ids=lambda e: f"{e.page}:{e.path}")
def test_excerpts_are_the_real_code(excerpt) -> None:
    assert len(excerpt.lines) <= MAX_EXCERPT_LINES, f"{excerpt.page}: {excerpt.path} excerpt too long"
    mismatch = excerpt_mismatch(excerpt)
    assert mismatch is None, mismatch
