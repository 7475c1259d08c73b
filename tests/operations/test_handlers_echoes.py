"""The echo seam (kvpfs/fuse/echoes.py) without a mount.

The inotify echo helper's requests are known by its pid. Here a real,
live process stands in for the helper (the real one needs a mount to start),
and its pid is the one the service knows; the requests the kernel would
send for its open/write/close or unlink are made on `EchoingOperations`
directly. What is checked: they are answered for the echo without touching
the store, everyone else's requests reach the ordinary handlers, and a pid
whose process has ended is nobody's helper.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest
import trio

from kvpfs.fuse.echo_helper import EchoKind
from kvpfs.fuse.fsnotify_echo import EchoHelper, EchoOp
from kvpfs.storage.store import Origin
from kvpfs.wire.protocol import Pool
from tests.support.handlers import EXTERNAL_DIR, Ctx, refused

EXTERNAL = Pool.EXTERNAL


@pytest.fixture
async def helper(m, tmp_path):
    """A live process the notification service takes for its echo helper."""
    process = await trio.lowlevel.open_process(["sleep", "600"], stdin=subprocess.DEVNULL)
    echo = EchoHelper(tmp_path / "mnt")
    echo._process, echo.pid = process, process.pid
    m.fs.notifications.echo = echo
    yield Ctx(uid=os.getuid(), pid=process.pid)
    process.kill()
    await process.wait()


def echoing(m, kind: EchoKind, key: bytes, node=None) -> EchoOp:
    op = EchoOp(kind, EXTERNAL, key, key, node)
    m.fs.notifications.echo_op = op
    return op


async def test_a_modify_echo_opens_writes_and_closes_without_storing(m, helper):
    await m.store.set(EXTERNAL, b"Config", b"host value", Origin.HOST)
    op = echoing(m, EchoKind.MODIFY, b"Config")
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", helper)  # an ordinary entry
    # The kernel checks the helper's write against attributes made for it alone:
    # writable by their owner, never cached, and dropped after the echo (`touched`).
    mine = await m.ops.getattr(attr.st_ino, helper)
    assert mine.st_mode & 0o200 and mine.st_uid == m.ops.perm.uid and mine.attr_timeout == 0
    pool_dir = await m.ops.getattr(EXTERNAL_DIR, helper)
    assert pool_dir.st_mode & 0o300 == 0o300
    assert op.touched == {attr.st_ino, EXTERNAL_DIR}
    # Everyone else still sees a read-only file in a root-only directory.
    theirs = await m.ops.getattr(attr.st_ino, Ctx())
    assert stat.S_IMODE(theirs.st_mode) == 0o400 and theirs.attr_timeout > 0
    info = await m.ops.open(attr.st_ino, os.O_WRONLY, helper)
    assert info.direct_io  # the discarded byte never reaches the page cache
    assert await m.ops.write(info.fh, 0, b"\n") == 1
    await m.ops.flush(info.fh)
    await m.ops.release(info.fh)
    assert m.store.get(EXTERNAL, b"Config") == b"host value"
    assert m.ops.echoes.fhs == {}
    # The same open from anyone else is refused, as external is read-only.
    assert await refused(m.ops.open(attr.st_ino, os.O_WRONLY, Ctx())) == errno.EACCES


async def test_a_create_echo_makes_the_kernel_create_the_name(m, helper):
    await m.store.set(EXTERNAL, b"New", b"v", Origin.HOST)
    echoing(m, EchoKind.CREATE, b"New")
    # "not there": the kernel then sends CREATE, raising IN_CREATE.
    assert await refused(m.ops.lookup(EXTERNAL_DIR, b"New", helper)) == errno.ENOENT
    info, attr = await m.ops.create(EXTERNAL_DIR, b"New", 0o600,
                                    os.O_WRONLY | os.O_CREAT | os.O_EXCL, helper)
    assert attr.st_ino == m.fs.table.find(EXTERNAL, b"New").ino
    await m.ops.write(info.fh, 0, b"\n")
    await m.ops.release(info.fh)
    assert m.store.get(EXTERNAL, b"New") == b"v"
    # Everyone else finds it, and may not create in external.
    assert (await m.ops.lookup(EXTERNAL_DIR, b"New", Ctx())).st_ino == attr.st_ino
    assert await refused(m.ops.create(EXTERNAL_DIR, b"Other", 0o600, os.O_WRONLY, Ctx())) \
        == errno.EACCES


async def test_a_delete_echo_unlinks_a_key_that_is_already_gone(m, helper):
    await m.store.set(EXTERNAL, b"Old", b"v", Origin.HOST)
    node = m.fs.table.find(EXTERNAL, b"Old")
    node.lookups += 1  # the kernel knows it
    await m.store.delete(EXTERNAL, b"Old", Origin.HOST)
    assert await refused(m.ops.lookup(EXTERNAL_DIR, b"Old", Ctx())) == errno.ENOENT
    echoing(m, EchoKind.DELETE, b"Old", node)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Old", helper)  # the deleted key, to unlink
    assert attr.st_ino == node.ino and attr.entry_timeout == 0
    await m.ops.unlink(EXTERNAL_DIR, b"Old", helper)
    assert m.store.get(EXTERNAL, b"Old") is None
    # Only the echo's name: any other unlink by the helper is refused.
    assert await refused(m.ops.unlink(EXTERNAL_DIR, b"Other", helper)) == errno.EACCES


async def test_without_an_echo_running_the_helper_may_not_open_anything(m, helper):
    await m.store.set(EXTERNAL, b"Config", b"v", Origin.HOST)
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    assert m.fs.notifications.echo_op is None
    assert await refused(m.ops.open(attr.st_ino, os.O_WRONLY, helper)) == errno.EACCES
    echoing(m, EchoKind.MODIFY, b"Other")  # another key's echo
    assert await refused(m.ops.open(attr.st_ino, os.O_WRONLY, helper)) == errno.EACCES


async def test_a_helper_that_has_exited_is_nobody(m, helper):
    await m.store.set(EXTERNAL, b"Config", b"v", Origin.HOST)
    echoing(m, EchoKind.MODIFY, b"Config")
    attr = await m.ops.lookup(EXTERNAL_DIR, b"Config", Ctx())
    echo = m.fs.notifications.echo
    echo._process.kill()
    await echo._process.wait()
    # Its pid may be reused by anyone: their requests get the ordinary answers.
    assert not m.ops.echoes.owns(helper)
    assert await refused(m.ops.open(attr.st_ino, os.O_WRONLY, helper)) == errno.EACCES
    assert (await m.ops.getattr(attr.st_ino, helper)).attr_timeout > 0
