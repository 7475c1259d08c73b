#!/usr/bin/env python3
"""Run the safety tests and print the figures they record as one table.

    .venv/bin/python bench/safety_figures.py            # the default run (a few minutes)
    .venv/bin/python bench/safety_figures.py --soak     # the long soak variants
    .venv/bin/python bench/safety_figures.py -- -x -k crash   # more pytest arguments

Each test appends its figures (kills survived, messages fuzzed, records checked, concurrent
changes verified, lost = 0, ...) as JSON lines to the file named by $KVPFS_FIGURES; this
script points that at a temporary file, runs pytest on the safety test files, and prints the
lines as a table. $KVPFS_SEED is passed through, so a run can be reproduced. The exit status
is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = (
    "tests/process/test_crash.py",
    "tests/process/test_sharing.py",
    "tests/mount/test_fuzz.py",
    "tests/process/test_security.py",
)


def table(records: list[dict[str, object]]) -> str:
    """One row per figure. A record is either {"test", figure: value, ...} (these tests) or
    {"test", "figure", "value"} (tests/support/figures.py); a test's name is shown once."""
    rows: list[tuple[str, str, str]] = []
    previous = None
    for record in records:
        name = str(record.get("test", "?"))
        if set(record) == {"test", "figure", "value"}:
            figures = [(str(record["figure"]), record["value"])]
        else:
            figures = [(k, v) for k, v in record.items() if k != "test"]
        for key, value in figures:
            rows.append((name if name != previous else "", key, show(key, value)))
            previous = name
    widths = [max([len(h), *(len(r[i]) for r in rows)])
              for i, h in enumerate(("test", "figure", "value"))]
    lines = [f"{'test':<{widths[0]}}  {'figure':<{widths[1]}}  {'value':>{widths[2]}}",
             "  ".join("-" * w for w in widths)]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    return "\n".join(lines)


def show(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key != "seed":
        return f"{value:,}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", action="store_true", help="run the long soak variants")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvpfs-figures-") as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "KVPFS_FIGURES": str(figures)}
        command = [sys.executable, "-m", "pytest", *TESTS, "-q", "-rxX",
                   *(["--soak"] if args.soak else []), *args.pytest_args]
        print("$ " + " ".join(command[2:]), flush=True)
        started = time.monotonic()
        status = subprocess.run(command, cwd=REPO, env=env).returncode
        elapsed = time.monotonic() - started
        records = ([json.loads(line) for line in figures.read_text().splitlines() if line]
                   if figures.exists() else [])
    print()
    print(table(records) if records else "no figures were recorded")
    lost = sum(int(r.get("lost", 0)) for r in records)  # type: ignore[call-overload]
    torn = sum(int(r.get("torn", 0)) for r in records)  # type: ignore[call-overload]
    print()
    print(f"pytest exit status {status}; {elapsed:.0f} s; lost {lost}; torn {torn}"
          f"{' (soak)' if args.soak else ''}")
    return status


if __name__ == "__main__":
    sys.exit(main())
