#!/usr/bin/env python3
"""Issue 18's attacks against a real mount, with the figures the issue names.

    .venv/bin/python bench/hostile18.py                    # this checkout's kvpfs
    .venv/bin/python bench/hostile18.py --src /tmp/old     # another checkout (git archive)

As root: starts `kvpfs mount --simulate --allow-other --guest-group GID` on a temporary
mount point with 300 keys in guest/, then, each as `nobody` (setpriv):

1. dirs: with no groups, opens guest/ as often as one process may and holds the handles:
   kvpfs's VmRSS while held and after they are closed;
2. opens: as a member, opens one key as often as one process may, then asks 20,000 times
   more: what root's `cat external/X` gets meanwhile, and how many lines kvpfs logged;
3. budget: as a member, fills the unpublished-bytes budget with scratch files, then
   `echo new > guest/Important` (holding `precious`): what the member's shell got, what
   the host sees for Important, and whether root's `echo x > guest/RootKey` still works;
4. log: lines kvpfs logged in all, and tracebacks among them.

Figures only, nothing is asserted (tests/mount/test_hostile_users.py asserts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_mb, lazy_unmount, rss_bytes, start_kvpfs, stop_process

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
GROUP = 4248

PROBE = r"""
import errno, json, os, sys
step, target = sys.argv[1], sys.argv[2]
def name(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))
fds, error, extra = [], None, {}
if step in ("dirs", "opens"):
    flags = os.O_RDONLY | (os.O_DIRECTORY if step == "dirs" else 0)
    while True:
        try:
            fds.append(os.open(target, flags))
        except OSError as exc:
            error = name(exc)
            break
    if step == "opens":
        refused = 0
        for _ in range(20000):
            try:
                os.close(os.open(target, flags))
            except OSError:
                refused += 1
        extra["refused afterwards"] = refused
elif step == "budget":
    size, made = 65536, 0
    while size:
        try:
            with open(os.path.join(target, ".fill%d" % made), "wb") as f:
                made += 1
                f.truncate(size)
        except OSError as exc:
            error = name(exc)
            size //= 2
    extra["scratch files"] = made
print(json.dumps({"held": len(fds), "then": error, **extra}), flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
"""


def host(src: Path, base: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kvpfs", "host", "--control",
                           str(base / "control.sock"), *args], capture_output=True, text=True,
                          cwd=src, env=dict(os.environ, PYTHONPATH=str(src)))
    return done.stdout.strip() or done.stderr.strip()


def probe(step: str, target: Path, groups: str) -> subprocess.Popen[str]:
    python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    group_opt = f"--groups={groups}" if groups else "--clear-groups"
    return subprocess.Popen(
        ["prlimit", f"--nofile={hard}:{hard}", "setpriv", f"--reuid={NOBODY}",
         f"--regid={NOBODY}", group_opt, "--", python, "-c", PROBE, step, str(target)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/")


def shell(command: str, *args: str, groups: str | None = None) -> str:
    argv = ["sh", "-c", command, "sh", *args]
    if groups is not None:
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={groups}",
                "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    return "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()}"


def log_lines(base: Path) -> list[str]:
    return (base / "kvpfs.log").read_text(errors="replace").splitlines()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO,
                        help="the checkout whose kvpfs package to run (default: this one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it mounts FUSE and switches to nobody")
    src = args.src.resolve()
    base = Path(tempfile.mkdtemp(prefix="kvpfs-hostile18-", dir="/tmp"))
    os.chmod(base, 0o755)
    proc = start_kvpfs(base, src, GROUP)
    mnt = base / "mnt"
    try:
        for i in range(300):
            host(src, base, "set", "guest", f"Fill{i:04d}", "v" * 40)
        host(src, base, "set", "external", "X", "secret")
        print(f"kvpfs from {src}: pid {proc.pid}, guest/ holds 300 keys")
        before = rss_bytes(proc.pid)[0]
        print(f"1 dirs    RSS before {fmt_mb(before)}", end="", flush=True)
        attacker = probe("dirs", mnt / "guest", "")
        got = json.loads(attacker.stdout.readline())  # type: ignore[union-attr]
        held = rss_bytes(proc.pid)[0]
        attacker.communicate("\n", timeout=600)
        time.sleep(2)  # releasedir follows close(2): figures only, nothing waits on it
        print(f", while held {fmt_mb(held)}, after close {fmt_mb(rss_bytes(proc.pid)[0])}"
              f"  ({json.dumps(got)})")

        lines = len(log_lines(base))
        attacker = probe("opens", mnt / "guest" / "Fill0000", str(GROUP))
        got = json.loads(attacker.stdout.readline())  # type: ignore[union-attr]
        cat = shell('cat "$1" >/dev/null', str(mnt / "external" / "X"))
        logged = len(log_lines(base)) - lines
        attacker.communicate("\n", timeout=600)
        print(f"2 opens   root's cat external/X: {cat}; {logged} log lines"
              f"  ({json.dumps(got)})")

        (mnt / "guest" / "Important").write_text("precious")
        attacker = probe("budget", mnt / "guest", str(GROUP))
        got = json.loads(attacker.stdout.readline())  # type: ignore[union-attr]
        member = shell('echo new > "$1"', str(mnt / "guest" / "Important"), groups=str(GROUP))
        root = shell('echo x > "$1"', str(mnt / "guest" / "RootKey"))
        attacker.communicate("\n", timeout=600)
        time.sleep(1)  # the member's RELEASE: figures only
        seen = host(src, base, "get", "guest", "Important")
        print(f"3 budget  member's echo new > Important: {member}; host sees Important:"
              f" {seen!r}; root's echo > guest/RootKey: {root}  ({json.dumps(got)})")
        all_lines = log_lines(base)
        print(f"4 log     {len(all_lines)} lines in all,"
              f" {sum('Traceback' in line for line in all_lines)} tracebacks")
    finally:
        stop_process(proc)
        lazy_unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
