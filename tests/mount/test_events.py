"""The change feed (/.events) and `kvpfs wait`, through a real mount."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import encode_record
from tests.conftest import KvpfsProcess, requires_fuse
from tests.support.waiting import wait_for

pytestmark = requires_fuse


def read_lines(fd: int, count: int, timeout: float = 5.0) -> list[str]:
    """`count` lines from a non-blocking feed fd, waiting with poll()."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only got {data!r}"
        if not poller.poll(int(left * 1000)):
            continue
        try:
            data += os.read(fd, 4096)
        except BlockingIOError:
            continue
    return data.decode().splitlines()


@pytest.mark.fuse_poll  # select() on /.events
def test_feed_reports_host_mount_and_external_changes(kvpfs):
    fd = os.open(kvpfs.path(".events"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 4096)  # nothing yet
        assert select.select([fd], [], [], 0)[0] == []
        kvpfs.host("set", "external", "cloudstack-vm-userdata", "x")
        assert read_lines(fd, 1) == ["set external cloudstack-vm-userdata"]
        subprocess.run(["bash", "-c", f"echo ok > {kvpfs.path('guest', 'Status')}"], check=True)
        os.unlink(kvpfs.path("guest", "Status"))
        assert read_lines(fd, 2) == ["set guest Status", "delete guest Status"]
        kvpfs.host("set", "external", "a/b", "slash")
        assert read_lines(fd, 1) == ["set external a%2Fb"]
        with open(pool_path(kvpfs.pools, 1), "ab") as f:  # another program, cloud-init style
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(encode_record(b"from-cloud-init", b"1"))
        assert read_lines(fd, 1) == ["set guest from-cloud-init"]
    finally:
        os.close(fd)


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` holds a descriptor on `path`."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # a descriptor closed while we looked, or the process ended
        return False


def kernel_wait(pid: int) -> tuple[str, str]:
    """The process's state letter and where in the kernel it sleeps (wchan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return state, Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return "", ""


def blocked_reading(pid: int, feed: Path) -> bool:
    """The process has the feed open and waits in the kernel for kvpfs's answer to a read."""
    return has_open(pid, feed) and kernel_wait(pid) == ("S", "request_wait_answer")


def waiting_outside_fuse(pid: int) -> bool:
    """The process sleeps, and not for a FUSE answer: `kvpfs wait` between two looks
    (in poll on the feed, or in its 0.1 s sleep without poll support or without a mount)."""
    state, wchan = kernel_wait(pid)
    return state == "S" and wchan not in ("", "0", "request_wait_answer")


def test_each_open_gets_its_own_stream(kvpfs):
    first = os.open(kvpfs.path(".events"), os.O_RDONLY | os.O_NONBLOCK)
    second = os.open(kvpfs.path(".events"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        kvpfs.host("set", "external", "k", "v")
        assert read_lines(first, 1) == ["set external k"]
        assert read_lines(second, 1) == ["set external k"]
    finally:
        os.close(first)
        os.close(second)


def test_shell_loop_reads_the_feed(kvpfs):
    script = (
        f"while read op pool key; do echo \"$op|$pool|$key\"; "
        f"[ \"$key\" = done ] && break; done < {kvpfs.path('.events')}"
    )
    loop = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        # A stream starts empty at its open: the loop must be reading before the host sets.
        wait_for(lambda: blocked_reading(loop.pid, kvpfs.path(".events")), 10,
                 what="the shell loop blocked reading the feed")
        kvpfs.host("set", "external", "one", "1")
        kvpfs.host("delete", "external", "one")
        kvpfs.host("set", "guest", "done", "1")
        out, _ = loop.communicate(timeout=10)
    finally:
        loop.kill()
    assert out.splitlines() == ["set|external|one", "delete|external|one", "set|guest|done"]


def test_blocked_reader_does_not_stop_unmount(tmp_path):
    proc = KvpfsProcess(tmp_path).start()
    reader = subprocess.Popen(["cat", str(proc.path(".events"))], stdout=subprocess.PIPE)
    wait_for(lambda: blocked_reading(reader.pid, proc.path(".events")), 10,
             what="cat blocked reading the feed")
    assert proc.stop() == 0  # SIGTERM while `cat` is blocked in read
    reader.wait(10)


def test_blocked_reader_does_not_stop_external_umount(tmp_path):
    proc = KvpfsProcess(tmp_path).start()
    reader = subprocess.Popen(["cat", str(proc.path(".events"))], stdout=subprocess.PIPE)
    wait_for(lambda: blocked_reading(reader.pid, proc.path(".events")), 10,
             what="cat blocked reading the feed")
    subprocess.run(["umount", "-l", str(proc.mnt)], check=True)
    assert proc.proc.wait(15) == 0
    reader.kill()


def test_feed_is_read_only(kvpfs):
    with pytest.raises(OSError) as info:
        os.open(kvpfs.path(".events"), os.O_WRONLY)
    assert info.value.errno == errno.EACCES


def run_wait(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpfs", "wait", *args], capture_output=True,
                          text=True, timeout=timeout)


def start_wait(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvpfs", "wait", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def waiting_on_the_feed(waiter: subprocess.Popen, feed: Path) -> bool:
    """`kvpfs wait` has its feed open and has gone to sleep after its first look."""
    assert waiter.poll() is None, waiter.communicate()
    return has_open(waiter.pid, feed) and waiting_outside_fuse(waiter.pid)


def finish(waiter: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = waiter.communicate(timeout=20)
    finally:
        waiter.kill()
    return waiter.returncode, out, err


def test_wait_returns_when_the_host_sets_the_key(kvpfs):
    feed = kvpfs.path(".events")
    waiter = start_wait("external", "ignition.config", "--timeout", "10",
                        "--mount", str(kvpfs.mnt))
    wait_for(lambda: waiting_on_the_feed(waiter, feed), 10, what="kvpfs wait on the feed")
    kvpfs.host("set", "external", "ignition.config", "{}")
    status, out, err = finish(waiter)
    assert (status, out) == (0, "{}\n"), err


def test_wait_present_key_returns_at_once_and_changed_waits(kvpfs):
    kvpfs.host("set", "guest", "state", "one")
    result = run_wait("guest", "state", "--timeout", "5", "--mount", str(kvpfs.mnt))
    assert (result.returncode, result.stdout) == (0, "one\n")

    feed = kvpfs.path(".events")
    waiter = start_wait("guest", "state", "--changed", "--timeout", "10",
                        "--mount", str(kvpfs.mnt))
    # Asleep with the value "one" seen: it waits for the change, not for the key.
    wait_for(lambda: waiting_on_the_feed(waiter, feed), 10, what="kvpfs wait on the feed")
    assert waiter.poll() is None
    kvpfs.host("set", "guest", "state", "two")
    status, out, err = finish(waiter)
    assert (status, out) == (0, "two\n"), err


def test_wait_times_out_with_its_own_status(kvpfs):
    result = run_wait("external", "never", "--timeout", "0.5", "--mount", str(kvpfs.mnt))
    assert result.returncode == 124
    assert "timed out" in result.stderr


def test_wait_without_a_mount_watches_pool_files(tmp_path):
    pool_dir = tmp_path / "pools"
    pool_dir.mkdir(mode=0o700)
    waiter = start_wait("0", "cloudstack-vm-userdata", "--timeout", "10", "--pool-dir",
                        str(pool_dir))
    wait_for(lambda: waiter.poll() is None and waiting_outside_fuse(waiter.pid), 10,
             what="kvpfs wait asleep between two looks at the pool file")
    with open(pool_path(pool_dir, 0), "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(encode_record(b"cloudstack-vm-userdata", b"template=domP"))
    status, out, err = finish(waiter)
    assert (status, out) == (0, "template=domP\n"), err
