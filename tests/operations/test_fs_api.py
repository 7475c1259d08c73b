"""The mounted handlers called directly, without a mount (the s3ql way): FUSE semantics.

Built by kvpfs.mount.build_filesystem, as mounted (the echo seam included).
"""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest

from kvpfs.fuse import events
from kvpfs.fuse.operations import DIR_INODES, EVENTS_INODE
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.mount import build_filesystem
from kvpfs.storage.store import Origin, Store
from tests.support.handlers import Ctx, Fields

GUEST_DIR = DIR_INODES[1]
EXTERNAL_DIR = DIR_INODES[0]


@pytest.fixture
async def ops(tmp_path, monkeypatch):
    store = Store(tmp_path / "pools", lock_timeout=0.5)
    await store.open()
    operations = build_filesystem(store, Intrinsics(FqdnCache())).operations
    listing: list[tuple[bytes, int]] = []

    def fake_reply(token, name, attr, next_id):
        listing.append((name, next_id))
        return len(listing) < token

    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_reply)
    operations.listing = listing
    yield operations
    store.close()


async def write_file(ops, name: bytes, data: bytes) -> int:
    info, attr = await ops.create(GUEST_DIR, name, 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    await ops.write(info.fh, 0, data)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    return attr.st_ino


async def list_dir(ops, inode: int, batch: int = 1000) -> list[bytes]:
    fh = await ops.opendir(inode, Ctx())
    names, start = [], 0
    while True:
        ops.listing.clear()
        await ops.readdir(fh, start, batch)
        if not ops.listing:
            break
        names += [name for name, _ in ops.listing]
        start = ops.listing[-1][1]
        if len(ops.listing) < batch:
            break
    await ops.releasedir(fh)
    return names


async def test_create_write_commit_and_read_back(ops):
    ino = await write_file(ops, b"Status", b"Ready\n")
    assert ops.store.get(1, b"Status") == b"Ready"
    info = await ops.open(ino, os.O_RDONLY, Ctx())
    # Read what you wrote: the newline the pool does not keep is still shown.
    assert await ops.read(info.fh, 0, 100) == b"Ready\n"
    await ops.release(info.fh)
    attr = await ops.lookup(GUEST_DIR, b"Status", Ctx())
    assert attr.st_ino == ino and attr.st_size == 6
    # A change from elsewhere shows the value as it is.
    await ops.store.set(1, b"Status", b"Done", Origin.HOST)
    attr = await ops.lookup(GUEST_DIR, b"Status", Ctx())
    assert attr.st_size == 4


@pytest.mark.log_errors('unexpected error in lookup')
async def test_unexpected_error_becomes_eio(ops, monkeypatch):
    def boom(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.store, "get", boom)
    await ops.store.set(1, b"k", b"v", Origin.HOST)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.lookup(GUEST_DIR, b"k", Ctx())
    assert info.value.errno == errno.EIO


async def test_readdir_never_skips_or_repeats_while_keys_change(ops):
    for i in range(20):
        await ops.store.set(0, f"key{i:02}".encode(), b"v", Origin.HOST)
    fh = await ops.opendir(EXTERNAL_DIR, Ctx())
    ops.listing.clear()
    await ops.readdir(fh, 0, 7)
    first = list(ops.listing)
    # the host deletes and adds keys between two readdir calls
    await ops.store.delete(0, b"key00", Origin.HOST)
    await ops.store.set(0, b"late", b"v", Origin.HOST)
    ops.listing.clear()
    await ops.readdir(fh, first[-1][1], 1000)
    seen = [name for name, _ in first] + [name for name, _ in ops.listing]
    assert len(seen) == len(set(seen))
    assert {f"key{i:02}".encode() for i in range(20)} <= set(seen)
    await ops.releasedir(fh)
    assert b"key00" not in await list_dir(ops, EXTERNAL_DIR)
    assert b"late" in await list_dir(ops, EXTERNAL_DIR)


async def test_inode_numbers_are_never_reused(ops):
    first = await write_file(ops, b"a", b"1")
    await ops.unlink(GUEST_DIR, b"a", Ctx())
    await ops.forget([(first, 1)])
    second = await write_file(ops, b"a", b"2")
    assert second != first


async def test_unlinked_but_open_file_keeps_working_and_is_not_republished(ops):
    ino = await write_file(ops, b"gone", b"value")
    info = await ops.open(ino, os.O_RDWR, Ctx())
    await ops.unlink(GUEST_DIR, b"gone", Ctx())
    assert await ops.read(info.fh, 0, 100) == b"value"
    await ops.write(info.fh, 0, b"new")
    await ops.flush(info.fh)
    await ops.release(info.fh)
    assert ops.store.get(1, b"gone") is None
    attr = await ops.getattr(ino, Ctx())
    assert attr.st_nlink == 0


async def test_append_ignores_the_kernels_offset(ops):
    ino = await write_file(ops, b"log", b"abc")
    await ops.store.set(1, b"log", b"abcdefgh", Origin.HOST)  # changed behind the cache
    info = await ops.open(ino, os.O_WRONLY | os.O_APPEND, Ctx())
    await ops.write(info.fh, 3, b"+")  # the kernel's stale idea of the end
    await ops.flush(info.fh)
    await ops.release(info.fh)
    assert ops.store.get(1, b"log") == b"abcdefgh+"


async def test_open_that_only_truncates_publishes_at_release(ops):
    ino = await write_file(ops, b"t", b"full")
    info = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, Ctx())
    await ops.flush(info.fh)  # a shell's first close after dup2: nothing written yet
    assert ops.store.get(1, b"t") == b"full"
    await ops.release(info.fh)
    assert ops.store.get(1, b"t") == b""


