"""`kvpfs recover PATH` on a path a user controls (issue 18, item 10, first suspicion).

Root's recover looks at mountinfo, then unmounts. If it unmounted by path, a user who owns
a directory on that path could swap it for a symlink in between and send root's
umount2(MNT_FORCE/MNT_DETACH) to any other mount. The race is made deterministic here: the
mount is listed first, then nobody swaps the directory for real (rename + symlink), then
recover acts on what it listed. The decoy mount must stay, and the kvpfs mount at its
new place is still freed by a second, fresh recover.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvpfs import mountinfo, recovery
from tests.conftest import requires_fuse
from tests.support.fusewedge import silent_fuse_mount
from tests.support.hostile import as_user, user_dir

pytestmark = requires_fuse


def test_recover_never_follows_a_path_swapped_after_its_check(tmp_path: Path):
    decoy = tmp_path / "decoy"
    (decoy / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "decoy", str(decoy / "mnt")],
                   check=True)
    with user_dir() as base:
        lair = base / "d"
        as_user(["mkdir", "-p", str(lair / "mnt")]).check_returncode()
        fd = silent_fuse_mount(lair / "mnt")  # root's wedged kvpfs, in nobody's directory
        try:
            where = mountinfo.canonical_mountpoint(lair / "mnt")
            listed = [e for e in mountinfo.kvpfs_entries() if e.point == where]
            assert len(listed) == 1
            # nobody swaps its directory for a symlink to the decoy's parent.
            swap = as_user(["sh", "-c", f"mv {lair} {base}/moved && ln -s {decoy} {lair}"])
            assert swap.returncode == 0, swap.stderr
            done = recovery.recover_mounts(where, listed)
            assert os.path.ismount(decoy / "mnt"), done  # the decoy is untouched
            assert any("left alone" in line for line in done), done
            # The wedged mount, now at its new place, is still recoverable as such.
            freed = recovery.recover(base / "moved" / "mnt")
            assert any("unmounted" in line for line in freed), freed
            assert not [e for e in mountinfo.kvpfs_entries(anyones=True)
                        if e.mount_id == listed[0].mount_id]
        finally:
            os.close(fd)
            subprocess.run(["umount", "-l", str(base / "moved" / "mnt")], capture_output=True)
            subprocess.run(["umount", "-l", str(decoy / "mnt")], capture_output=True)


def test_recover_skips_a_mount_stacked_on_top_after_its_check(tmp_path: Path):
    """Another mount stacked on the path after the look: the descriptor would be on it,
    so recover leaves it alone rather than unmount what it never checked."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = silent_fuse_mount(mnt)
    try:
        where = mountinfo.canonical_mountpoint(mnt)
        listed = [e for e in mountinfo.kvpfs_entries() if e.point == where]
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "top", str(mnt)], check=True)
        done = recovery.recover_mounts(where, listed)
        assert any("left alone" in line for line in done), done
        assert os.path.ismount(mnt) and "top" in Path("/proc/self/mounts").read_text()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # the tmpfs
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # the wedge
        os.close(fd)
