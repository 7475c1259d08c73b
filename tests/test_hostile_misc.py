"""Hostile and careless local users (issue 13, items 4, 9, 11, 12, 13).

* A stuck pool lock costs every queued writer (mount writes, host SETs) at most about one
  `--lock-timeout`, however many are queued, not one timeout each.
* Two mount points never share a control socket, and a live instance's socket is never taken.
* Log floods: a pool file replaced by a symlink, FIFO or directory, and a pool full of
  garbage, give a few lines, not one per poll or per record.
* A refused start creates nothing (no pool directory).
* `kvpfs host` takes `--mount`/`--control` before or after its subcommand.

All through real kvpfs processes, real mounts and the simulated host's real byte protocol.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvpfs.poolfile import encode_record, pool_path
from kvpfs.protocol import Status

from .conftest import REPO, KvpfsProcess, requires_fuse
from .support.figures import record_figure
from .support.waiting import wait_for

pytestmark = requires_fuse

# ---------------------------------------------------------------- item 4: stuck lock

# Changes the pool file (so kvpfs's watcher wants to re-read it), then holds a POSIX lock
# (as hv_kvp_daemon does) until told to let go.
CHANGE_AND_HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.pwrite(fd, bytes.fromhex(sys.argv[2]), os.fstat(fd).st_size)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_queued_writers_each_wait_at_most_one_lock_timeout(tmp_path: Path) -> None:
    timeout = 1.0
    writers = 6
    kv = KvpfsProcess(tmp_path, "--lock-timeout", f"{timeout:g}").start()
    holder = None
    try:
        assert kv.host("set", 1, "before", "1")["status"] == Status.S_OK
        record = encode_record(b"foreign", b"x").hex()
        holder = subprocess.Popen(
            [sys.executable, "-c", CHANGE_AND_HOLD, str(pool_path(kv.pools, 1)), record],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"
        time.sleep(0.3)  # let the watcher notice the change and start waiting for the lock

        results: dict[str, tuple[float, object]] = {}
        hosts = 2  # the (simulated) kernel passes host requests down one at a time
        start = threading.Barrier(writers + hosts + 1)

        def mount_writer(i: int) -> None:
            start.wait()
            began = time.monotonic()
            try:
                with open(kv.path("guest", f"w{i}"), "w") as f:
                    f.write(f"value {i}")
                outcome: object = "stored"
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, exc.errno)
            results[f"mount writer {i}"] = (time.monotonic() - began, outcome)

        def host_setter(i: int) -> None:
            start.wait()
            began = time.monotonic()
            answer = kv.host("set", 1, f"from-host-{i}", "v")
            results[f"host SET {i}"] = (time.monotonic() - began, f"0x{answer['status']:08X}")

        threads = [threading.Thread(target=mount_writer, args=(i,)) for i in range(writers)]
        threads += [threading.Thread(target=host_setter, args=(i,)) for i in range(hosts)]
        for thread in threads:
            thread.start()
        start.wait()
        for thread in threads:
            thread.join(60)
        for name, (took, outcome) in sorted(results.items()):
            print(f"{name}: {took:.2f} s, {outcome}")
            record_figure("stuck lock, queued writers", f"{name} seconds", round(took, 2))
        assert len(results) == writers + hosts
        for name, (took, outcome) in results.items():
            if name.startswith("host SET"):
                assert outcome == f"0x{Status.E_FAIL:08X}", (name, outcome)
            else:
                assert outcome == "EBUSY", (name, outcome)
            assert took < 2 * timeout, (
                f"{name} waited {took:.2f} s for a {timeout:g} s lock timeout: {results}")

        holder.stdin.close()  # the lock goes with the holder
        assert holder.wait(5) == 0
        assert kv.host("set", 1, "after", "2")["status"] == Status.S_OK
        (kv.path("guest", "w0")).write_text("stored later")
        assert kv.path("guest", "w0").read_text() == "stored later"
        wait_for(lambda: kv.path("guest", "foreign").exists(), what="the foreign record")
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        kv.cleanup()


# ---------------------------------------------------------------- item 13: `kvpfs host` options

def kvpfs_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvpfs", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_host_takes_mount_and_control_before_or_after_its_subcommand(tmp_path: Path) -> None:
    kv = KvpfsProcess(tmp_path).start()
    try:
        mnt, ctl = str(kv.mnt), str(kv.control)
        for i, argv in enumerate([
            ["host", "--mount", mnt, "set", "guest", "k0", "v0"],
            ["host", "set", "guest", "k1", "v1", "--mount", mnt],
            ["host", "set", "--control", ctl, "guest", "k2", "v2"],
            ["host", "set", "guest", "k3", "v3", "--control", ctl],
        ]):
            result = kvpfs_cli(*argv)
            assert result.returncode == 0, (argv, result.stderr)
            assert kv.path("guest", f"k{i}").read_text() == f"v{i}"
        result = kvpfs_cli("host", "get", "guest", "k1", "--mount", mnt)
        assert (result.returncode, result.stdout) == (0, "v1\n"), result.stderr
        result = kvpfs_cli("host", "list", "guest", "--json", "--control", ctl)
        assert result.returncode == 0, result.stderr
        assert '"k3"' in result.stdout
        result = kvpfs_cli("host", "delete", "guest", "k0", "--mount", mnt)
        assert result.returncode == 0, result.stderr
        assert not kv.path("guest", "k0").exists()
        # ip get/set: the simulated kernel answers (an unknown adapter), not argparse (exit 2).
        for argv in (["host", "ip", "set", "{00000000-0000-0000-0000-000000000000}",
                      "--ip", "192.0.2.1", "--mask", "24", "--mount", mnt],
                     ["host", "ip", "--mount", mnt, "set",
                      "{00000000-0000-0000-0000-000000000000}", "--ip", "192.0.2.1",
                      "--mask", "24"],
                     ["host", "--mount", mnt, "ip", "set",
                      "{00000000-0000-0000-0000-000000000000}"]):
            result = kvpfs_cli(*argv)
            assert result.returncode == 1 and "GUID_NOTFOUND" in result.stderr, (
                argv, result.returncode, result.stderr)
        result = kvpfs_cli("host", "ip", "get", "00:00:5E:00:53:01", "--control", ctl)
        assert result.returncode == 1, (result.returncode, result.stderr)  # no such adapter
        assert "unrecognized" not in result.stderr
        # The last one given wins, wherever it is.
        result = kvpfs_cli("host", "--mount", str(tmp_path / "nowhere"), "get", "guest", "k1",
                           "--mount", mnt)
        assert (result.returncode, result.stdout) == (0, "v1\n"), result.stderr
    finally:
        kv.cleanup()