async def test_truncate_by_path_and_by_handle(ops):
    ino = await write_file(ops, b"cut", b"abcdef")
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 2
    await ops.setattr(ino, attr, Fields(update_size=True), None, Ctx())
    assert ops.store.get(1, b"cut") == b"ab"
    info = await ops.open(ino, os.O_WRONLY, Ctx())
    attr.st_size = 1
    await ops.setattr(ino, attr, Fields(update_size=True), info.fh, Ctx())
    await ops.flush(info.fh)
    await ops.release(info.fh)
    assert ops.store.get(1, b"cut") == b"a"


async def test_rename_noreplace_and_exchange(ops):
    await write_file(ops, b"a", b"1")
    await write_file(ops, b"b", b"2")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.rename(GUEST_DIR, b"a", GUEST_DIR, b"b", pyfuse3.RENAME_NOREPLACE, Ctx())
    assert info.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.rename(GUEST_DIR, b"a", GUEST_DIR, b"b", pyfuse3.RENAME_EXCHANGE, Ctx())
    assert info.value.errno == errno.EINVAL
    await ops.rename(GUEST_DIR, b"a", GUEST_DIR, b"b", 0, Ctx())
    assert ops.store.get(1, b"a") is None and ops.store.get(1, b"b") == b"1"


async def test_mkdir_and_friends_have_clear_errors(ops):
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.symlink(GUEST_DIR, b"l", b"target", Ctx())
    assert info.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(EXTERNAL_DIR, b"d", 0o755, Ctx())
    assert info.value.errno == errno.EACCES


async def test_guest_directories_are_private_empty_and_bounded(ops, monkeypatch):
    from kvpfs.fuse import privatedirs

    monkeypatch.setattr(privatedirs, "MAX_DIRS", 2)
    monkeypatch.setattr(privatedirs, "ROOT_DIRS", 0)  # root's headroom (issue 18)
    made = await ops.mkdir(GUEST_DIR, b"Role.lock", 0o755, Ctx())
    assert made.st_mode & 0o170000 == 0o040000
    assert b"Role.lock" in await list_dir(ops, GUEST_DIR)
    assert ops.store.get(1, b"Role.lock") is None  # never a key
    for call in (ops.create(made.st_ino, b"inside", 0o644, os.O_WRONLY | os.O_CREAT, Ctx()),
                 ops.mkdir(made.st_ino, b"sub", 0o755, Ctx())):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert info.value.errno in (errno.EPERM, errno.EACCES)
    await ops.mkdir(GUEST_DIR, b"Second", 0o755, Ctx())
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.mkdir(GUEST_DIR, b"Third", 0o755, Ctx())
    assert info.value.errno == errno.ENOSPC
    await ops.rmdir(GUEST_DIR, b"Role.lock", Ctx())
    await ops.rmdir(GUEST_DIR, b"Second", Ctx())
    assert await list_dir(ops, GUEST_DIR) == []
    assert ops.store.states[1].unique_keys() is not None and not list(
        ops.store.states[1].unique_keys())


async def test_xattrs_give_the_raw_key(ops):
    await ops.store.set(0, b"a/b", b"v", Origin.HOST)
    attr = await ops.lookup(EXTERNAL_DIR, b"a%2Fb", Ctx())
    assert await ops.getxattr(attr.st_ino, b"user.kvp.key", Ctx()) == b"a/b"
    assert await ops.getxattr(attr.st_ino, b"user.kvp.pool", Ctx()) == b"0"
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getxattr(attr.st_ino, b"user.other", Ctx())
    assert info.value.errno == pyfuse3.ENOATTR


async def test_events_feed_filters_external_for_other_users(ops):
    root = await ops.open(EVENTS_INODE, os.O_RDONLY | os.O_NONBLOCK, Ctx())
    user = await ops.open(EVENTS_INODE, os.O_RDONLY | os.O_NONBLOCK, Ctx(uid=1000))
    await ops.store.set(0, b"secret-name", b"v", Origin.HOST)
    await ops.store.set(1, b"Status", b"v", Origin.HOST)
    assert await ops.read(root.fh, 0, 4096) == b"set external secret-name\nset guest Status\n"
    assert await ops.read(user.fh, 0, 4096) == b"set guest Status\n"
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.read(user.fh, 0, 4096)
    assert info.value.errno == errno.EAGAIN
    for handle in (root, user):
        await ops.release(handle.fh)


async def test_events_feed_overflow_is_reported_not_unbounded(ops, monkeypatch):
    monkeypatch.setattr(events, "EVENT_QUEUE_MAX", 3)
    feed = await ops.open(EVENTS_INODE, os.O_RDONLY | os.O_NONBLOCK, Ctx())
    for i in range(5):
        await ops.store.set(1, f"k{i}".encode(), b"v", Origin.HOST)
    data = await ops.read(feed.fh, 0, 4096)
    assert data.startswith(b"overflow - -\n")
    assert data.count(b"\n") <= 3
    await ops.release(feed.fh)
