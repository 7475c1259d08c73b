"""What a user learns about others through the mount, and `df` (issue 18 items 7 and 9;
issue 16 items 5 and 9).

* A user with no groups may not list external/ (0500 root): neither `statfs` (`df`, `stat
  -f`) nor external/'s own times, size or link count may move when the host sets or
  deletes keys there. Their stat asks kvpfs each time (`stat --cached=never`:
  AT_STATX_FORCE_SYNC), so the kernel's attribute cache cannot hide a change.
* `df` on the mount must not say 100 % full: sensible numbers, or none.
* A directory's mtime never lags behind a change made before `stat`.
* A user's process blocked in *its own* FUSE mount with a signal pending is not taken for
  root's interrupted reader of /.events (item 7).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvpfs import mountinfo
from tests.conftest import KvpfsProcess, requires_fuse
from tests.support.figures import record_figure
from tests.support.hostile import StuckInOwnFuse, as_user, group_mount, user_argv, user_dir
from tests.support.waiting import wait_for

pytestmark = requires_fuse

GROUP = 4247


@pytest.fixture
def mount():
    with group_mount(GROUP, "kvpfs-leaks18-") as proc:
        yield proc


def strangers_view(kv: KvpfsProcess) -> dict[str, str]:
    """What a user with no groups sees: statfs of the mount, and external/'s attributes,
    each asked of kvpfs (never from the kernel's cache)."""
    fs = as_user(["stat", "-f", "-c", "%b %f %a %c %d %S", str(kv.mnt)])
    assert fs.returncode == 0, fs.stderr
    ext = as_user(["stat", "--cached=never", "-c", "%s %h %.9X %.9Y %.9Z %i",
                   str(kv.path("external"))])
    assert ext.returncode == 0, ext.stderr
    listing = as_user(["ls", str(kv.path("external"))])
    assert listing.returncode != 0, "the stranger must not list external/ at all"
    return {"statfs": fs.stdout.strip(), "external": ext.stdout.strip()}


def host_does(kv: KvpfsProcess, op: str, key: str, value: str | None = None) -> None:
    kv.host(op, "external", key, value)
    path = kv.path("external", key)
    wait_for(lambda: path.exists() == (op == "set"), 10, what=f"root to see {op} {key}")


def test_a_stranger_learns_nothing_of_external_from_statfs_or_its_times(mount):
    before = strangers_view(mount)
    views = [before]
    for op, key, value in [("set", "Secret1", "a"), ("set", "Secret2", "b"),
                           ("delete", "Secret1", None)]:
        host_does(mount, op, key, value)
        views.append(strangers_view(mount))
    record_figure("test_a_stranger_learns_nothing_of_external_from_statfs_or_its_times",
                  "distinct statfs answers around SET, SET, DELETE",
                  len({v["statfs"] for v in views}))
    assert all(v == before for v in views), views


@pytest.mark.parametrize("inodes", [False, True], ids=["blocks", "inodes"])
def test_df_does_not_report_the_mount_full(mount, inodes):
    """Real `df` (coreutils), as root and as a user with no groups: it succeeds, and Use%
    is a number under 100 or `-` (no figures), for blocks and inodes."""
    mount.path("guest", "SomeKey").write_text("v\n")
    for runner in (lambda argv: subprocess.run(argv, capture_output=True, text=True),
                   as_user):
        argv = ["df", "-P", *(["-i"] if inodes else []), str(mount.mnt)]
        done = runner(argv)
        assert done.returncode == 0, done.stderr
        last = done.stdout.strip().splitlines()[-1].split()
        assert last[-1] == str(mount.mnt), done.stdout
        use = last[-2]
        assert use == "-" or int(use.rstrip("%")) < 100, done.stdout


def dir_mtime_ns(path: Path, cached: str) -> int:
    done = subprocess.run(["stat", f"--cached={cached}", "-c", "%.9Y", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().replace(".", ""))


def test_a_directory_mtime_never_lags_behind_a_change(mount):
    """Issue 16 item 9. A name created, removed or renamed moves guest/'s mtime at once,
    in what the kernel caches too; a new value does not move it (as on any filesystem),
    so what the kernel cached is never behind what kvpfs would answer."""
    guest = mount.path("guest")
    (guest / "Existing").write_text("v1\n")
    for change in ("create", "write", "host set", "delete", "rename", "host delete"):
        start_ns = time.time_ns()
        if change == "create":
            (guest / "Made").write_text("v\n")
        elif change == "write":
            before = dir_mtime_ns(guest, "never")
            (guest / "Existing").write_text("v2\n")
        elif change == "host set":
            mount.host("set", "guest", "FromHost", "v")
        elif change == "delete":
            (guest / "Made").unlink()
        elif change == "rename":
            (guest / "Moved").write_text("v\n")
            start_ns = time.time_ns()
            (guest / "Moved").rename(guest / "Renamed")
        else:
            mount.host("delete", "guest", "FromHost")
        # What `stat guest` right after the change shows: also from the kernel's cache for
        # a change through the mount; a host change reaches the kernel's cache a moment
        # later (queued invalidation), so only kvpfs's answer.
        answered = dir_mtime_ns(guest, "never")
        if change == "write":
            assert answered == before == dir_mtime_ns(guest, "default")
            continue
        assert answered >= start_ns - 1, (change, answered, start_ns)
        if not change.startswith("host"):
            assert dir_mtime_ns(guest, "default") == answered, change


READER = r"""
import os, signal, sys
class Interrupted(Exception):
    pass
def interrupted(*_):
    raise Interrupted  # else Python retries the read that ended with EINTR (PEP 475)
signal.signal(signal.SIGUSR1, interrupted)
try:
    os.read(int(sys.argv[1]), 4096)
    print("read")
except Interrupted:
    print("EINTR")
"""


def test_a_users_own_fuse_wait_is_not_taken_for_roots_interrupted_reader(mount):
    """Item 7: root's process opens /.events and hands it to a reader child; another of its
    children runs as a user whose process is stuck, signal pending, in the user's own FUSE
    mount. Only the wait on kvpfs's own feed counts as root's reader's."""
    from kvpfs.fuse.procview import ProcView

    feed = os.open(mount.path(".events"), os.O_RDONLY)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(feed)], pass_fds=[feed],
                              stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: Path(f"/proc/{reader.pid}/wchan").read_text()
                 == "request_wait_answer", 10, what="root's reader to wait on the feed")
        with user_dir() as base:
            stuck = StuckInOwnFuse(base)  # a descendant of this (the opening) process
            try:
                stuck.interrupt()
                device = [e.device for e in mountinfo.kvpfs_entries() if e.point == mount.mnt][-1]
                _, hits = ProcView(device=device).interrupted({(os.getpid(), None)}, True)
                assert hits == set(), "the user's own FUSE wait was blamed on root's reader"
            finally:
                stuck.stop()
        # The real interrupt of root's reader is still seen: its read ends with EINTR.
        reader.send_signal(signal.SIGUSR1)
        assert reader.communicate(timeout=30)[0].strip() == "EINTR"
    finally:
        reader.kill()
        reader.wait()
        os.close(feed)


