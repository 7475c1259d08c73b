"""A guest-group member's mounts over guest/ or a key in it (issue 18, item 5).

fusermount3 allows a user to mount on a directory they may write to that is not a sticky
directory of someone else, and on a regular file they may open for writing; it allows
mounts inside FUSE filesystems. So a member of --guest-group can mount over guest/ and over
guest/ReadyAck, where root's units write. Each case runs the real fusermount3 (or a whole
`kvpfs mount --simulate`) as nobody with the guest group; the mount must be refused, or
undone before it matters: none of nobody's mounts is left, root's `ls guest` and
`echo x > guest/ReadyAck` work and the host sees the value.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import KvpfsProcess, requires_fuse
from tests.support.figures import record_figure
from tests.support.hostile import (
    NOBODY,
    Holder,
    UserKvpfs,
    as_user,
    group_mount,
    host_value,
    log_lines,
    mounted_on,
    root_works,
    system_python,
    user_argv,
)
from tests.support.waiting import wait_for

pytestmark = requires_fuse

GROUP = 4249
MEMBER = (GROUP,)


@pytest.fixture
def mount():
    with group_mount(GROUP, "kvpfs-mounts18-") as proc:
        yield proc


USER_FUSERMOUNT = r"""
import array, os, socket, subprocess, sys
target = sys.argv[1]
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
done = subprocess.run(["fusermount3", "-o", "fsname=usermount,subtype=kvpfs", "--", target],
                      env={"_FUSE_COMMFD": str(theirs.fileno()), "PATH": "/usr/bin:/bin"},
                      pass_fds=[theirs.fileno()], capture_output=True, text=True)
theirs.close()
fd = None
if done.returncode == 0:
    fds = array.array("i")
    msg, anc, _, _ = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in anc:
        fds.frombytes(data[: fds.itemsize])
        fd = fds[0]
print(done.returncode, done.stderr.strip().replace("\n", " "), flush=True)
sys.stdin.readline()  # hold the connection (and so the mount) until told
"""


def user_mount_over(kv: KvpfsProcess, target: Path) -> tuple[Holder, str]:
    holder = Holder.__new__(Holder)
    holder.proc = subprocess.Popen(
        user_argv([system_python(), "-c", USER_FUSERMOUNT, str(target)], groups=MEMBER),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.proc.stdout is not None
    return holder, holder.proc.stdout.readline().strip()


def users_mounts_in(kv: KvpfsProcess, path: Path) -> list[dict[str, str]]:
    return [m for m in mounted_on(path) if m["user_id"] == str(NOBODY)]


@pytest.mark.parametrize("what", ["guest/", "guest/ReadyAck"])
def test_a_members_mount_over_guest_is_refused_or_undone(mount, what):
    target = mount.path(*what.strip("/").split("/"))
    if what.endswith("ReadyAck"):
        target.write_text("before")
    holder, said = user_mount_over(mount, target)
    try:
        record_figure("test_a_members_mount_over_guest_is_refused_or_undone",
                      f"fusermount3 over {what} as a member", int(said.split()[0]))
        # Refused by fusermount3, or undone by kvpfs: either way none is left...
        wait_for(lambda: not users_mounts_in(mount, target), 10,
                 what=f"no mount of nobody's left on {target} (fusermount3 said: {said})")
        # ...and root's `ls guest` and `echo x > guest/ReadyAck` work, as the unit expects.
        assert "ReadyAck" in os.listdir(mount.path("guest")) or what == "guest/"
        done = subprocess.run(["sh", "-c", 'echo ready > "$1"', "sh",
                               str(mount.path("guest", "ReadyAck"))],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert host_value(mount, "ReadyAck") == "ready"
    finally:
        holder.kill()
        for _ in users_mounts_in(mount, target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


MANY_MOUNTS = r"""
import array, os, socket, subprocess, sys
mounted = 0
for target in sys.argv[1:]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    done = subprocess.run(["fusermount3", "-o", "fsname=usermount,subtype=kvpfs", "--",
                           target], env={"_FUSE_COMMFD": str(theirs.fileno()),
                                         "PATH": "/usr/bin:/bin"},
                          pass_fds=[theirs.fileno()], capture_output=True)
    theirs.close()
    if done.returncode == 0:
        mounted += 1
        fds = array.array("i")
        _, anc, _, _ = ours.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
        fds.frombytes(anc[0][2][: fds.itemsize])
        os.close(fds[0])
    ours.close()
print(mounted)
"""


def test_a_storm_of_mounts_over_keys_is_undone_in_few_log_lines(mount):
    keys = [mount.path("guest", f"Cover{i:02d}") for i in range(40)]
    for key in keys:
        key.write_text("v")
    before = log_lines(mount)
    done = as_user([system_python(), "-c", MANY_MOUNTS, *map(str, keys)], groups=MEMBER)
    assert done.returncode == 0, done.stderr
    record_figure("test_a_storm_of_mounts_over_keys_is_undone_in_few_log_lines",
                  "member's mounts over keys that fusermount3 made", int(done.stdout))
    for key in keys:
        wait_for(lambda k=key: not users_mounts_in(mount, k), 10,
                 what=f"nobody's mount on {key} to be undone")
    lines = log_lines(mount) - before
    record_figure("test_a_storm_of_mounts_over_keys_is_undone_in_few_log_lines",
                  "log lines", lines)
    assert lines < 25
    root_works(mount)


def test_a_members_kvpfs_over_guest_is_refused_or_undone(mount):
    """The reviewer's attack as it was run: `kvpfs mount GUEST --simulate` as a member."""
    with tempfile.TemporaryDirectory(prefix="kvpfs-hostile18-u-") as base:
        os.chown(base, NOBODY, NOBODY)
        users = UserKvpfs(Path(base), mnt=mount.path("guest")).start(must_mount=False)
        try:
            wait_for(lambda: not users_mounts_in(mount, mount.path("guest")), 15,
                     what="nobody's kvpfs over guest/ to be refused or undone")
            root_works(mount)
        finally:
            users.stop()
