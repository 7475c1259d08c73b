"""Unprivileged attackers for the hostile-user tests: `nobody` with or without the guest group.

Every attack runs as a real unprivileged process (setpriv), never as root pretending:
the kernel's checks (default_permissions, fusermount3's rules, /proc's) are part of
what is tested.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import parse_pool
from tests.support.waiting import wait_for

if TYPE_CHECKING:
    from tests.conftest import KvpfsProcess

REPO = Path(__file__).resolve().parent.parent.parent
NOBODY = 65534


@contextlib.contextmanager
def group_mount(group: int, prefix: str = "kvpfs-hostile18-") -> Iterator[KvpfsProcess]:
    """root's kvpfs with --allow-other and `group` as its guest group, in a directory every
    user can reach (pytest's tmp_path is root's only)."""
    from tests.conftest import KvpfsProcess

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    proc = KvpfsProcess(base, "--allow-other", "--guest-group", str(group)).start()
    try:
        yield proc
    finally:
        proc.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def log_lines(kv: KvpfsProcess) -> int:
    return len(kv.output().splitlines())


def host_value(kv: KvpfsProcess, key: str) -> str | None:
    return dict(kv.host("list", "guest")["items"]).get(key)


def pool_value(kv: KvpfsProcess, key: str) -> bytes | None:
    records, _ = parse_pool(pool_path(kv.pools, 1).read_bytes())
    found = [r.value for r in records if r.key == key.encode()]
    return found[-1] if found else None


def root_works(kv: KvpfsProcess) -> None:
    """Root's reads and writes through the mount, and the host sees the write."""
    kv.host("set", "external", "RootProbe", "from-host")
    assert kv.path("external", "RootProbe").read_text() == "from-host"
    assert "RootProbe" in os.listdir(kv.path("external"))
    key = unique("root")
    done = subprocess.run(["sh", "-c", 'echo "$1" > "$2"', "sh", "root-value",
                           str(kv.path("guest", key))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert host_value(kv, key) == "root-value"
    assert kv.path("guest", key).read_text() == "root-value\n"


def user_argv(argv: list[str], *, groups: tuple[int, ...] = (), nofile: int | None = None,
              uid: int = NOBODY) -> list[str]:
    """argv run as nobody, with exactly `groups` as supplementary groups (none by default:
    a user with no groups at all); `nofile` raises its descriptor limit first (as an admin
    may have, and as many processes of one user add up to anyway)."""
    group_opt = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    if nofile:  # up to the hard limit (raising that needs CAP_SYS_RESOURCE)
        nofile = min(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    limit = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
    return [*limit, "setpriv", f"--reuid={uid}", f"--regid={uid}", group_opt, "--", *argv]


def as_user(argv: list[str], *, groups: tuple[int, ...] = (), timeout: float = 120,
            stdin: str | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(user_argv(argv, groups=groups), capture_output=True, text=True,
                          timeout=timeout, cwd="/", input=stdin, env=env)


def system_python() -> str:
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def user_python(script: str, *args: str, groups: tuple[int, ...] = (), timeout: float = 120,
                ) -> subprocess.CompletedProcess[str]:
    """A Python probe as the user (the system python3: standard library only)."""
    return as_user([system_python(), "-c", script, *args], groups=groups, timeout=timeout)


class Holder:
    """A probe, run as the user, that takes resources, prints one JSON line saying what it
    got, holds them until told to let go (a line on its stdin), then prints a last line."""

    def __init__(self, script: str, *args: str, groups: tuple[int, ...] = (),
                 nofile: int | None = None, uid: int = NOBODY) -> None:
        self.proc = subprocess.Popen(
            user_argv([system_python(), "-c", script, *args], groups=groups, nofile=nofile,
                      uid=uid),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/")

    def held(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the probe ended: {self.proc.stderr.read()}")  # type: ignore
        return dict(json.loads(line))

    def release(self) -> str:
        out, err = self.proc.communicate("go\n", timeout=300)
        assert self.proc.returncode == 0, err
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def user_dir(prefix: str = "kvpfs-hostile-") -> Iterator[Path]:
    """A fresh directory the user owns (pytest's tmp_path is out of its reach)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fd_limit() -> int:
    """The most descriptors one process may hold here (its hard limit)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def mounted_on(path: Path) -> list[dict[str, str]]:
    """The mounts whose mount point is `path`, topmost last (fstype, owner's user_id)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[4] == str(path):
            options = dict(o.partition("=")[::2] for o in fields[sep + 3].split(","))
            found.append({"id": fields[0], "fstype": fields[sep + 1],
                          "user_id": options.get("user_id", "")})
    return found


class UserKvpfs:
    """`kvpfs mount --simulate` run by nobody through fusermount3: a user's own kvpfs."""

    def __init__(self, base: Path, mnt: Path | None = None) -> None:
        self.base = base
        self.mnt = mnt if mnt is not None else base / "mnt"
        self.control = base / "control.sock"
        self.log = base / "kvpfs.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, must_mount: bool = True, timeout: float = 20) -> UserKvpfs:
        if self.mnt.parent == self.base and not self.mnt.exists():
            self.mnt.mkdir()
            os.chown(self.mnt, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.base)}
        with open(self.log, "wb") as log:
            os.chown(self.log, NOBODY, NOBODY)
            self.proc = subprocess.Popen(
                user_argv([sys.executable, "-m", "kvpfs", "mount", str(self.mnt), "--simulate",
                           "--pool-dir", str(self.base / "pools"),
                           "--control", str(self.control)]),
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        if must_mount:
            wait_for(self._ready, timeout, what=f"nobody's kvpfs on {self.mnt}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nobody's kvpfs exited with {self.proc.returncode}:\n"
                                 f"{self.output()}")
        return self.control.exists() and any(m["fstype"] == "fuse.kvpfs"
                                              and m["user_id"] == str(NOBODY)
                                              for m in mounted_on(self.mnt))

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 5
        while any(m["user_id"] == str(NOBODY) for m in mounted_on(self.mnt)) \
                and time.monotonic() < deadline:
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)


_ONLY_THESE = r"""
import os, subprocess, sys
sep = sys.argv.index("--")
keep, argv = set(sys.argv[1:sep]), sys.argv[sep + 1:]
with open("/proc/self/mountinfo") as f:
    points = [line.split()[4] for line in f if " - fuse.kvpfs " in line]
for point in reversed(points):
    if point not in keep:
        subprocess.run(["umount", "-l", point], capture_output=True)
os.execvp(argv[0], argv)
"""


def with_only_these_mounts(argv: list[str], keep: list[Path]) -> list[str]:
    """argv run in a mount namespace of its own where the only kvpfs mounts are `keep`:
    other tests on the machine may have theirs, and `kvpfs wait`/`host` refuse to choose
    between several. Detaching them there leaves them alone everywhere else."""
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
            _ONLY_THESE, *map(str, keep), "--", *argv]


_STUCK_SERVER = r"""
import array, os, signal, socket, struct, subprocess, sys, time
mnt = sys.argv[1]
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
subprocess.run(["fusermount3", "-o", "fsname=stuck,subtype=userfs", "--", mnt], check=True,
               env={"_FUSE_COMMFD": str(theirs.fileno()), "PATH": "/usr/bin:/bin"},
               pass_fds=[theirs.fileno()])
fds = array.array("i")
_, anc, _, _ = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
fds.frombytes(anc[0][2][: fds.itemsize])
dev = fds[0]
request = os.read(dev, 1 << 21)  # FUSE_INIT: answer it, then never anything else
length, opcode, unique = struct.unpack_from("<IIQ", request)
assert opcode == 26, opcode
init_out = struct.pack("<IIIIHHIIHHI28x", 7, 31, 65536, 0, 16, 12, 65536, 1, 0, 0, 0)
os.write(dev, struct.pack("<IiQ", 16 + len(init_out), 0, unique) + init_out)
child = os.fork()
if child == 0:
    signal.signal(signal.SIGUSR1, lambda *_: None)
    os.stat(mnt)  # a GETATTR nobody answers: waits in request_wait_answer
    os._exit(0)
print(child, flush=True)
sys.stdin.readline()
os.kill(child, signal.SIGKILL)
"""


class StuckInOwnFuse:
    """A user's process blocked in a request on the user's *own* FUSE mount, which answers
    FUSE_INIT and then nothing: with a signal sent, it sits in request_wait_answer in
    state D with the signal pending, as long as this lasts."""

    def __init__(self, base: Path) -> None:
        self.mnt = base / "userfs"
        self.mnt.mkdir()
        os.chown(self.mnt, NOBODY, NOBODY)
        self.proc = subprocess.Popen(user_argv([system_python(), "-c", _STUCK_SERVER,
                                                str(self.mnt)]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.pid = int(self.proc.stdout.readline())
        wait_for(lambda: Path(f"/proc/{self.pid}/wchan").read_text() == "request_wait_answer",
                 10, what="the user's process to wait in its own FUSE mount")

    def interrupt(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

        def pending() -> bool:
            status = dict(line.split(":", 1) for line in
                          Path(f"/proc/{self.pid}/status").read_text().splitlines())
            pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
            return status["State"].strip().startswith("D") and pending != 0
        wait_for(pending, 10, what="the user's process in D with its signal pending")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("go\n", timeout=30)
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
