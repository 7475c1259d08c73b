"""The root and the pool directories, through the mounted handlers without a mount.

lookup, getattr, readlink, opendir/readdir, statfs, and the refusals of
directory operations; the modes and owners the kernel enforces
(default_permissions) for each pool.
"""

from __future__ import annotations

import errno
import os
import stat

from kvpfs.fuse.nodes import DIR_INODES, EVENTS_INODE, EVENTS_NAME, LINK_INODES, ROOT_INODE
from kvpfs.fuse.operations import Permissions
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.storage.store import Origin
from kvpfs.wire import names
from kvpfs.wire.protocol import Pool
from tests.support.handlers import EXTERNAL_DIR, GUEST_DIR, Ctx, mounted_handlers, refused

POOL_NAMES = [pool.dirname.encode() for pool in Pool]


async def test_the_root_holds_the_pools_their_numbers_and_the_feed(m):
    """The feed opens by name but is not listed, so tree walkers never block on it."""
    listed = await m.list_dir(ROOT_INODE)
    assert sorted(listed) == sorted([*POOL_NAMES, *(str(int(p)).encode() for p in Pool)])
    for pool in Pool:
        attr = await m.ops.lookup(ROOT_INODE, pool.dirname.encode(), Ctx())
        assert attr.st_ino == DIR_INODES[pool] and stat.S_ISDIR(attr.st_mode)
        link = await m.ops.lookup(ROOT_INODE, str(int(pool)).encode(), Ctx())
        assert link.st_ino == LINK_INODES[pool] and stat.S_ISLNK(link.st_mode)
        assert await m.ops.readlink(link.st_ino, Ctx()) == pool.dirname.encode()
    feed = await m.ops.lookup(ROOT_INODE, EVENTS_NAME, Ctx())
    assert feed.st_ino == EVENTS_INODE and stat.S_ISREG(feed.st_mode)
    assert await refused(m.ops.lookup(ROOT_INODE, b"nothing", Ctx())) == errno.ENOENT
    assert await refused(m.ops.readlink(DIR_INODES[0], Ctx())) == errno.EINVAL


async def test_dot_and_dotdot_in_a_pool(m):
    assert (await m.ops.lookup(GUEST_DIR, b".", Ctx())).st_ino == GUEST_DIR
    assert (await m.ops.lookup(GUEST_DIR, b"..", Ctx())).st_ino == ROOT_INODE


async def test_a_pool_lists_its_keys_by_file_name(m):
    keys = [b"Plain", b"with/slash", b"%percent", b"k" * 300]
    for key in keys:
        await m.store.set(Pool.EXTERNAL, key, b"v", Origin.HOST)
    listed = await m.list_dir(EXTERNAL_DIR)
    assert sorted(listed) == sorted(names.key_to_name(k) for k in keys)
    for name in listed:  # each listed name can be looked up, as `ls -l` does
        attr = await m.ops.lookup(EXTERNAL_DIR, name, Ctx())
        assert stat.S_ISREG(attr.st_mode) and attr.st_size == 1
    assert await m.list_dir(DIR_INODES[Pool.AUTO_EXTERNAL]) == []


async def test_readdir_in_small_batches_gives_every_name_once(m):
    for i in range(25):
        await m.store.set(Pool.GUEST, f"key{i:02}".encode(), b"v", Origin.HOST)
    listed = await m.list_dir(GUEST_DIR, batch=4)
    assert sorted(listed) == [f"key{i:02}".encode() for i in range(25)]


async def test_pool_2_shows_the_intrinsic_values(m):
    listed = await m.list_dir(DIR_INODES[Pool.AUTO])
    assert sorted(listed) == sorted(k.encode() for k in INTRINSIC_KEYS)
    attr = await m.ops.lookup(DIR_INODES[Pool.AUTO], b"OSBuildNumber", Ctx())
    assert await m.read_file(attr.st_ino) == os.uname().release.encode()
    attr = await m.ops.lookup(DIR_INODES[Pool.AUTO], b"ProcessorArchitecture", Ctx())
    assert await m.read_file(attr.st_ino) == os.uname().machine.encode()


async def test_a_key_deleted_by_the_host_is_gone_from_lookup_and_listing(m):
    await m.store.set(Pool.EXTERNAL, b"Config", b"v", Origin.HOST)
    await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    await m.store.delete(Pool.EXTERNAL, b"Config", Origin.HOST)
    assert await refused(m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())) == errno.ENOENT
    assert await m.list_dir(EXTERNAL_DIR) == []


async def test_readdir_of_a_closed_handle_is_ebadf(m):
    fh = await m.ops.opendir(GUEST_DIR, Ctx())
    await m.ops.releasedir(fh)
    assert await refused(m.ops.readdir(fh, 0, 10)) == errno.EBADF


async def test_a_file_is_not_a_directory(m):
    ino = await m.write_file(b"Status", b"x")
    assert await refused(m.ops.opendir(ino, Ctx())) == errno.ENOTDIR
    assert await refused(m.ops.lookup(ino, b"x", Ctx())) == errno.ENOTDIR


