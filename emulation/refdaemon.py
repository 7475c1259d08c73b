"""Run the real Debian ``hv_kvp_daemon`` against the emulated device, in a private mount namespace.

The daemon hard-codes ``/dev/vmbus/hv_kvp`` and ``/var/lib/hyperv`` and logs through
``/dev/log``; on this machine none of them exists, and the host's /dev and /var/lib must not be
touched.  So the daemon is started as::

    unshare --mount --propagation private \\
        python -m emulation.refdaemon --ns-exec CONFIG -- /usr/sbin/hv_kvp_daemon -n

and the small Python step in between (``_ns_exec``) prepares its view of the file system with
mount(2) before it ``execv``\\s the daemon (``unshare`` does not fork, so the pid we hold is
the daemon's pid).  How a missing mount target such as ``/dev/vmbus/hv_kvp`` is made without
writing to the host:

1. a tmpfs is mounted on a staging directory (an empty directory in the test's temp dir);
2. every bind *source* (the FUSE device file, the pool dir, the log socket) is first bound
   into that staging tmpfs, so later steps cannot hide them;
3. for a target whose parent does not exist or is a shared host directory (``/dev``,
   ``/var/lib``), the nearest existing ancestor is "shadowed": it is recursively bound into
   the staging tmpfs, a fresh tmpfs (same mode and owner) is mounted over it, and every
   original entry is re-created on that tmpfs -- directories and files/devices/sockets as
   (recursive) bind mounts of the originals, symlinks as copies.  ``/dev/null``, ``/dev/pts``
   and friends therefore keep working, while new names like ``vmbus/`` live only in the
   namespace's tmpfs;
4. the staged sources are bound onto their targets and the staging tmpfs is detached.

Nothing is created outside the test's temp dir, so there is nothing to remove afterwards, and
everything vanishes with the namespace when the daemon exits.  An existing target (for example
``/var/lib/hyperv`` on a machine that has it) is simply bound over, which hides the original in
the namespace only.

The daemon's syslog output is captured through a datagram socket bound over ``/dev/log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emulation.kvphost import EmulatedHost

__all__ = ["REFERENCE_DAEMON", "RefDaemon", "ReferenceDaemonError", "run_reference_daemon"]

REFERENCE_DAEMON = "/usr/sbin/hv_kvp_daemon"
KVP_DEVICE = "/dev/vmbus/hv_kvp"
KVP_POOL_DIR = "/var/lib/hyperv"
SYSLOG_PATH = "/dev/log"
REPO_ROOT = Path(__file__).resolve().parents[1]

_MS_BIND = 0x1000
_MS_REC = 0x4000
_MNT_DETACH = 2
_SUN_PATH_MAX = 107
# "<14>Nov 21 23:24:11 KVP: message" -> "KVP: message"
_SYSLOG_PREFIX = re.compile(rb"^<\d+>(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d )?")


class ReferenceDaemonError(RuntimeError):
    """The reference daemon could not be started or died early."""


# ---------------------------------------------------------------------- inside the namespace


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    rc = libc.mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target} ({fstype}): {os.strerror(err)}")


def _umount_detach(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2(os.fsencode(target), _MNT_DETACH)


def _make_node(path: str, is_dir: bool) -> None:
    """An empty directory or regular file to serve as a bind-mount target."""
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))


class _NamespaceBuilder:
    """Creates bind targets anywhere without writing to shared directories (see module doc)."""

    def __init__(self, stage_root: str) -> None:
        self.stage_root = stage_root
        self.private: set[str] = set()  # directories that live on our own tmpfs
        self._count = 0

    def _stage(self, is_dir: bool) -> str:
        self._count += 1
        path = os.path.join(self.stage_root, f"s{self._count}")
        _make_node(path, is_dir)
        return path

    def stage_source(self, source: str) -> tuple[str, bool]:
        """Bind ``source`` into the staging tmpfs so shadowing cannot hide it."""
        is_dir = os.path.isdir(source)
        staged = self._stage(is_dir)
        _mount(source, staged, None, _MS_BIND)
        return staged, is_dir

    def shadow(self, directory: str) -> None:
        """Replace ``directory`` by a private tmpfs that mirrors its entries via bind mounts."""
        st = os.stat(directory)
        original = self._stage(True)
        _mount(directory, original, None, _MS_BIND | _MS_REC)
        mode = stat.S_IMODE(st.st_mode)
        _mount("tmpfs", directory, "tmpfs", 0, f"mode={mode:o},uid={st.st_uid},gid={st.st_gid}")
        for entry in os.scandir(original):
            src = entry.path
            dst = os.path.join(directory, entry.name)
            try:
                if entry.is_symlink():
                    os.symlink(os.readlink(src), dst)
                elif entry.is_dir(follow_symlinks=False):
                    _make_node(dst, True)
                    _mount(src, dst, None, _MS_BIND | _MS_REC)
                else:
                    _make_node(dst, False)
                    _mount(src, dst, None, _MS_BIND)
            except OSError as exc:  # one odd entry must not stop the daemon from starting
                print(f"refdaemon: cannot mirror {src}: {exc}", file=sys.stderr)
        self.private.add(directory)

    def ensure(self, path: str, is_dir: bool) -> None:
        """Make ``path`` exist (as a dir or file) in this namespace only."""
        path = os.path.normpath(path)
        if os.path.lexists(path) and not os.path.islink(path):
            return
        parent = os.path.dirname(path)
        self.ensure(parent, True)
        if parent not in self.private:
            self.shadow(parent)
        if os.path.islink(path):
            os.unlink(path)  # e.g. /dev/log -> /run/systemd/journal/dev-log
        if not os.path.lexists(path):
            _make_node(path, is_dir)
        if is_dir:
            self.private.add(path)


def _ns_exec(config: dict[str, Any], command: list[str]) -> None:
    """Runs inside ``unshare --mount``: set up the binds, then become the daemon."""
    stage_root = config["stage"]
    _mount("tmpfs", stage_root, "tmpfs", 0, "mode=700")
    builder = _NamespaceBuilder(stage_root)
    staged = [(builder.stage_source(src), dst) for src, dst in config["binds"]]
    for (source, is_dir), target in staged:
        builder.ensure(target, is_dir)
        _mount(source, target, None, _MS_BIND)
    _umount_detach(stage_root)
    os.chdir("/")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


# ---------------------------------------------------------------------- test side


@dataclass
class RefDaemon:
    """A running reference daemon."""

    proc: subprocess.Popen[bytes]
    pool_dir: Path
    output_path: Path
    _log: list[str] = field(default_factory=list)
    _log_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pool_file(self, pool: int) -> Path:
        return self.pool_dir / f".kvp_pool_{pool}"

    @property
    def log(self) -> list[str]:
        """Syslog messages so far, e.g. ``"KVP: KVP LIC Version: 3.1"``."""
        with self._log_lock:
            return list(self._log)

    def output(self) -> str:
        """stdout/stderr of the namespace helper and the daemon."""
        return self.output_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        """Wait for a syslog line containing ``needle``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log:
                if needle in line:
                    return line
            time.sleep(0.02)
        raise ReferenceDaemonError(f"no log line with {needle!r}; log: {self.log}")

    def _append_log(self, line: str) -> None:
        with self._log_lock:
            self._log.append(line)

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM, then SIGKILL; returns the exit status (negative for a signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def _syslog_reader(sock: socket.socket, daemon: RefDaemon, stop: threading.Event) -> None:
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        line = _SYSLOG_PREFIX.sub(b"", data).rstrip(b"\n\0")
        daemon._append_log(line.decode(errors="replace"))


@contextlib.contextmanager
def run_reference_daemon(
    device_path: str | os.PathLike[str],
    pool_dir: str | os.PathLike[str],
    host: EmulatedHost | None = None,
    *,
    start_timeout: float = 10.0,
    wait_registered: bool = True,
    daemon: str = REFERENCE_DAEMON,
) -> Iterator[RefDaemon]:
    """Start ``hv_kvp_daemon -n`` on ``device_path`` with ``pool_dir`` as /var/lib/hyperv.

    ``host`` is the emulator client used to wait for the handshake; without one, the control
    socket is found through the device file's xattr.  With ``wait_registered=False`` the
    context is entered as soon as the process runs (for tests of failing handshakes).
    On exit the daemon gets SIGTERM, then SIGKILL.
    """
    from emulation.kvphost import EmulatedHost, control_socket_of

    if not os.access(daemon, os.X_OK):
        raise ReferenceDaemonError(f"{daemon} not installed (apt-get install hyperv-daemons)")
    device_path = os.path.abspath(device_path)
    pool = Path(pool_dir).resolve()
    pool.mkdir(parents=True, exist_ok=True)
    own_host = host is None
    if host is None:
        host = EmulatedHost(control_socket_of(device_path))
    work = Path(tempfile.mkdtemp(prefix="kvpref-"))  # short: sun_path is 108 bytes
    stop = threading.Event()
    log_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log_path = work / "log"
    log_sock.bind(str(log_path))
    stage = work / "stage"
    stage.mkdir()
    config = {
        "stage": str(stage),
        "binds": [
            (device_path, KVP_DEVICE),
            (str(pool), KVP_POOL_DIR),
            (str(log_path), SYSLOG_PATH),
        ],
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    output_path = pool.parent / f"{pool.name}.refdaemon.out"
    handshakes_before = host.state()["handshakes"]
    args = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        sys.executable,
        "-m",
        "emulation.refdaemon",
        "--ns-exec",
        json.dumps(config),
        "--",
        daemon,
        "-n",
    ]
    with open(output_path, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    ref = RefDaemon(proc, pool, output_path)
    reader = threading.Thread(
        target=_syslog_reader, args=(log_sock, ref, stop), name="refdaemon-syslog", daemon=True
    )
    reader.start()
    try:
        if wait_registered:
            deadline = time.monotonic() + start_timeout
            while True:
                if not ref.alive():
                    raise ReferenceDaemonError(
                        f"hv_kvp_daemon exited with {proc.returncode}; log {ref.log};"
                        f" output:\n{ref.output()}"
                    )
                state = host.state()
                if state["registered"] and state["handshakes"] > handshakes_before:
                    break
                if time.monotonic() > deadline:
                    raise ReferenceDaemonError(
                        f"hv_kvp_daemon did not register within {start_timeout} s; state {state};"
                        f" log {ref.log}; output:\n{ref.output()}"
                    )
                with contextlib.suppress(Exception):
                    host.wait_for(0.1, registered=True, min_handshakes=handshakes_before + 1)
        yield ref
    finally:
        ref.stop()
        stop.set()
        reader.join(timeout=2)
        log_sock.close()
        if own_host:
            host.close()
        shutil.rmtree(work, ignore_errors=True)


def _main(argv: list[str]) -> int:
    """``--ns-exec CONFIG -- COMMAND...``: the in-namespace step (not for direct use)."""
    if len(argv) < 4 or argv[0] != "--ns-exec" or argv[2] != "--":
        print(
            "usage: python -m emulation.refdaemon --ns-exec CONFIG -- CMD...", file=sys.stderr
        )
        return 2
    _ns_exec(json.loads(argv[1]), argv[3:])
    return 1  # not reached: execv replaced us


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
