"""Security of the pool files at start-up: modes, world-writable directories, symlinks.

Pool files carry secrets (pool 0 holds what the host's administrator pushes: user data,
keys). kvpfs creates them 0600 in a 0700 directory whatever the umask, keeps an existing
file's mode, and refuses to start (exit status 3, one clear message, no mount left behind)
on a world-writable pool directory or a symlinked pool file or pool directory, touching
nothing behind the symlink. (The non-root permission model with --allow-other is covered by
tests/test_permissions.py.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, KvpfsProcess, requires_fuse
from tests.support.safety import pool_file, record_figures, slot

pytestmark = requires_fuse

EXIT_UNAVAILABLE = 3


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def refused_start(tmp_path: Path, pool_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run `kvpfs mount` expecting it to refuse to start; never leave it running."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpfs", "mount", str(mnt), "--simulate", "--pool-dir",
         str(pool_dir), "--control", str(tmp_path / "control.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("kvpfs started although it should have refused to")
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert not os.path.ismount(mnt), "a refused start left a mount behind"
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_new_pool_files_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path):
    old = os.umask(0)  # the most permissive umask kvpfs can inherit
    try:
        kv = KvpfsProcess(tmp_path).start()
    finally:
        os.umask(old)
    try:
        assert kv.host("set", 0, "secret", "s3cr3t")["status"] == 0
        assert kv.host("set", 0, "other", "x")["status"] == 0
        assert kv.host("delete", 0, "secret")["status"] == 0  # a delete with a shift
        assert mode(kv.pools) == 0o700
        pool_modes = {pool: mode(pool_file(kv.pools, pool)) for pool in range(5)}
        assert pool_modes == dict.fromkeys(range(5), 0o600)
        assert mode(kv.control) == 0o600  # the control socket plays the host
        # Beside the pools, only the redo journals of the pools written to (0 by the test,
        # 3 by the simulated host's start-up push): private too, and empty between changes.
        journals = [f".kvpfs-journal.kvp_pool_{n}" for n in (0, 3)]
        assert sorted(p.name for p in kv.pools.iterdir()) == \
            [f".kvp_pool_{n}" for n in range(5)] + journals
        for name in journals:
            assert mode(kv.pools / name) == 0o600 and (kv.pools / name).stat().st_size == 0
    finally:
        kv.cleanup()
    record_figures("security: new files",
                   pool_files_0600=sum(m == 0o600 for m in pool_modes.values()),
                   journals_0600=len(journals), pool_dir_mode=f"{mode(kv.pools):04o}")


def test_existing_modes_are_kept_not_widened(tmp_path: Path):
    pools = tmp_path / "pools"
    pools.mkdir()
    os.chmod(pools, 0o750)
    pool_file(pools, 0).write_bytes(slot(b"k", b"v"))
    os.chmod(pool_file(pools, 0), 0o640)
    kv = KvpfsProcess(tmp_path).start()
    try:
        assert kv.host("set", 0, "k", "v2")["status"] == 0
        assert mode(pools) == 0o750
        assert mode(pool_file(pools, 0)) == 0o640
        assert mode(pool_file(pools, 1)) == 0o600  # created by kvpfs
    finally:
        kv.cleanup()


@pytest.mark.parametrize("dir_mode", [0o777, 0o1777, 0o703])
def test_world_writable_pool_directory_is_refused(tmp_path: Path, dir_mode: int):
    pools = tmp_path / "pools"
    pools.mkdir()
    os.chmod(pools, dir_mode)
    result = refused_start(tmp_path, pools)
    assert result.returncode == EXIT_UNAVAILABLE, result
    assert "world-writable" in result.stderr and str(pools) in result.stderr, result.stderr
    assert "chmod o-w" in result.stderr  # it says how to fix it
    assert list(pools.iterdir()) == [], "kvpfs created files in a directory it refused"
    assert mode(pools) == dir_mode  # and did not "fix" the mode behind the admin's back
    record_figures(f"security: world-writable dir {dir_mode:04o}",
                   exit_status=result.returncode, files_created=len(list(pools.iterdir())))


def test_symlinked_pool_file_is_refused(tmp_path: Path):
    pools = tmp_path / "pools"
    pools.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_bytes(slot(b"not", b"a pool"))
    target_mode = mode(target)
    pool_file(pools, 1).symlink_to(target)
    result = refused_start(tmp_path, pools)
    assert result.returncode == EXIT_UNAVAILABLE, result
    assert "symlink" in result.stderr and ".kvp_pool_1" in result.stderr, result.stderr
    assert target.read_bytes() == slot(b"not", b"a pool")
    assert mode(target) == target_mode  # not chmod-ed through the link either
    assert os.path.islink(pool_file(pools, 1))


def test_dangling_symlinked_pool_file_is_not_followed(tmp_path: Path):
    pools = tmp_path / "pools"
    pools.mkdir(mode=0o700)
    pool_file(pools, 0).symlink_to(tmp_path / "would-be-created")
    result = refused_start(tmp_path, pools)
    assert result.returncode == EXIT_UNAVAILABLE, result
    assert "symlink" in result.stderr, result.stderr
    assert not (tmp_path / "would-be-created").exists()


def test_symlinked_pool_directory_is_refused(tmp_path: Path):
    real = tmp_path / "real-pools"
    real.mkdir(mode=0o700)
    link = tmp_path / "pools"
    link.symlink_to(real)
    result = refused_start(tmp_path, link)
    assert result.returncode == EXIT_UNAVAILABLE, result
    assert "symlink" in result.stderr and str(link) in result.stderr, result.stderr
    assert list(real.iterdir()) == []
    record_figures("security: symlinked pool directory", exit_status=result.returncode,
                   files_created_behind_the_link=len(list(real.iterdir())))
