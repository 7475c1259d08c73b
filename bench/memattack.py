#!/usr/bin/env python3
"""The memory attack of issue 13 (item 8) against a real mount, with kvpfs's peak RSS.

    .venv/bin/python bench/memattack.py                    # this checkout's kvpfs
    .venv/bin/python bench/memattack.py --src /tmp/old     # another checkout (e.g. git archive)

As root: starts `kvpfs mount --simulate --allow-other --guest-group GID` on a
temporary mount point, then runs each step of the attack as `nobody` with the
guest group as its only supplementary group (setpriv), as a hostile guest
writer would, and prints what each step got (ok or the errno) and kvpfs's
VmRSS and VmHWM (peak) after it:

1. pwrite of one byte at offset 500 MB, on a key and on a scratch (dot) file;
2. `truncate -s 700M` and `truncate -s 900M` on two scratch files;
3. pwrite at offset 2**40 on a scratch file;
4. many descriptors on one scratch file, each writing a value's worth of bytes
   (open write buffers; as many as nobody's descriptor limit allows);
5. many scratch files of 2,000 bytes each (more than the mount keeps).

Figures only: nothing is asserted (tests/test_hostile_writes.py checks the
errnos and bounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_mb, lazy_unmount, rss_bytes, start_kvpfs, stop_process

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
GROUP = 4244

ATTACK = r"""
import errno, json, os, resource, subprocess, sys
step, guest = sys.argv[1], sys.argv[2]
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def pwrite(name, offset):
    def go():
        fd = os.open(os.path.join(guest, name), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"x", offset)
        finally:
            os.close(fd)
    return attempt(go)
def truncate(name, size):
    done = subprocess.run(["truncate", "-s", size, os.path.join(guest, name)],
                          capture_output=True, text=True)
    return "ok" if done.returncode == 0 else done.stderr.strip().rsplit(": ", 1)[-1]
out = {}
if step == "offset":
    out["pwrite key @500MB"] = pwrite("Attack", 500_000_000)
    out["pwrite .dot @500MB"] = pwrite(".attack", 500_000_000)
elif step == "truncate":
    out["truncate -s 700M .a"] = truncate(".t700", "700M")
    out["truncate -s 900M .b"] = truncate(".t900", "900M")
elif step == "huge":
    out["pwrite .dot @2**40"] = pwrite(".huge", 2 ** 40)
elif step == "scratch":
    made, last = 0, "ok"
    for i in range(int(sys.argv[3])):
        try:
            with open(os.path.join(guest, ".s%d" % i), "wb") as f:
                f.write(b"s" * 2000)
            made += 1
        except OSError as exc:
            last = errno.errorcode.get(exc.errno, str(exc.errno))
            break
    out["scratch files made"] = made
    out["then"] = last
elif step == "buffers":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path = os.path.join(guest, ".buffers")
    open(path, "wb").close()
    fds, last = [], "ok"
    try:
        for _ in range(hard - 50):
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError as exc:
                last = "open: " + errno.errorcode.get(exc.errno, str(exc.errno))
                break
            fds.append(fd)
            try:
                os.pwrite(fd, b"b" * 2048, 0)
            except OSError as exc:
                last = "pwrite: " + errno.errorcode.get(exc.errno, str(exc.errno))
                break
        out["descriptors each holding 2048 bytes"] = len(fds) - (last != "ok")
        out["then"] = last
        # Report while they are all open: this is when kvpfs holds the most.
        print(json.dumps(out), flush=True)
        sys.stdin.readline()
    finally:
        for fd in fds:
            os.close(fd)
    sys.exit(0)
print(json.dumps(out), flush=True)
"""


def attack(step: str, guest: Path, *extra: str, pid: int) -> tuple[dict, int, int]:
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GROUP}", "--",
            python, "-c", ATTACK, step, str(guest), *extra]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    rss, hwm = rss_bytes(pid)  # while the attacker still holds what it opened
    proc.stdin.write("\n")
    proc.stdin.close()
    proc.wait(600)
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        result = {"failed": (line + (proc.stderr.read() if proc.stderr else ""))[-300:]}
    return result, rss, hwm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO,
                        help="the checkout whose kvpfs package to run (default: this one)")
    parser.add_argument("--scratch", type=int, default=5000,
                        help="scratch files step 4 tries to make (default 5000)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it mounts FUSE and switches to nobody")
    base = Path(tempfile.mkdtemp(prefix="kvpfs-memattack-", dir="/tmp"))
    os.chmod(base, 0o755)
    proc = start_kvpfs(base, args.src.resolve(), GROUP)
    guest = base / "mnt" / "guest"
    try:
        rss, hwm = rss_bytes(proc.pid)
        print(f"kvpfs from {args.src}: pid {proc.pid}")
        print(f"{'step':<10} {'VmRSS':>10} {'VmHWM':>10}  result")
        print(f"{'start':<10} {fmt_mb(rss):>10} {fmt_mb(hwm):>10}")
        start_hwm = hwm
        for step, extra in (("offset", ()), ("truncate", ()), ("huge", ()), ("buffers", ()),
                            ("scratch", (str(args.scratch),))):
            result, rss, hwm = attack(step, guest, *extra, pid=proc.pid)
            print(f"{step:<10} {fmt_mb(rss):>10} {fmt_mb(hwm):>10}  {json.dumps(result)}")
        rss, hwm = rss_bytes(proc.pid)
        print(f"{'end':<10} {fmt_mb(rss):>10} {fmt_mb(hwm):>10}")
        print(f"peak RSS (VmHWM) before the attack {fmt_mb(start_hwm)}, after {fmt_mb(hwm)}")
        errors = [line for line in (base / "kvpfs.log").read_text().splitlines()
                  if "MemoryError" in line or "unexpected error" in line]
        print(f"log lines with MemoryError or an unexpected error: {len(errors)}")
    finally:
        stop_process(proc)
        lazy_unmount(base / "mnt")
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
