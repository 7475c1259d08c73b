"""Value files through the mounted handlers without a mount: what each call stores.

create/write/flush/release publishing a value, O_TRUNC, O_APPEND, unlink,
rename, setattr (chmod, truncate), and the refusals (EFBIG, ENOSPC, EACCES,
EINVAL, EILSEQ), each checked against the real store and pool files.
"""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest

from kvpfs.fuse import unpublished
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import KEY_FIELD, RECORD_SIZE
from kvpfs.storage.store import Origin
from kvpfs.wire import limits
from kvpfs.wire.protocol import Pool
from tests.support.handlers import EXTERNAL_DIR, GUEST_DIR, Ctx, Fields, refused

GUEST = Pool.GUEST


def pool_file_records(m, pool: int) -> list[tuple[bytes, bytes]]:
    """The records of a pool file, read as hv_kvp_daemon reads them."""
    data = pool_path(m.store.pool_dir, pool).read_bytes()
    return [(data[i:i + KEY_FIELD].split(b"\0")[0],
             data[i + KEY_FIELD:i + RECORD_SIZE].split(b"\0")[0])
            for i in range(0, len(data), RECORD_SIZE)]


def setattr_size(size: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = size
    return attr


# ---------------------------------------------------------------- publishing
async def test_a_value_is_stored_at_close_not_before(m):
    info, attr = await m.ops.create(GUEST_DIR, b"Status", 0o644, os.O_WRONLY | os.O_CREAT,
                                    Ctx())
    assert m.store.get(GUEST, b"Status") is None  # the key is pending
    assert b"Status" in await m.list_dir(GUEST_DIR)  # ...yet listed, as created
    await m.ops.write(info.fh, 0, b"Rea")
    await m.ops.write(info.fh, 3, b"dy\n")
    assert m.store.get(GUEST, b"Status") is None  # the host never sees half a value
    await m.ops.flush(info.fh)
    assert m.store.get(GUEST, b"Status") == b"Ready"  # one trailing newline dropped
    await m.ops.release(info.fh)
    # In the pool file as the host's daemon reads it.
    assert pool_file_records(m, GUEST) == [(b"Status", b"Ready")]
    # Read what you wrote: the newline is still shown, and counted in the size.
    assert await m.read_file(attr.st_ino) == b"Ready\n"
    assert (await m.ops.getattr(attr.st_ino, Ctx())).st_size == 6


async def test_a_shell_first_close_before_writing_stores_nothing(m):
    ino = await m.write_file(b"Key", b"old")
    info = await m.ops.open(ino, os.O_WRONLY, Ctx())
    await m.ops.flush(info.fh)  # dup2 and close of the original fd
    assert m.store.get(GUEST, b"Key") == b"old"
    await m.ops.write(info.fh, 0, b"new")
    await m.ops.release(info.fh)  # the release stores what the flush did not
    assert m.store.get(GUEST, b"Key") == b"new"


async def test_o_trunc_empties_the_value_at_release(m):
    ino = await m.write_file(b"Key", b"a long value")
    info = await m.ops.open(ino, os.O_WRONLY | os.O_TRUNC, Ctx())
    await m.ops.write(info.fh, 0, b"short")
    await m.ops.flush(info.fh)
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Key") == b"short"
    info = await m.ops.open(ino, os.O_WRONLY | os.O_TRUNC, Ctx())
    await m.ops.release(info.fh)  # `: > key`
    assert m.store.get(GUEST, b"Key") == b""


async def test_a_write_inside_a_value_keeps_the_rest(m):
    ino = await m.write_file(b"Key", b"abcdef")
    info = await m.ops.open(ino, os.O_RDWR, Ctx())
    await m.ops.write(info.fh, 2, b"XY")
    assert await m.ops.read(info.fh, 0, 100) == b"abXYef"
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Key") == b"abXYef"


async def test_appending_handles_share_one_draft_at_the_current_end(m):
    ino = await m.write_file(b"Log", b"start")
    first = await m.ops.open(ino, os.O_WRONLY | os.O_APPEND, Ctx())
    second = await m.ops.open(ino, os.O_WRONLY | os.O_APPEND, Ctx())
    await m.ops.write(first.fh, 0, b"+1")
    await m.ops.write(second.fh, 0, b"+2")  # the kernel's offset is ignored
    await m.ops.flush(first.fh)
    assert m.store.get(GUEST, b"Log") == b"start+1+2"
    await m.ops.write(second.fh, 0, b"+3")
    await m.ops.release(first.fh)
    await m.ops.release(second.fh)
    assert m.store.get(GUEST, b"Log") == b"start+1+2+3"
    assert m.fs.table.get(ino).appends.data is None  # the draft goes with its last writer


async def test_o_append_to_a_new_key_creates_it(m):
    info, _ = await m.ops.create(GUEST_DIR, b"New", 0o644,
                                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, Ctx())
    await m.ops.write(info.fh, 0, b"line\n")
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"New") == b"line"


