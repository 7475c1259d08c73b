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
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvpfs import control
from kvpfs.quietlog import QuietLog
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import encode_record
from kvpfs.wire.protocol import Status
from tests.conftest import REPO, KvpfsProcess, requires_fuse
from tests.support.figures import record_figure
from tests.support.waiting import wait_for

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

        # The watcher, unable to re-read the changed pool, says so once, not at every poll.
        wait_for(lambda: "has stayed locked" in kv.output(), 5, what="the watcher's warning")
        holder.stdin.close()  # the lock goes with the holder
        assert holder.wait(5) == 0
        wait_for(lambda: "pool 1 can be read again" in kv.output(), 5, what="the re-read")
        said = [line for line in kv.output().splitlines() if "has stayed locked" in line]
        assert len([line for line in said if "repeated" not in line]) == 1, said
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


# ---------------------------------------------------------------- item 9: the right instance

def test_control_socket_names_are_unambiguous_readable_and_fit_sun_path() -> None:
    a = control.control_socket_name(Path("/a/x-y/mnt"))
    b = control.control_socket_name(Path("/a/x/y-mnt"))
    assert a != b
    assert (a, b) == ("a-x%2Dy-mnt.sock", "a-x-y%2Dmnt.sock")
    assert control.control_socket_name(Path("/run/kvp")) == "run-kvp.sock"
    assert control.control_socket_name(Path("/")) == "-.sock"
    assert control.control_socket_name(Path("/-")) == "%2D.sock"
    assert control.control_socket_name(Path("/root")) != control.control_socket_name(Path("/"))
    names = {control.control_socket_name(Path(p)) for p in (
        "/a/b%2Fc", "/a/b/c", "/a/b-c", "/a/b%2Dc", "/a/b~c", "/a b/c", "/a/bé")}
    assert len(names) == 7, names
    long_a = Path("/srv/" + "d" * 200 + "/mnt-1")
    long_b = Path("/srv/" + "d" * 200 + "/mnt-2")
    paths = [control.default_control_path(p) for p in (long_a, long_b)]
    assert paths[0] != paths[1]
    for path in paths:
        assert len(os.fsencode(path)) <= 107, path
        assert path.name.startswith("srv-ddd") and "~" in path.name, path


def start_default_control(base: Path, mnt: Path) -> subprocess.Popen[bytes]:
    """A simulated kvpfs that derives its control socket from its mount point."""
    mnt.mkdir(parents=True)
    log = open(base / f"{mnt.parent.name}-{mnt.name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpfs", "mount", str(mnt), "--simulate",
         "--pool-dir", str(base / f"pools-{mnt.parent.name}")],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()

    def ready() -> bool:
        assert proc.poll() is None, (base / f"{mnt.parent.name}-{mnt.name}.log").read_text()
        try:
            return bool(os.getxattr(mnt, control.CONTROL_XATTR))
        except OSError:
            return False

    wait_for(ready, 15, what=f"kvpfs on {mnt}")
    return proc


def stop(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


def test_mount_points_that_differ_by_dash_and_slash_get_their_own_instance(
        tmp_path: Path) -> None:
    mnt_a = tmp_path / "a" / "x-y" / "mnt"
    mnt_b = tmp_path / "a" / "x" / "y-mnt"
    procs = []
    try:
        procs.append((start_default_control(tmp_path, mnt_a), mnt_a))
        procs.append((start_default_control(tmp_path, mnt_b), mnt_b))
        sockets = [os.getxattr(m, control.CONTROL_XATTR).decode() for m in (mnt_a, mnt_b)]
        assert sockets[0] != sockets[1], sockets
        for value, mnt in (("for-a", mnt_a), ("for-b", mnt_b)):
            result = kvpfs_cli("host", "set", "external", "which", value, "--mount", str(mnt))
            assert result.returncode == 0, result.stderr
        assert (mnt_a / "external" / "which").read_text() == "for-a"
        assert (mnt_b / "external" / "which").read_text() == "for-b"
    finally:
        for proc, mnt in procs:
            stop(proc, mnt)
    assert not any(Path(s).exists() for s in sockets)  # each removed its own


def test_a_live_control_socket_is_never_taken_over(tmp_path: Path) -> None:
    first = KvpfsProcess(tmp_path / "first").start()
    try:
        other = tmp_path / "second"
        (other / "mnt").mkdir(parents=True)
        result = subprocess.run(
            [sys.executable, "-m", "kvpfs", "mount", str(other / "mnt"), "--simulate",
             "--pool-dir", str(other / "pools"), "--control", str(first.control)],
            capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 3, result.stderr
        assert "belongs to another running kvpfs" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (other / "pools").exists()  # refused before creating anything
        assert not os.path.ismount(other / "mnt")
        # The first instance still owns its socket and answers on it.
        assert first.host("set", "external", "still", "first")["status"] == Status.S_OK
        assert first.path("external", "still").read_text() == "first"
    finally:
        first.cleanup()
        # (Only if it started after all, as the old code did: leave no dead mount.)
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "second" / "mnt")],
                       check=False, capture_output=True)


def test_a_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    kv = KvpfsProcess(tmp_path)
    kv.control.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(kv.control))  # a socket left by a killed instance: nobody listens
    # KvpfsProcess.start removes the socket first; start by hand to keep it.
    kv.mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpfs", "mount", str(kv.mnt), "--simulate",
         "--pool-dir", str(kv.pools), "--control", str(kv.control)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        def mounted() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return os.path.ismount(kv.mnt)
        wait_for(mounted, 15, what="the mount")
        assert kv.host("set", "external", "k", "v")["status"] == Status.S_OK
    finally:
        stop(proc, kv.mnt)


