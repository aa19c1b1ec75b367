"""What the README and the lesson pages under docs/ show, read so that tests can hold them to the code.

- ``doc_command("python pc/consumer.py")`` returns a shell command that a page shows, and fails the test if
  no page shows it exactly so. ``tests/test_docs.py`` checks the other direction: every command a page
  shows is run by some test through ``doc_command``.
- ``excerpts()`` lists the code excerpts a page marks with ``<!-- excerpt: PATH -->`` just above a fenced
  block. Each must be a literal run of lines of PATH (indentation removed alike); a line ``...`` stands for
  lines left out.

Commands are the lines of fenced blocks tagged ``sh``, less a trailing ``  # comment``; a page's other
blocks (``text``, ``python``, ``mermaid``...) are not commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
EXCERPT = re.compile(r"<!--\s*excerpt:\s*(\S+)\s*-->\s*\n```\w*\n(.*?)^```", re.M | re.S)
COMMENT = re.compile(r"\s{2,}#.*$")


def pages() -> list[Path]:
    """The README and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> dict[str, list[str]]:
    """Every command that a page shows, with the pages that show it."""
    commands: dict[str, list[str]] = {}
    for page in pages():
        for tag, body in FENCE.findall(page.read_text()):
            if tag != "sh":
                continue
            for line in body.splitlines():
                command = COMMENT.sub("", line).strip()
                if command and not command.startswith("#"):
                    commands.setdefault(command, []).append(page.relative_to(ROOT).as_posix())
    return commands


def doc_command(command: str) -> str:
    """Return ``command`` if a page shows it, as written; fail the test if none does."""
    if command not in documented_commands():
        pytest.fail(f"no page shows the command {command!r} any more: update the test with the page")
    return command


@dataclass
class Excerpt:
    page: str
    path: str
    lines: list[str]


def excerpts() -> list[Excerpt]:
    """Every marked excerpt on every page."""
    found = []
    for page in pages():
        for path, body in EXCERPT.findall(page.read_text()):
            found.append(Excerpt(page.relative_to(ROOT).as_posix(), path, body.splitlines()))
    return found


def _dedent(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


def excerpt_mismatch(excerpt: Excerpt) -> str | None:
    """Why ``excerpt`` is not a literal run of lines of its file, or None if it is."""
    source = ROOT / excerpt.path
    if not source.is_file():
        return f"{excerpt.page}: no file {excerpt.path}"
    code = _dedent(source.read_text().splitlines())
    wanted = _dedent(excerpt.lines)
    # Split at the "..." lines: each piece must follow the one before, its lines consecutive in the file.
    pieces: list[list[str]] = [[]]
    for line in wanted:
        if line in ("...", "# ..."):
            pieces.append([])
        else:
            pieces[-1].append(line)
    at = 0
    for piece in filter(None, pieces):
        for start in range(at, len(code) - len(piece) + 1):
            if code[start : start + len(piece)] == piece:
                at = start + len(piece)
                break
        else:
            return f"{excerpt.page}: these lines are not in {excerpt.path} as shown:\n" + "\n".join(piece)
    return None
