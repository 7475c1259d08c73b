"""What a scripting command gives back: output, notes and an exit status, one set for all.

Commands return an `Output` or raise `ToolError` (with its exit status) or `PoolFileError`
(an I/O problem); `run` prints the one and maps the others to a message on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvpfs.storage.errors import PoolFileError

# The exit statuses of every kvpfs command (docs/commands.md "Exit status", kvpfs(8)).
EXIT_OK = 0
EXIT_NOT_FOUND = 1  # get/rm: no such key; host: the host got a failure status
EXIT_USAGE = 2  # bad arguments, or a key or value beyond the limits: nothing written
EXIT_UNAVAILABLE = 3  # kvpfs could not start, or no kvpfs is reachable
EXIT_IO = 4  # a lock timeout or a pool file that cannot be read or written
EXIT_TIMEOUT = 124  # `kvpfs wait --timeout`, as timeout(1)

JsonObject = dict[str, Any]  # what --json prints, before it is printed


class ToolError(Exception):
    """A failure with a known exit status; the message is printed as is."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ToolError):
    """Bad arguments or a key/value the host could not receive (exit 2, nothing written)."""

    exit_code = EXIT_USAGE


@dataclass
class Output:
    """What a command prints: stdout bytes, notes for stderr, and its exit status."""

    stdout: bytes = b""
    notes: list[str] = field(default_factory=list)
    code: int = EXIT_OK


def json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def run(prog: str, command: Callable[..., Output], *args: object, **kwargs: object) -> int:
    """Run a command, print its output and notes, and map failures to exit statuses."""
    try:
        out = command(*args, **kwargs)
    except ToolError as exc:
        _print_notes(prog, [str(exc)])
        return exc.exit_code
    except PoolFileError as exc:
        _print_notes(prog, [str(exc)])
        return EXIT_IO
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _print_notes(prog, [f"{where}{exc.strerror or exc}"])
        return EXIT_IO
    try:
        sys.stdout.buffer.write(out.stdout)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # `kvpfs ls | head`: the reader is gone; do not let Python complain at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    _print_notes(prog, out.notes)
    return out.code


def _print_notes(prog: str, notes: Iterable[str]) -> None:
    for note in notes:
        print(f"{prog}: {note}", file=sys.stderr)
