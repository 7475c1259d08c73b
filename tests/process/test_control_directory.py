"""A non-root kvpfs's control socket without XDG_RUNTIME_DIR (issue 18, item 10, second
suspicion): it goes to a directory of the user's own, `$TMPDIR/kvpfs-UID`, and kvpfs
refuses to start if another user made that directory first (or made it a symlink), since
they could then replace the socket and answer `kvpfs host` themselves.

Each case runs a real `kvpfs mount --simulate` as nobody, with TMPDIR pointing at a fresh
sticky, world-writable directory, as /tmp is.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_fuse
from tests.support.hostile import NOBODY, mounted_on, user_argv, user_dir
from tests.support.waiting import wait_for

pytestmark = requires_fuse

OTHER_USER = 4245  # stands for another local user


@pytest.fixture
def shared_tmp(tmp_path: Path):
    """A /tmp of its own: root's, mode 1777."""
    with user_dir("kvpfs-tmpdir-") as base:
        os.chown(base, 0, 0)
        base.chmod(0o1777)
        yield base


def start_as_nobody(tmp: Path, mnt: Path) -> subprocess.Popen[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp)}
    return subprocess.Popen(
        user_argv([sys.executable, "-m", "kvpfs", "mount", str(mnt), "--simulate",
                   "--pool-dir", str(mnt.parent / "pools")]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)


def nobody_mnt(tmp: Path) -> Path:
    home = tmp / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    (home / "mnt").mkdir()
    os.chown(home / "mnt", NOBODY, NOBODY)
    return home / "mnt"


def test_the_default_socket_is_in_a_private_directory_of_the_user(shared_tmp: Path):
    mnt = nobody_mnt(shared_tmp)
    proc = start_as_nobody(shared_tmp, mnt)
    try:
        wait_for(lambda: proc.poll() is not None or any(
            m["user_id"] == str(NOBODY) for m in mounted_on(mnt)), 20, what="nobody's mount")
        assert proc.poll() is None, proc.communicate()[0]
        directory = shared_tmp / f"kvpfs-{NOBODY}"
        st = directory.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
        sockets = list(directory.iterdir())
        assert len(sockets) == 1 and stat.S_ISSOCK(sockets[0].lstat().st_mode)
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("planted", ["other users dir", "symlink", "group-writable"])
def test_a_directory_another_user_planted_is_refused(shared_tmp: Path, planted: str):
    directory = shared_tmp / f"kvpfs-{NOBODY}"
    if planted == "symlink":
        elsewhere = shared_tmp / "elsewhere"
        elsewhere.mkdir(mode=0o777)
        os.chown(elsewhere, OTHER_USER, OTHER_USER)
        directory.symlink_to(elsewhere)
    else:
        directory.mkdir()
        if planted == "other users dir":
            os.chown(directory, OTHER_USER, OTHER_USER)
            directory.chmod(0o777)
        else:  # nobody's own, but another group may write there
            os.chown(directory, NOBODY, OTHER_USER)
            directory.chmod(0o770)
    mnt = nobody_mnt(shared_tmp)
    proc = start_as_nobody(shared_tmp, mnt)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert proc.returncode != 0, out
    assert str(directory) in out and "another user could replace the socket" in out, out
    assert "Traceback" not in out
    assert not mounted_on(mnt)
    target = directory.resolve() if planted == "symlink" else directory
    assert not any(target.iterdir()), "nothing may be created there"