async def test_a_read_only_open_stores_nothing(m):
    await m.store.set(GUEST, b"Key", b"host value", Origin.HOST)
    attr = await m.ops.lookup(GUEST_DIR, b"Key", Ctx())
    info = await m.ops.open(attr.st_ino, os.O_RDONLY, Ctx())
    assert await m.ops.read(info.fh, 5, 100) == b"value"
    assert await refused(m.ops.write(info.fh, 0, b"x")) == errno.EBADF
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Key") == b"host value"


async def test_fsync_stores_at_once(m):
    info, _ = await m.ops.create(GUEST_DIR, b"Key", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    await m.ops.write(info.fh, 0, b"v")
    await m.ops.fsync(info.fh, False)
    assert m.store.get(GUEST, b"Key") == b"v"
    await m.ops.release(info.fh)


async def test_a_closed_handle_is_ebadf(m):
    ino = await m.write_file(b"Key", b"v")
    info = await m.ops.open(ino, os.O_RDWR, Ctx())
    await m.ops.release(info.fh)
    assert await refused(m.ops.read(info.fh, 0, 10)) == errno.EBADF
    assert await refused(m.ops.write(info.fh, 0, b"x")) == errno.EBADF


# ---------------------------------------------------------------- unlink, rename
async def test_unlink_deletes_the_key(m):
    await m.write_file(b"Key", b"v")
    await m.ops.unlink(GUEST_DIR, b"Key", Ctx())
    assert m.store.get(GUEST, b"Key") is None
    assert pool_file_records(m, GUEST) == []
    assert await refused(m.ops.unlink(GUEST_DIR, b"Key", Ctx())) == errno.ENOENT
    assert await refused(m.ops.lookup(GUEST_DIR, b"Key", Ctx())) == errno.ENOENT


async def test_an_editor_saves_through_a_scratch_file(m):
    """vim/sed -i: write `.Key.swp`, rename it over the key."""
    await m.write_file(b"Key", b"old")
    await m.write_file(b".Key.tmp", b"new\n")
    assert m.store.get(GUEST, b".Key.tmp") is None  # scratch files stay in memory
    assert b".Key.tmp" in await m.list_dir(GUEST_DIR)
    await m.ops.rename(GUEST_DIR, b".Key.tmp", GUEST_DIR, b"Key", 0, Ctx())
    assert m.store.get(GUEST, b"Key") == b"new"
    assert b".Key.tmp" not in await m.list_dir(GUEST_DIR)


async def test_renaming_a_key_moves_its_value(m):
    await m.write_file(b"Old", b"v")
    await m.ops.rename(GUEST_DIR, b"Old", GUEST_DIR, b"New", 0, Ctx())
    assert m.store.get(GUEST, b"Old") is None and m.store.get(GUEST, b"New") == b"v"
    assert await refused(m.ops.rename(GUEST_DIR, b"Gone", GUEST_DIR, b"X", 0, Ctx())) \
        == errno.ENOENT


async def test_nothing_moves_into_or_out_of_another_pool(m):
    await m.write_file(b"Key", b"v")
    await m.store.set(Pool.EXTERNAL, b"Config", b"v", Origin.HOST)
    assert await refused(m.ops.rename(GUEST_DIR, b"Key", EXTERNAL_DIR, b"Key", 0, Ctx())) \
        == errno.EACCES
    assert await refused(m.ops.rename(EXTERNAL_DIR, b"Config", GUEST_DIR, b"C", 0, Ctx())) \
        == errno.EACCES
    assert await refused(m.ops.unlink(EXTERNAL_DIR, b"Config", Ctx())) == errno.EACCES
    assert m.store.get(Pool.EXTERNAL, b"Config") == b"v"


# ---------------------------------------------------------------- setattr
async def test_chmod_and_chown_are_remembered_not_stored(m):
    ino = await m.write_file(b"Key", b"v")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_uid, attr.st_gid = 1234, 5678
    got = await m.ops.setattr(ino, attr, Fields(update_mode=True, update_uid=True,
                                                update_gid=True), None, Ctx())
    assert stat.S_IMODE(got.st_mode) == 0o600 and (got.st_uid, got.st_gid) == (1234, 5678)
    again = await m.ops.getattr(ino, Ctx())
    assert stat.S_IMODE(again.st_mode) == 0o600
    assert m.store.get(GUEST, b"Key") == b"v"


async def test_setattr_outside_guest_is_eacces(m):
    await m.store.set(Pool.EXTERNAL, b"Config", b"value", Origin.HOST)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    assert await refused(m.ops.setattr(attr.st_ino, setattr_size(0),
                                       Fields(update_size=True), None, Ctx())) == errno.EACCES
    # A pool directory accepts its times and its mode as it is (rsync -a, touch), nothing else.
    chmod = pyfuse3.EntryAttributes()
    chmod.st_mode = stat.S_IFDIR | 0o777
    assert await refused(m.ops.setattr(EXTERNAL_DIR, chmod, Fields(update_mode=True), None,
                                       Ctx())) == errno.EACCES
    assert m.store.get(Pool.EXTERNAL, b"Config") == b"value"


async def test_truncate_by_path_stores_now_and_extends_with_nul_refused(m):
    ino = await m.write_file(b"Key", b"abcdef")
    await m.ops.setattr(ino, setattr_size(3), Fields(update_size=True), None, Ctx())
    assert m.store.get(GUEST, b"Key") == b"abc"
    # Growing pads with NUL, which no value may hold.
    assert await refused(m.ops.setattr(ino, setattr_size(10), Fields(update_size=True), None,
                                       Ctx())) == errno.EINVAL
    assert m.store.get(GUEST, b"Key") == b"abc"


# ---------------------------------------------------------------- refusals
async def test_only_guest_is_writable(m):
    await m.store.set(Pool.EXTERNAL, b"Config", b"v", Origin.HOST)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert await refused(m.ops.open(attr.st_ino, flags, Ctx())) == errno.EACCES
    assert await refused(m.ops.create(EXTERNAL_DIR, b"New", 0o644, os.O_WRONLY, Ctx())) \
        == errno.EACCES
    assert m.store.get(Pool.EXTERNAL, b"New") is None


async def test_a_value_too_long_is_refused_at_the_write_that_breaks_it(m):
    info, _ = await m.ops.create(GUEST_DIR, b"Big", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    await m.ops.write(info.fh, 0, b"x" * limits.VALUE_MAX_UNITS)
    # One more character is still a trailing newline's room; two are not.
    assert await refused(m.ops.write(info.fh, limits.VALUE_MAX_UNITS, b"yy")) == errno.EFBIG
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Big") is None  # nothing stored, no half value


async def test_a_write_past_the_largest_file_allocates_nothing(m):
    info, _ = await m.ops.create(GUEST_DIR, b"Far", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    assert await refused(m.ops.write(info.fh, 1 << 40, b"x")) == errno.EFBIG
    await m.ops.release(info.fh)
    ino = await m.write_file(b"Key", b"v")
    assert await refused(m.ops.setattr(ino, setattr_size(1 << 30), Fields(update_size=True),
                                       None, Ctx())) == errno.EFBIG
    assert m.store.get(GUEST, b"Key") == b"v"


@pytest.mark.parametrize(("data", "error"), [(b"a\0b", errno.EINVAL),
                                              (b"\xff\xfe", errno.EILSEQ)])
async def test_a_value_no_host_could_read_is_refused(m, data, error):
    info, _ = await m.ops.create(GUEST_DIR, b"Bad", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    assert await refused(m.ops.write(info.fh, 0, data)) == error
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Bad") is None


async def test_a_half_written_utf8_character_is_waited_for(m):
    info, _ = await m.ops.create(GUEST_DIR, b"Text", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    euro = "€".encode()
    await m.ops.write(info.fh, 0, euro[:1])  # the rest comes in the next write
    await m.ops.write(info.fh, 1, euro[1:])
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Text") == euro


async def test_names_that_cannot_be_keys_are_refused(m):
    assert await refused(m.ops.create(GUEST_DIR, b"bad%zz", 0o644, os.O_WRONLY, Ctx())) \
        == errno.EINVAL
    long_key = b"k" * (limits.KEY_MAX_UNITS + 1)
    assert await refused(m.ops.create(GUEST_DIR, long_key, 0o644, os.O_WRONLY, Ctx())) \
        == errno.ENAMETOOLONG
    assert await m.list_dir(GUEST_DIR) == []


async def test_o_excl_on_an_existing_key_is_eexist(m):
    await m.write_file(b"Key", b"v")
    assert await refused(m.ops.create(GUEST_DIR, b"Key", 0o644,
                                      os.O_WRONLY | os.O_CREAT | os.O_EXCL, Ctx())) \
        == errno.EEXIST


async def test_unpublished_bytes_are_bounded_for_all_users_together(m, monkeypatch):
    monkeypatch.setattr(limits, "UNPUBLISHED_MAX_BYTES", 1500)
    assert unpublished.limits is limits  # the bound is read from here at each write
    first, _ = await m.ops.create(GUEST_DIR, b"A", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    await m.ops.write(first.fh, 0, b"a" * 1000)
    other, _ = await m.ops.create(GUEST_DIR, b"B", 0o644, os.O_WRONLY | os.O_CREAT,
                                  Ctx(uid=1000, gid=1000))
    assert await refused(m.ops.write(other.fh, 0, b"b" * 1000)) == errno.ENOSPC
    await m.ops.release(first.fh)  # stored: its bytes go back to the bound
    assert m.store.get(GUEST, b"A") == b"a" * 1000
    await m.ops.write(other.fh, 0, b"b" * 1000)
    await m.ops.release(other.fh)
    assert m.store.get(GUEST, b"B") == b"b" * 1000


async def test_scratch_files_are_bounded_in_number(m, monkeypatch):
    monkeypatch.setattr(limits, "SCRATCH_MAX_FILES", 2)
    monkeypatch.setattr(limits, "SCRATCH_ROOT_FILES", 0)  # root's headroom (issue 18)
    await m.write_file(b".one", b"1")
    await m.write_file(b".two", b"2")
    assert await refused(m.ops.create(GUEST_DIR, b".three", 0o644, os.O_WRONLY, Ctx())) \
        == errno.ENOSPC
    await m.ops.unlink(GUEST_DIR, b".one", Ctx())
    await m.write_file(b".three", b"3")


async def test_open_files_are_bounded_for_all_users_together(m, monkeypatch):
    monkeypatch.setattr(limits, "OPEN_FILES_MAX", 2)
    ino = await m.write_file(b"Key", b"v")
    held = [await m.ops.open(ino, os.O_RDONLY, Ctx()) for _ in range(2)]
    assert await refused(m.ops.open(ino, os.O_RDONLY, Ctx(uid=1000))) == errno.ENFILE
    assert await refused(m.ops.create(GUEST_DIR, b"New", 0o644, os.O_WRONLY, Ctx())) \
        == errno.ENFILE
    await m.ops.release(held.pop().fh)
    await m.ops.release((await m.ops.open(ino, os.O_RDONLY, Ctx())).fh)
    await m.ops.release(held.pop().fh)


# ---------------------------------------------------------------- host changes
async def test_a_host_change_is_read_at_the_next_open(m):
    await m.store.set(Pool.EXTERNAL, b"Config", b"one", Origin.HOST)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    before = await m.ops.open(attr.st_ino, os.O_RDONLY, Ctx())
    await m.ops.store.set(Pool.EXTERNAL, b"Config", b"two, longer", Origin.HOST)
    # A file open for reading is replaced, as if the host had renamed a new one over it
    # (docs/tools.md): the held descriptor keeps its value and size together.
    assert await m.ops.read(before.fh, 0, 100) == b"one"
    assert (await m.ops.getattr(attr.st_ino, Ctx())).st_size == len(b"one")
    assert await refused(m.ops.open(attr.st_ino, os.O_RDONLY, Ctx())) == errno.ESTALE
    replaced = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    assert replaced.st_ino != attr.st_ino
    after = await m.ops.open(replaced.st_ino, os.O_RDONLY, Ctx())
    assert await m.ops.read(after.fh, 0, 100) == b"two, longer"
    assert (await m.ops.getattr(replaced.st_ino, Ctx())).st_size == len(b"two, longer")
    for info in (before, after):
        await m.ops.release(info.fh)
    again = await m.ops.open(replaced.st_ino, os.O_RDONLY, Ctx())
    assert again.keep_cache  # unchanged since the last open: the kernel may keep its pages
    await m.ops.release(again.fh)


async def test_a_key_the_host_deleted_is_stale_until_looked_up_again(m):
    await m.store.set(Pool.EXTERNAL, b"Config", b"v", Origin.HOST)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    await m.store.delete(Pool.EXTERNAL, b"Config", Origin.HOST)
    # The kernel may still hold the name: ESTALE makes it walk the path again...
    assert await refused(m.ops.getattr(attr.st_ino, Ctx())) == errno.ESTALE
    assert await refused(m.ops.open(attr.st_ino, os.O_RDONLY, Ctx())) == errno.ESTALE
    # ...and the lookup it then makes says the name is gone.
    assert await refused(m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())) == errno.ENOENT
    await m.ops.forget([(attr.st_ino, 1)])
    assert m.fs.table.get(attr.st_ino) is None


async def test_xattrs_name_the_raw_key_and_pool_and_cannot_be_set(m):
    await m.store.set(Pool.EXTERNAL, b"a/b", b"v", Origin.HOST)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"a%2Fb", Ctx())
    assert set(await m.ops.listxattr(attr.st_ino, Ctx())) == {b"user.kvp.key", b"user.kvp.pool"}
    assert await m.ops.getxattr(attr.st_ino, b"user.kvp.key", Ctx()) == b"a/b"
    assert await m.ops.getxattr(attr.st_ino, b"user.kvp.pool", Ctx()) == b"0"
    assert await refused(m.ops.setxattr(attr.st_ino, b"user.x", b"1", Ctx())) == errno.ENOTSUP
    assert await refused(m.ops.removexattr(attr.st_ino, b"user.kvp.key", Ctx())) \
        == errno.ENOTSUP
    scratch = await m.write_file(b".tmp", b"x")
    assert await m.ops.listxattr(scratch, Ctx()) == []


async def test_rename_over_an_existing_key_replaces_it(m):
    await m.write_file(b"A", b"one")
    b_ino = await m.write_file(b"B", b"two")
    await m.ops.rename(GUEST_DIR, b"A", GUEST_DIR, b"B", 0, Ctx())
    assert m.store.get(GUEST, b"A") is None and m.store.get(GUEST, b"B") == b"one"
    assert pool_file_records(m, GUEST) == [(b"B", b"one")]
    assert not m.fs.table.get(b_ino).linked  # the old B's inode is gone from the tree
    assert sorted(await m.list_dir(GUEST_DIR)) == [b"B"]


async def test_a_key_renamed_to_a_scratch_name_leaves_the_pool_and_keeps_its_bytes(m):
    ino = await m.write_file(b"Key", b"value\n")
    await m.ops.rename(GUEST_DIR, b"Key", GUEST_DIR, b".backup", 0, Ctx())
    assert m.store.get(GUEST, b"Key") is None and pool_file_records(m, GUEST) == []
    assert await m.read_file(ino) == b"value\n"  # as it read, newline included
    await m.ops.rename(GUEST_DIR, b".backup", GUEST_DIR, b"Back", 0, Ctx())
    assert m.store.get(GUEST, b"Back") == b"value"


async def test_rename_over_a_key_whose_name_looks_temporary_replaces_that_key(m):
    """A key the pool holds under a name of a temporary file's shape (the host's
    `Build.tmp`): renamed over, it is replaced like any key, not left in the pool beside
    a scratch file of the same name (listed twice, its value never changed)."""
    await m.store.set(GUEST, b"Build.tmp", b"old", Origin.HOST)
    await m.write_file(b"Build", b"new")
    await m.ops.rename(GUEST_DIR, b"Build", GUEST_DIR, b"Build.tmp", 0, Ctx())
    assert m.store.get(GUEST, b"Build") is None and m.store.get(GUEST, b"Build.tmp") == b"new"
    assert pool_file_records(m, GUEST) == [(b"Build.tmp", b"new")]
    assert sorted(await m.list_dir(GUEST_DIR)) == [b"Build.tmp"]


async def test_ftruncate_through_an_open_file_is_stored_at_close(m):
    ino = await m.write_file(b"Key", b"abcdef")
    info = await m.ops.open(ino, os.O_WRONLY, Ctx())
    await m.ops.setattr(ino, setattr_size(2), Fields(update_size=True), info.fh, Ctx())
    assert m.store.get(GUEST, b"Key") == b"abcdef"  # not before the close
    await m.ops.release(info.fh)
    assert m.store.get(GUEST, b"Key") == b"ab"


async def test_a_scratch_file_holds_any_bytes_up_to_its_limit(m):
    info, _ = await m.ops.create(GUEST_DIR, b".bin", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    await m.ops.write(info.fh, 0, b"\0\xff" * 100)  # not a value: fine until renamed
    await m.ops.release(info.fh)
    attr = await m.ops.lookup(GUEST_DIR, b".bin", Ctx())
    assert await m.read_file(attr.st_ino) == b"\0\xff" * 100
    info = await m.ops.open(attr.st_ino, os.O_WRONLY, Ctx())
    assert await refused(m.ops.write(info.fh, limits.SCRATCH_FILE_MAX_BYTES, b"x")) \
        == errno.EFBIG
    await m.ops.release(info.fh)  # a refused handle stores nothing: the bytes stay
    assert await m.read_file(attr.st_ino) == b"\0\xff" * 100
    # Renamed to a key, it must be a valid value: refused, and nothing is stored.
    assert await refused(m.ops.rename(GUEST_DIR, b".bin", GUEST_DIR, b"Bin", 0, Ctx())) \
        == errno.EINVAL
    assert m.store.get(GUEST, b"Bin") is None
    assert b".bin" in await m.list_dir(GUEST_DIR)