async def test_directories_links_and_special_files_are_refused(m):
    """Links and special files never; directories only in guest/, where they are private
    (docs/tools.md, tested in test_fs_api)."""
    assert await refused(m.ops.mkdir(EXTERNAL_DIR, b"d", 0o755, Ctx())) == errno.EACCES
    for parent, error in ((GUEST_DIR, errno.EPERM), (EXTERNAL_DIR, errno.EACCES)):
        assert await refused(m.ops.symlink(parent, b"l", b"target", Ctx())) == error
        assert await refused(m.ops.mknod(parent, b"n", stat.S_IFIFO | 0o644, 0, Ctx())) \
            == error
    assert await refused(m.ops.rmdir(ROOT_INODE, b"guest", Ctx())) == errno.EACCES
    ino = await m.write_file(b"Status", b"x")
    assert await refused(m.ops.link(ino, GUEST_DIR, b"again", Ctx())) == errno.EPERM
    # The root holds only the pools.
    assert await refused(m.ops.create(ROOT_INODE, b"f", 0o644, os.O_WRONLY, Ctx())) \
        == errno.EACCES
    assert await refused(m.ops.unlink(ROOT_INODE, b"guest", Ctx())) == errno.EACCES


async def test_statfs_reports_no_figures(m):
    """Issue 18.9 / 16.5: record counts would tell any user when the host changes
    external/, and a full-looking filesystem sets off disk alerts."""
    before = await m.ops.statfs(Ctx(uid=1000, gid=1000))
    for i in range(3):
        await m.store.set(Pool.EXTERNAL, f"k{i}".encode(), b"v", Origin.HOST)
    st = await m.ops.statfs(Ctx(uid=1000, gid=1000))
    assert (st.f_blocks, st.f_files, st.f_bfree, st.f_ffree) == (0, 0, 0, 0)
    assert (before.f_blocks, before.f_files) == (st.f_blocks, st.f_files)
    assert st.f_namemax == names.NAME_MAX


async def test_modes_and_owners_by_pool_default(m):
    """What the kernel enforces: guest writable by its owner only, external root-only."""
    me = os.getuid()
    guest = await m.ops.getattr(GUEST_DIR, Ctx())
    assert stat.S_IMODE(guest.st_mode) == 0o755 and guest.st_uid == me
    external = await m.ops.getattr(EXTERNAL_DIR, Ctx())
    assert stat.S_IMODE(external.st_mode) == 0o500
    for pool in (Pool.AUTO, Pool.AUTO_EXTERNAL, Pool.AUTO_INTERNAL):
        assert stat.S_IMODE((await m.ops.getattr(DIR_INODES[pool], Ctx())).st_mode) == 0o555
    await m.store.set(Pool.EXTERNAL, b"Secret", b"v", Origin.HOST)
    secret = await m.ops.lookup(EXTERNAL_DIR, b"Secret", Ctx())
    assert stat.S_IMODE(secret.st_mode) == 0o400


async def test_a_guest_group_may_write_guest_and_no_one_else(tmp_path, monkeypatch):
    perm = Permissions(uid=0, gid=0, guest_gid=4242, external_readable=True)
    async with mounted_handlers(tmp_path / "pools", monkeypatch, perm) as m:
        guest = await m.ops.getattr(GUEST_DIR, Ctx())
        assert stat.S_IMODE(guest.st_mode) == 0o775 and guest.st_gid == 4242
        ino = await m.write_file(b"Status", b"x")
        attr = await m.ops.getattr(ino, Ctx())
        assert stat.S_IMODE(attr.st_mode) == 0o664 and attr.st_gid == 4242
        # Others read only; external readable by all here (--external-readable).
        external = await m.ops.getattr(EXTERNAL_DIR, Ctx())
        assert stat.S_IMODE(external.st_mode) == 0o555 and external.st_gid == 0


async def test_a_private_directory_chowned_then_removed_gives_back_its_makers_count(
        m, monkeypatch):
    """The count goes back to whoever it was taken from, whoever owns the directory at
    rmdir: else root's `chown -R root guest/` leaves a user unable to make one ever again."""
    from kvpfs.fuse import privatedirs
    from tests.support.handlers import Fields

    monkeypatch.setattr(privatedirs, "MAX_DIRS", 1)
    user = Ctx(uid=1000, gid=1000)
    made = await m.ops.mkdir(GUEST_DIR, b"Role.lock", 0o755, user)
    attr = await m.ops.getattr(made.st_ino, Ctx())
    attr.st_uid = 0
    await m.ops.setattr(made.st_ino, attr, Fields(update_uid=True), None, Ctx())
    await m.ops.rmdir(GUEST_DIR, b"Role.lock", Ctx())
    await m.ops.mkdir(GUEST_DIR, b"Role2.lock", 0o755, user)  # not ENOSPC
    await m.ops.rmdir(GUEST_DIR, b"Role2.lock", user)
    assert m.ops.dirs.quota.sum_all == 0