def test_guest_inode_numbers_do_not_count_external_keys(mount):
    """A member numbering its own new files learns nothing of external/ from the gaps:
    the host adds and removes keys there (and root lists them) between two of its files,
    and the gap is the same as without."""
    guest = mount.path("guest")

    def member_creates(name: str) -> int:
        done = as_user(["sh", "-c", 'echo v > "$1" && stat -c %i "$1"', "sh",
                        str(guest / name)], groups=(GROUP,))
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    first, second = member_creates("InoA"), member_creates("InoB")
    for i in range(5):
        host_does(mount, "set", f"Hidden{i}", "x")
        os.listdir(mount.path("external"))
    host_does(mount, "delete", "Hidden0")
    third = member_creates("InoC")
    assert third - second == second - first


def test_a_strangers_inotify_sees_nothing_of_external(mount):
    """inotify on the whole tree, as a user with no groups: the host's changes to external/
    (echoed through the mount for inotify) show nothing; a later guest change does, and as
    echoes come in order, it marks that the external ones have passed."""
    watcher = subprocess.Popen(
        user_argv(["inotifywait", "-m", "-r", "--format", "%w%f %e", str(mount.mnt)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bound = threading.Timer(60, watcher.kill)  # a missing event ends the reads below
    bound.start()
    try:
        assert watcher.stderr is not None and watcher.stdout is not None
        while "Watches established" not in watcher.stderr.readline():
            assert watcher.poll() is None, "inotifywait ended"
        for i in range(3):
            host_does(mount, "set", f"Watched{i}", "x")
        host_does(mount, "delete", "Watched0")
        mount.host("set", "guest", "AfterExternal", "x")
        seen = []
        while not any("AfterExternal" in line for line in seen):
            line = watcher.stdout.readline()
            assert line, "inotifywait ended"
            seen.append(line.strip())
        assert not [line for line in seen if "/external" in line], seen
    finally:
        bound.cancel()
        watcher.kill()
        watcher.wait()
