"""The front door's promises, read from the files: a short README whose quick-start commands
exist in dev.sh, docs/ behind it, and a LICENSE that says what debian/copyright says."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def dev_sh_commands() -> set[str]:
    """The commands dev.sh's final `case` dispatches."""
    text = (REPO / "dev.sh").read_text()
    body = text[text.rindex('case "$command" in'):]
    return set(re.findall(r"^\s+([a-z-]+)\) ", body, re.MULTILINE))


def test_readme_is_short_and_its_quick_start_commands_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    quick = text[text.index("## Quick start"):text.index("\n## ", text.index("## Quick start"))]
    commands = re.findall(r"^\./dev\.sh (\S+)$", quick, re.MULTILINE)
    assert commands == ["demo", "test"]
    assert set(commands) <= dev_sh_commands()


def test_the_docs_the_readme_links_to_in_this_tree_exist():
    """Every docs/ page the README names is there (pages other work adds are named too, so
    the link is checked once they land)."""
    text = README.read_text()
    linked = set(re.findall(r"\]\((docs/[a-z]+\.md)\)", text))
    assert len(linked) >= 5
    ours = {"docs/filesystem.md", "docs/operations.md", "docs/design.md", "docs/testing.md",
            "docs/benchmarks.md", "docs/commands.md", "docs/host.md"}
    assert ours <= linked
    assert all((REPO / page).is_file() for page in ours)


def copyright_licence(text: str) -> tuple[str, str]:
    """(Copyright: line, the MIT text) of debian/copyright's `Files: *` stanza."""
    holder = re.search(r"^Files: \*\nCopyright: (.+)$", text, re.MULTILINE)
    assert holder is not None
    body = text[text.index("License: MIT\n Permission"):].split("\n", 1)[1]
    lines = [line[1:] if line.startswith(" ") else line for line in body.splitlines()]
    return holder.group(1), "\n".join("" if line == "." else line for line in lines).strip()


def test_license_matches_debian_copyright():
    holder, licence = copyright_licence((REPO / "debian" / "copyright").read_text())
    text = (REPO / "LICENSE").read_text()
    first, copyright_line, rest = text.split("\n\n", 2)
    assert first == "MIT License"
    assert copyright_line == f"Copyright (c) {holder}"
    assert rest.strip() == licence
