"""Root's commands and a user's own kvpfs mount (issue 18, item 6).

Any user can mount a `fuse.kvpfs` filesystem of their own through fusermount3. Root's
`kvpfs wait`, `kvpfs host` and `kvpfs status` must neither pick it (its values are the
user's to make up, its control socket the user's to choose) nor refuse to choose because
of it. Here nobody runs a real `kvpfs mount --simulate` beside root's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvpfs import mountinfo
from tests.conftest import REPO, KvpfsProcess, requires_fuse
from tests.support.hostile import NOBODY, UserKvpfs, as_user, user_dir, with_only_these_mounts

pytestmark = requires_fuse


def kvpfs_cli(*args: str, mounts: list[Path]) -> subprocess.CompletedProcess[str]:
    """Root's `kvpfs ARGS` where `mounts` are the only kvpfs mounts (see
    `with_only_these_mounts`)."""
    argv = with_only_these_mounts([sys.executable, "-m", "kvpfs", *args], mounts)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def users_mount():
    with user_dir() as base:
        mount = UserKvpfs(base).start()
        try:
            mount_set = as_user([sys.executable, "-m", "kvpfs", "host", "--control",
                                 str(mount.control), "set", "external", "Ready", "spoofed"])
            assert mount_set.returncode == 0, mount_set.stderr
            yield mount
        finally:
            mount.stop()


def test_mountinfo_tells_whose_mount_it_is(kvpfs: KvpfsProcess, users_mount: UserKvpfs):
    everyone = {e.point: e.owner for e in mountinfo.kvpfs_entries(anyones=True)}
    assert everyone[kvpfs.mnt] == 0
    assert everyone[users_mount.mnt] == NOBODY
    assert kvpfs.mnt in mountinfo.kvpfs_mounts()
    assert users_mount.mnt not in mountinfo.kvpfs_mounts()  # root does not trust it


def test_root_commands_use_roots_mount_beside_a_users_own(kvpfs: KvpfsProcess,
                                                         users_mount: UserKvpfs):
    kvpfs.host("set", "external", "Ready", "real")
    both = [kvpfs.mnt, users_mount.mnt]
    waited = kvpfs_cli("wait", "external", "Ready", "--timeout", "10", mounts=both)
    assert (waited.returncode, waited.stdout.strip()) == (0, "real"), waited.stderr
    listed = kvpfs_cli("host", "list", "external", mounts=both)
    assert listed.returncode == 0, listed.stderr
    assert "real" in listed.stdout and "spoofed" not in listed.stdout
    status = kvpfs_cli("status", "--json", "--pool-dir", str(kvpfs.pools), mounts=both)
    points = [m["mountpoint"] for m in json.loads(status.stdout)["kvpfs_mounts"]]
    assert str(kvpfs.mnt) in points and str(users_mount.mnt) not in points


def test_root_never_talks_to_a_users_mount_alone(users_mount: UserKvpfs, tmp_path: Path):
    # Root's commands see no kvpfs to use: the user's control socket is never called.
    alone = [users_mount.mnt]
    listed = kvpfs_cli("host", "list", "external", mounts=alone)
    assert listed.returncode != 0 and "spoofed" not in listed.stdout
    assert "no running kvpfs" in listed.stderr, listed.stderr
    # `kvpfs wait` on pool files (none here): never the user's mount and its EACCES.
    waited = kvpfs_cli("wait", "--pool-dir", str(tmp_path), "external", "Ready",
                       "--timeout", "1", mounts=alone)
    assert waited.returncode == 124, (waited.returncode, waited.stdout, waited.stderr)
    assert "spoofed" not in waited.stdout and "Permission denied" not in waited.stderr
    # The path of a key in the user's mount is not a kvpfs key to root.
    by_path = kvpfs_cli("wait", str(users_mount.mnt / "external" / "Ready"), "--timeout", "1",
                       mounts=alone)
    assert by_path.returncode != 0 and "spoofed" not in by_path.stdout


def test_a_user_still_uses_their_own_mount(users_mount: UserKvpfs):
    mine = as_user([sys.executable, "-m", "kvpfs", "host", "--mount", str(users_mount.mnt),
                    "get", "external", "Ready"])
    assert mine.returncode == 0 and "spoofed" in mine.stdout, mine.stderr
