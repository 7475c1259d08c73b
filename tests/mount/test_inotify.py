"""inotify on a real mount sees host changes and other programs' changes (issue 11.1).

Watched with the real `inotifywait` (inotify-tools): a new key gives IN_CREATE, a changed
value IN_MODIFY and IN_CLOSE_WRITE, a deleted key IN_DELETE (IN_DELETE_SELF on a watch of
the file), whether or not anybody looked the key up before. The echo that produces them
must change nothing the host sees or the pool files hold.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvpfs.storage.readonly import read_pool
from tests.conftest import REPO, KvpfsProcess, fuse_missing, skip_unless_ci
from tests.support.waiting import wait_for

RECORD_KEY, RECORD_VALUE = 512, 2048


class Watch:
    """`inotifywait -m` on some paths; its events as (watched path, events, name)."""

    def __init__(self, *paths: Path) -> None:
        self.proc = subprocess.Popen(
            ["inotifywait", "-m", "--format", "%w|%e|%f", *map(str, paths)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[tuple[str, set[str], str]] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(10):
            raise AssertionError("inotifywait did not establish its watches")

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            if "Watches established" in line:
                self._ready.set()

    def _read(self) -> None:
        for line in self.proc.stdout:
            path, events, name = line.rstrip("\n").split("|", 2)
            self.events.append((path, set(events.split(",")), name))

    def named(self, name: str) -> list[set[str]]:
        return [events for _, events, n in self.events if n == name]

    def wait(self, name: str, event: str, what: str = "") -> None:
        wait_for(lambda: any(event in e for e in self.named(name)), timeout=10,
                 what=what or f"{event} for {name} (seen: {self.events})")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def kvpfs(tmp_path):
    if fuse_missing():
        skip_unless_ci(fuse_missing())
    if shutil.which("inotifywait") is None:
        skip_unless_ci("inotifywait is missing (Debian package inotify-tools)")
    proc = KvpfsProcess(tmp_path).start()
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture
def watch(kvpfs):
    watches: list[Watch] = []

    def start(*paths: Path) -> Watch:
        watches.append(Watch(*paths))
        return watches[-1]

    yield start
    for w in watches:
        w.close()


def host_items(kvpfs: KvpfsProcess, pool: str) -> list[list[str]]:
    return kvpfs.host("list", pool)["items"]


def test_host_new_changed_and_deleted_key_never_looked_up(kvpfs, watch):
    w = watch(kvpfs.path("external"))
    assert kvpfs.host("set", "external", "Ready", "yes")["status"] == 0
    w.wait("Ready", "CREATE")
    w.wait("Ready", "CLOSE_WRITE")
    assert kvpfs.host("set", "external", "Ready", "still")["status"] == 0
    wait_for(lambda: sum("CLOSE_WRITE" in e for e in w.named("Ready")) >= 2, timeout=10,
             what=f"a second CLOSE_WRITE (seen: {w.events})")
    assert any("MODIFY" in e for e in w.named("Ready"))
    assert kvpfs.host("delete", "external", "Ready")["status"] == 0
    w.wait("Ready", "DELETE")
    assert sum("CREATE" in e for e in w.named("Ready")) == 1
    # The echo changed nothing but the events: the host's view and the pool file.
    assert host_items(kvpfs, "external") == []
    assert read_pool(kvpfs.pools, 0).last_wins() == {}


def test_host_changes_of_a_key_that_was_read(kvpfs, watch):
    w = watch(kvpfs.path("external"))
    kvpfs.host("set", "external", "Config", "one")
    w.wait("Config", "CLOSE_WRITE")  # its echo is done
    assert kvpfs.path("external", "Config").read_text() == "one"
    file_watch = watch(kvpfs.path("external", "Config"))
    w.events.clear()
    kvpfs.host("set", "external", "Config", "two, longer")
    w.wait("Config", "CLOSE_WRITE")
    file_watch.wait("", "MODIFY")
    assert kvpfs.path("external", "Config").read_text() == "two, longer"
    assert kvpfs.path("external", "Config").stat().st_mode & 0o777 == 0o400
    assert host_items(kvpfs, "external") == [["Config", "two, longer"]]
    kvpfs.host("delete", "external", "Config")
    w.wait("Config", "DELETE")
    file_watch.wait("", "DELETE_SELF")
    assert not kvpfs.path("external", "Config").exists()
    assert "CREATE" not in set().union(*w.named("Config"))


def test_changes_through_the_mount_are_not_echoed_twice(kvpfs, watch):
    w = watch(kvpfs.path("guest"))
    subprocess.run(["sh", "-c", f"echo Ready > {kvpfs.path('guest', 'Status')}"], check=True)
    kvpfs.host("set", "external", "marker", "x")  # an echo after ours, to wait for
    marker = watch(kvpfs.path("external"))
    kvpfs.host("set", "external", "marker", "y")
    marker.wait("marker", "CLOSE_WRITE")
    subprocess.run(["rm", str(kvpfs.path("guest", "Status"))], check=True)
    w.wait("Status", "DELETE")
    kvpfs.host("set", "external", "marker", "z")
    wait_for(lambda: sum("CLOSE_WRITE" in e for e in marker.named("marker")) >= 2, timeout=10,
             what="the second marker echo")
    assert sum("CREATE" in e for e in w.named("Status")) == 1
    assert sum("DELETE" in e for e in w.named("Status")) == 1
    assert host_items(kvpfs, "guest") == []


def test_changes_by_other_programs(kvpfs, watch):
    """`kvpfs set --pool-dir` and a cloud-init style append to the pool file."""
    w = watch(kvpfs.path("guest"), kvpfs.path("external"))
    subprocess.run([sys.executable, "-m", "kvpfs", "set", "guest", "FromTool", "v1",
                    "--pool-dir", str(kvpfs.pools)], check=True, cwd=REPO)
    w.wait("FromTool", "CREATE")
    subprocess.run([sys.executable, "-m", "kvpfs", "set", "guest", "FromTool", "v2",
                    "--pool-dir", str(kvpfs.pools)], check=True, cwd=REPO)
    wait_for(lambda: sum("CLOSE_WRITE" in e for e in w.named("FromTool")) >= 2, timeout=10,
             what=f"the change's CLOSE_WRITE (seen: {w.events})")
    assert kvpfs.path("guest", "FromTool").read_text() == "v2"
    record = b"Appended".ljust(RECORD_KEY, b"\0") + b"value".ljust(RECORD_VALUE, b"\0")
    with open(kvpfs.pools / ".kvp_pool_0", "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(record)
    w.wait("Appended", "CREATE")
    subprocess.run([sys.executable, "-m", "kvpfs", "rm", "guest", "FromTool",
                    "--pool-dir", str(kvpfs.pools)], check=True, cwd=REPO)
    w.wait("FromTool", "DELETE")
    assert host_items(kvpfs, "guest") == []
    assert host_items(kvpfs, "external") == [["Appended", "value"]]
    assert read_pool(kvpfs.pools, 1).last_wins() == {}


def test_many_changes_coalesce_and_end_in_the_right_state(kvpfs, watch):
    """Changes faster than the echo are merged per key; watchers end with the state."""
    w = watch(kvpfs.path("external"))
    kvpfs.host("set", "external", "k0", "first")
    w.wait("k0", "CLOSE_WRITE")
    for i in range(30):
        kvpfs.host("set", "external", f"k{i % 3}", f"v{i}")
    kvpfs.host("delete", "external", "k0")
    for key in ("k1", "k2"):
        w.wait(key, "CLOSE_WRITE")
    w.wait("k0", "DELETE")
    assert sorted(Path(kvpfs.path("external")).iterdir()) == [
        kvpfs.path("external", "k1"), kvpfs.path("external", "k2")]
    assert kvpfs.path("external", "k2").read_text() == "v29"
    assert dict(map(tuple, host_items(kvpfs, "external"))) == {"k1": "v28", "k2": "v29"}
    for key in ("k0", "k1", "k2"):
        assert sum("CREATE" in e for e in w.named(key)) == 1
        assert sum("CLOSE_WRITE" in e for e in w.named(key)) <= 11


def helper_pids(kvpfs: KvpfsProcess) -> list[int]:
    """The echo helper: a child of one of kvpfs's threads."""
    tasks = Path(f"/proc/{kvpfs.proc.pid}/task")
    children = [pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()]
    return [int(pid) for pid in children
            if b"kvpfs.fuse.echo_helper" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_the_echo_helper_holds_no_fuse_connection_and_dies_with_kvpfs(kvpfs, watch):
    """A SIGKILL of kvpfs must close /dev/fuse (aborting the helper's request) and end the
    helper: it is a separate process that never holds the FUSE device."""
    w = watch(kvpfs.path("external"))
    kvpfs.host("set", "external", "k", "v")
    w.wait("k", "CLOSE_WRITE")
    (helper,) = helper_pids(kvpfs)
    fds = [os.readlink(f"/proc/{helper}/fd/{fd}") for fd in os.listdir(f"/proc/{helper}/fd")]
    assert "/dev/fuse" not in fds, fds
    kvpfs.proc.kill()
    kvpfs.proc.wait(10)
    wait_for(lambda: not Path(f"/proc/{helper}").exists()
             or "Z" in Path(f"/proc/{helper}/stat").read_text().split()[2],
             timeout=10, what="the echo helper to end with kvpfs")


def test_a_new_key_listed_before_its_echo_still_gives_in_create(kvpfs, watch):
    """Someone lists or stats the key between the host's SET and the echo: the kernel then
    holds the name, and the echo must still make it raise IN_CREATE."""
    w = watch(kvpfs.path("external"))
    kvpfs.host("set", "external", "warm", "up")  # the helper is running
    w.wait("warm", "CLOSE_WRITE")
    (helper,) = helper_pids(kvpfs)
    os.kill(helper, signal.SIGSTOP)  # echoes wait (kvpfs gives one up after 5 s)
    try:
        kvpfs.host("set", "external", "Listed", "v")
        assert kvpfs.path("external", "Listed").stat().st_size == 1  # the kernel has it now
    finally:
        os.kill(helper, signal.SIGCONT)
    w.wait("Listed", "CREATE")
    w.wait("Listed", "CLOSE_WRITE")
    assert kvpfs.path("external", "Listed").read_text() == "v"
