"""Guest keys' metadata through the handlers (kvpfs.fuse.durable, docs/tools.md §6), built
as mounted (`build_filesystem`) on real pool files: a chmod is on disk when it is answered,
a damaged file shows keys owner-only, records of keys that are gone are dropped."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest

from kvpfs.fuse.nodes import DIR_INODES
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.mount import build_filesystem
from kvpfs.storage.keymeta import FILE_NAME, KeyMetaFile
from kvpfs.storage.store import Origin, Store
from kvpfs.wire.protocol import Pool
from tests.support.handlers import Ctx, Fields

GUEST_DIR = DIR_INODES[Pool.GUEST]


async def mounted(pools):
    store = Store(pools, lock_timeout=0.5)
    await store.open()
    return store, build_filesystem(store, Intrinsics(FqdnCache())).operations


async def test_chmod_is_on_disk_when_answered(tmp_path):
    store, ops = await mounted(tmp_path / "pools")
    try:
        await store.set(Pool.GUEST, b"Secret", b"s3cret", Origin.HOST)
        attr = await ops.lookup(GUEST_DIR, b"Secret", Ctx())
        attr.st_mode = stat.S_IFREG | 0o600
        await ops.setattr(attr.st_ino, attr, Fields(update_mode=True), None, Ctx())
        records = KeyMetaFile(tmp_path / "pools").load().records
        assert records[b"Secret"].mode == 0o600
    finally:
        store.close()


async def test_a_damaged_file_shows_keys_owner_only(tmp_path):
    pools = tmp_path / "pools"
    store, ops = await mounted(pools)
    await store.set(Pool.GUEST, b"Key", b"v", Origin.HOST)
    store.close()
    (pools / FILE_NAME).write_bytes(b"\x00garbage")
    store, ops = await mounted(pools)
    try:
        attr = await ops.lookup(GUEST_DIR, b"Key", Ctx())
        assert stat.S_IMODE(attr.st_mode) == 0o600
    finally:
        store.close()


async def test_keys_of_a_damaged_file_stay_owner_only_after_the_next_save(tmp_path):
    """A damaged file (garbage, or the empty file a power loss can leave after a save that
    was not synced) may have held `chmod 600`: the keys it covered stay owner-only across
    the saves and restarts that follow, not only until the first save."""
    pools = tmp_path / "pools"
    store, ops = await mounted(pools)
    for key in (b"Secret", b"Other"):
        await store.set(Pool.GUEST, key, b"v", Origin.HOST)
    store.close()
    (pools / FILE_NAME).write_bytes(b"")
    store, ops = await mounted(pools)
    try:
        attr = await ops.lookup(GUEST_DIR, b"Other", Ctx())
        attr.st_mode = stat.S_IFREG | 0o644  # the user widens one key on purpose: a save
        await ops.setattr(attr.st_ino, attr, Fields(update_mode=True), None, Ctx())
    finally:
        store.close()
    store, ops = await mounted(pools)
    try:
        secret = await ops.lookup(GUEST_DIR, b"Secret", Ctx())
        assert stat.S_IMODE(secret.st_mode) == 0o600
        other = await ops.lookup(GUEST_DIR, b"Other", Ctx())
        assert stat.S_IMODE(other.st_mode) == 0o644
    finally:
        store.close()


async def test_records_of_keys_gone_are_dropped_and_a_rename_moves_the_record(tmp_path):
    pools = tmp_path / "pools"
    store, ops = await mounted(pools)
    info, attr = await ops.create(GUEST_DIR, b"A", 0o600, os.O_WRONLY | os.O_CREAT, Ctx())
    await ops.write(info.fh, 0, b"a\n")
    await ops.release(info.fh)
    info, _ = await ops.create(GUEST_DIR, b"Gone", 0o600, os.O_WRONLY | os.O_CREAT, Ctx())
    await ops.write(info.fh, 0, b"g\n")
    await ops.release(info.fh)
    await ops.rename(GUEST_DIR, b"A", GUEST_DIR, b"B", 0, Ctx())
    assert set(KeyMetaFile(pools).load().records) == {b"B", b"Gone"}
    store.close()
    # Deleted while kvpfs was not running: its record goes with the next save.
    store = Store(pools, lock_timeout=0.5)
    await store.open()
    await store.delete(Pool.GUEST, b"Gone", Origin.OTHER_PROGRAM)
    store.close()
    store, ops = await mounted(pools)
    try:
        attr = await ops.lookup(GUEST_DIR, b"B", Ctx())
        assert stat.S_IMODE(attr.st_mode) == 0o600
        info = await ops.open(attr.st_ino, os.O_RDONLY, Ctx())
        assert await ops.read(info.fh, 0, 10) == b"a\n"  # the written form, kept
        await ops.release(info.fh)
        attr.st_mode = stat.S_IFREG | 0o640
        await ops.setattr(attr.st_ino, attr, Fields(update_mode=True), None, Ctx())
        assert set(KeyMetaFile(pools).load().records) == {b"B"}
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.lookup(GUEST_DIR, b"Gone", Ctx())
        assert info.value.errno == errno.ENOENT
    finally:
        store.close()


async def test_a_chmod_that_cannot_be_saved_is_not_answered_as_done(tmp_path):
    """chmod 600 answered 0 while the record failed to save would show the key 0644 again
    after a restart: the caller must hear that it is not on disk."""
    pools = tmp_path / "pools"
    store, ops = await mounted(pools)
    try:
        await store.set(Pool.GUEST, b"Secret", b"s3cret", Origin.HOST)
        (pools / (FILE_NAME + ".new")).mkdir()  # the save's temporary file cannot be made
        attr = await ops.lookup(GUEST_DIR, b"Secret", Ctx())
        attr.st_mode = stat.S_IFREG | 0o600
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.setattr(attr.st_ino, attr, Fields(update_mode=True), None, Ctx())
        assert info.value.errno == errno.EISDIR
        assert b"Secret" not in KeyMetaFile(pools).load().records
        # ...and the refused chmod is not shown either: the key is as it was.
        assert stat.S_IMODE((await ops.getattr(attr.st_ino, Ctx())).st_mode) == 0o644
        (pools / (FILE_NAME + ".new")).rmdir()
        await ops.setattr(attr.st_ino, attr, Fields(update_mode=True), None, Ctx())
        assert KeyMetaFile(pools).load().records[b"Secret"].mode == 0o600
    finally:
        store.close()
