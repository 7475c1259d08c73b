"""kvpfs(8) is generated from the parsers, so it lists every option `--help` knows."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess

import pytest

from kvpfs.cli import manpage, mounthelper, results
from kvpfs.cli.parser import build_parser


def sections(page: str) -> dict[str, str]:
    """Each `.SS` subsection's roff text, by its title ("kvpfs host ip set")."""
    parts = re.split(r'^\.S[SH] "?(.*?)"?$', page, flags=re.MULTILINE)
    return {title.replace("\\-", "-"): body for title, body in zip(parts[1::2], parts[2::2],
                                                                     strict=True)}


def plain(roff: str) -> str:
    """Roff text without font changes and escapes, to compare with help strings."""
    text = re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\e", "\\")
    return " ".join(text.replace("\\&", "").split())


def all_parsers() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(words, parser) for words, _help, parser in manpage.walk(build_parser())]
    return [*found, (("mount.kvpfs",), mounthelper.build_helper_parser())]


def test_every_subcommand_and_option_is_in_its_section():
    page = manpage.render()
    by_title = sections(page)
    words_seen = set()
    for words, parser in all_parsers():
        title = " ".join(words)
        words_seen.add(title)
        body = plain(by_title["COMMANDS"] if words == ("kvpfs",) else by_title[title])
        for action in manpage.documented_actions(parser):
            for option in action.option_strings:
                assert re.search(rf"(^|[\s,]){re.escape(option)}\b", body), \
                    f"{title}: {option} is not in the man page"
            if action.help:
                helptext = parser._get_formatter()._expand_help(action)
                assert plain(helptext[0].upper() + helptext[1:]) in body, \
                    f"{title}: the help of {action.dest} differs from --help"
    # the tree is what we think it is: nested subcommands are covered too
    assert {"kvpfs mount", "kvpfs host ip set", "kvpfs ls", "kvpfs wait", "mount.kvpfs"} \
        <= words_seen


def test_a_new_option_appears_without_editing_the_page(monkeypatch):
    """The page follows the parser: an option added to `kvpfs ls` shows up in its section."""
    real = build_parser

    def with_new_option() -> argparse.ArgumentParser:
        parser = real()
        for name, _help, sub in manpage.subcommands(parser):
            if name == "ls":
                sub.add_argument("--brand-new", help="an option nobody documented by hand")
        return parser

    assert "brand" not in manpage.render()
    monkeypatch.setattr(manpage, "build_parser", with_new_option)
    body = plain(sections(manpage.render())["kvpfs ls"])
    assert "--brand-new BRAND_NEW An option nobody documented by hand." in body


def test_fstab_options_and_exit_statuses_are_listed():
    by_title = sections(manpage.render())
    helper = plain(by_title["mount.kvpfs"])
    for option in [*mounthelper.VALUE_OPTIONS, *mounthelper.FLAG_OPTIONS,
                   *mounthelper.FUSE_OPTIONS, *mounthelper.IGNORED_OPTIONS]:
        assert re.search(rf"(^|[\s,]){re.escape(option)}\b", helper), option
    statuses = plain(by_title["EXIT STATUS"]).split()
    for name in dir(results):
        if name.startswith("EXIT_"):
            assert str(getattr(results, name)) in statuses, name
    for title in ("THE FILESYSTEM", "LIMITS AND ERRORS", "FILES", "MOUNT HELPER"):
        assert title in by_title


def test_man_formats_it_without_warnings(tmp_path):
    if shutil.which("man") is None:
        pytest.fail("man (Debian package man-db) is needed to check the page")
    page = tmp_path / "kvpfs.8"
    page.write_text(manpage.render())
    result = subprocess.run(["man", "--warnings=w", "-l", str(page)], capture_output=True,
                            text=True, env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8",
                                            "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert "kvpfs host ip set" in result.stdout
