"""The network managers' file formats: reading them and replacing them safely.

`KEY=value` (networkd link state, ifcfg), GKeyFile INI (NetworkManager), systemd unit
values across drop-ins, and an atomic write for the configuration kvpfs produces. Shared
by the GET side (`netstate`), link discovery (`netlinks`) and the writers (`netwriters`).
"""

from __future__ import annotations

import configparser
import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TRUE_WORDS = frozenset({"1", "yes", "true", "on"})
"""How the managers' files (and kvpfs' environment variables) spell "on"."""


def read_text(path: Path) -> str | None:
    """A small state or configuration file, stripped; None if it cannot be read."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def key_values(text: str) -> dict[str, str]:
    """`KEY=value` lines (networkd link state, ifcfg); quotes around values removed."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key.strip()] = value
    return values


class _KeyFileParser(configparser.ConfigParser):
    """ConfigParser that keeps a key's case, as GKeyFile does (ConfigParser lowers it)."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def keyfile(text: str) -> configparser.ConfigParser:
    """A GKeyFile-style INI (NetworkManager): case-sensitive keys, `=` only, `#` comments."""
    parser = _KeyFileParser(interpolation=None, strict=False, delimiters=("=",),
                            comment_prefixes=("#",))
    parser.read_string(text)
    return parser


def systemd_values(paths: Sequence[Path], section: str, key: str) -> list[str]:
    """Every value of `key` in `[section]` across a unit file and its drop-ins, in order."""
    values: list[str] = []
    for path in paths:
        text = read_text(path)
        if text is None:
            continue
        current: str | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            name, sep, value = line.partition("=")
            if sep and current == section and name.strip() == key:
                values.append(value.strip())
    return values


@dataclass(frozen=True)
class StagedFile:
    """A file written and synced beside its place, waiting to replace `path`.

    SET_IP_INFO stages its files before answering the host and publishes them only
    once the answer has reached the kernel in time; a reply that is dropped discards
    them, and the guest's configuration stays as it was.
    """

    temporary: Path
    path: Path
    mode: int

    def publish(self) -> None:
        """Replace `path` (atomically; a symlink there is replaced, never followed)."""
        try:
            os.replace(self.temporary, self.path)
        except BaseException:
            self.discard()
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        log.info("wrote %s (mode %04o)", self.path, self.mode)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.temporary)


def stage_file(path: Path, text: str, mode: int) -> StagedFile:
    """`text` written and synced next to `path` (mode set before it can appear there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return StagedFile(Path(temporary), path, mode)


def write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text` (mode set before it appears): all or nothing on a crash."""
    stage_file(path, text, mode).publish()

