"""A separate process holding a lock on a pool file, as other KVP writers do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LOCKER = r"""
import fcntl, os, sys
path, mode = sys.argv[1], sys.argv[2]
f = open(path, "r+b")
if mode == "lockf":
    fcntl.lockf(f, fcntl.LOCK_EX)            # POSIX lock, like hv_kvp_daemon's F_SETLKW
elif mode == "flock":
    fcntl.flock(f, fcntl.LOCK_EX)            # like cloud-init / azure-init
elif mode == "probe":
    out = []
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out.append("lockf-free")
        fcntl.lockf(f, fcntl.LOCK_UN)
    except OSError:
        out.append("lockf-busy")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out.append("flock-free")
    except OSError:
        out.append("flock-busy")
    print(" ".join(out), flush=True)
    sys.exit(0)
print("ready", flush=True)
sys.stdin.readline()
"""


def start_locker(path: Path, mode: str = "lockf") -> subprocess.Popen[str]:
    """Returns once the child holds the lock (`lockf`: POSIX, `flock`) or has probed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def stop_locker(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