# ---------------------------------------------------------------- item 12: refuse first

def test_refused_starts_create_no_pool_directory(tmp_path: Path) -> None:
    first = KvpfsProcess(tmp_path / "first").start()
    try:
        pools = tmp_path / "never-made"
        result = subprocess.run(
            [sys.executable, "-m", "kvpfs", "mount", str(first.mnt), "--simulate",
             "--pool-dir", str(pools), "--control", str(tmp_path / "c2")],
            capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 3, result.stderr
        assert "already mounted by a running kvpfs" in result.stderr
        assert not pools.exists()
        assert not (tmp_path / "c2").exists()
    finally:
        first.cleanup()
    (tmp_path / "mnt2").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "kvpfs", "mount", str(tmp_path / "mnt2"),
         "--device", str(tmp_path / "no-such-device"), "--pool-dir", str(pools),
         "--control", str(tmp_path / "c3")],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 3, result.stderr
    assert "not look like a Hyper-V guest" in result.stderr
    assert not pools.exists()
    assert not (tmp_path / "c3").exists()


# ---------------------------------------------------------------- item 11: no log floods

def lines_about(kv: KvpfsProcess, needle: str) -> list[str]:
    return [line for line in kv.output().splitlines() if needle in line]


def test_a_pool_file_replaced_by_a_symlink_fifo_or_directory_is_said_once(
        tmp_path: Path) -> None:
    kv = KvpfsProcess(tmp_path).start()
    try:
        broken = {0: "symlink", 3: "fifo", 4: "directory"}
        for pool, kind in broken.items():
            path = pool_path(kv.pools, pool)
            path.unlink()
            if kind == "symlink":
                path.symlink_to("/etc/hostname")
            elif kind == "fifo":
                os.mkfifo(path, 0o600)
            else:
                path.mkdir()
        for pool in broken:
            wait_for(lambda pool=pool: lines_about(kv, f"cannot reload pool {pool}"), 5,
                     what=f"the warning about pool {pool}")
        # The watcher polls four times a second: this spans several polls. (Waiting for
        # nothing to happen has no condition to wait on.)
        time.sleep(1.5)
        counts = {broken[pool]: len(lines_about(kv, pool_path(kv.pools, pool).name))
                  for pool in broken}
        print("log lines per broken pool file after 1.5 s:", counts)
        for kind, count in counts.items():
            record_figure("log flood", f"lines about a pool file that is a {kind}", count)
            assert count <= 2, (kind, count, kv.output()[-2000:])
        # Repaired: said once, with how often it recurred unsaid.
        for pool, kind in broken.items():
            path = pool_path(kv.pools, pool)
            if kind == "directory":
                path.rmdir()
            else:
                path.unlink()
        for pool in broken:
            wait_for(lambda pool=pool: lines_about(kv, f"pool {pool} can be read again"), 5,
                     what=f"pool {pool} repaired")
            summary = [line for line in lines_about(kv, f"cannot reload pool {pool}")
                       if "repeated" in line]
            assert len(summary) == 1, summary
        assert kv.host("set", 0, "after-repair", "ok")["status"] == Status.S_OK
    finally:
        kv.cleanup()


def test_a_pool_full_of_garbage_is_summarised_in_a_few_lines(tmp_path: Path) -> None:
    kv = KvpfsProcess(tmp_path)
    kv.pools.mkdir(mode=0o700)
    garbage = os.urandom(1 << 20)
    pool_path(kv.pools, 1).write_bytes(garbage)
    kv.start()
    try:
        (kv.path("guest", "fresh")).write_text("v")  # a change, and a reload after it
        items = kv.host("list", 1)["items"]
        assert ["fresh", "v"] in items
        lines = lines_about(kv, ".kvp_pool_1")
        print(f"{len(lines)} log lines about a 1 MB random pool:", *lines, sep="\n")
        record_figure("log flood", "lines about a 1 MB random pool file", len(lines))
        assert 1 <= len(lines) <= 3, lines
        assert any(" record(s) not valid UTF-8" in line for line in lines), lines
    finally:
        kv.cleanup()


def test_quietlog_says_once_reminds_and_summarises(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    quiet = QuietLog(logging.getLogger("kvpfs.test.quiet"), reminder=60.0,
                     clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="kvpfs.test.quiet"):
        for _ in range(241):  # a minute of polls, four a second
            now[0] += 0.25
            quiet.say("topic", logging.WARNING, "pool %d is a %s", 0, "symlink")
        assert [r.getMessage() for r in caplog.records] == [
            "pool 0 is a symlink",
            "pool 0 is a symlink (still so: 240 more time(s) in the last 60 s)"]
        caplog.clear()
        quiet.say("topic", logging.WARNING, "pool %d is a %s", 0, "fifo")  # it changed
        quiet.say("topic", logging.WARNING, "pool %d is a %s", 0, "fifo")
        quiet.say("other", logging.WARNING, "unrelated")
        assert quiet.clear("topic", "pool %d can be read again", 0)
        assert not quiet.clear("topic", "said nothing: no line")
        assert [r.getMessage() for r in caplog.records] == [
            "pool 0 is a fifo", "unrelated",
            "pool 0 is a fifo (repeated 1 more time(s) over 0 s)",
            "pool 0 can be read again"]
