"""Optional sampling of the kvpfs process with py-spy while a section runs (--profile DIR).

py-spy (`pip install -e '.[bench]'`) attaches to the running kvpfs by pid and
writes collapsed stacks (`NAME.txt`, the input of flamegraph.pl and
speedscope); `NAME.summary.txt` lists where the samples fell: by the innermost
frame (self time) and by every frame on the stack (inclusive time). Only
samples of the thread holding the GIL are kept (`--gil`): on this kind of VM
py-spy cannot tell idle threads from running ones, and every blocking call
(device and pool-file I/O, epoll) releases the GIL, so the shares are shares of
the Python work kvpfs does, not of time spent waiting or in the kernel. Timings
measured while profiling are slower and are not comparable with a normal run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

TOP = 25


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else None


@contextlib.contextmanager
def maybe_profile(pid: int, prefix: Path | None) -> Iterator[None]:
    if prefix is None:
        yield
        return
    tool = py_spy()
    if tool is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    raw = prefix.with_suffix(".txt")
    log = prefix.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [tool, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw),
             "--rate", "1000", "--function", "--threads", "--gil"],
            stdout=out, stderr=out,
            # Off the benchmark's pinned CPU where possible.
            preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)),
        )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no profile: {log.read_text(errors='replace')}")
    prefix.with_suffix(".summary.txt").write_text(summarize(raw))


def summarize(raw: Path, top: int = TOP) -> str:
    """Self and inclusive shares of the frames in a py-spy raw (collapsed) file."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples of the thread holding the GIL\n", "self (innermost frame):"]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in self_counts.most_common(top)]
    out.append("\ninclusive (anywhere on the stack):")
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"
