"""The mounted handlers without a mount (the s3ql t3 way): what handler-level tests share.

`mounted_handlers` builds the filesystem exactly as `kvpfs mount` does
(`kvpfs.mount.build_filesystem`, the echo seam included) on a real Store over
real pool files; the notification service's lane is not running, so nothing
is asked of a kernel that is not there. pyfuse3's `readdir_reply`, which
needs a kernel request, is replaced by a list that the tests read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import pytest

from kvpfs.fuse.echoes import EchoingOperations
from kvpfs.fuse.nodes import DIR_INODES
from kvpfs.fuse.operations import Permissions
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.mount import Filesystem, build_filesystem
from kvpfs.storage.store import Store
from kvpfs.wire.protocol import Pool

GUEST_DIR = DIR_INODES[Pool.GUEST]
EXTERNAL_DIR = DIR_INODES[Pool.EXTERNAL]

ALL_FIELDS = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
              "update_gid", "update_size")


class Ctx:
    """A caller as pyfuse3 describes it (uid, gid, pid, umask)."""

    def __init__(self, uid: int = 0, gid: int = 0, pid: int | None = None) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = os.getpid() if pid is None else pid
        self.umask = 0o022


class Fields:
    """pyfuse3.SetattrFields: which attributes a setattr changes."""

    def __init__(self, **set_fields: bool) -> None:
        for name in ALL_FIELDS:
            setattr(self, name, set_fields.get(name, False))


@dataclass
class Mounted:
    fs: Filesystem
    store: Store
    listing: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = field(default_factory=list)

    @property
    def ops(self) -> EchoingOperations:
        return self.fs.operations

    async def list_dir(self, inode: int, batch: int = 1000) -> list[bytes]:
        """The names readdir gives, in batches as the kernel asks for them."""
        fh = await self.ops.opendir(inode, Ctx())
        names: list[bytes] = []
        start = 0
        while True:
            self.listing.clear()
            await self.ops.readdir(fh, start, batch)
            names += [name for name, _, _ in self.listing]
            if len(self.listing) < batch:
                break
            start = self.listing[-1][2]
        await self.ops.releasedir(fh)
        return names

    async def write_file(self, name: bytes, data: bytes, flags: int = os.O_WRONLY,
                         ctx: Ctx | None = None) -> int:
        """`echo > guest/NAME`: create, write, flush, release; the inode."""
        ctx = ctx or Ctx()
        info, attr = await self.ops.create(GUEST_DIR, name, 0o644, flags | os.O_CREAT, ctx)
        await self.ops.write(info.fh, 0, data)
        await self.ops.flush(info.fh)
        await self.ops.release(info.fh)
        return int(attr.st_ino)

    async def read_file(self, inode: int) -> bytes:
        info = await self.ops.open(inode, os.O_RDONLY, Ctx())
        try:
            return bytes(await self.ops.read(info.fh, 0, 1 << 16))
        finally:
            await self.ops.release(info.fh)


@contextlib.asynccontextmanager
async def mounted_handlers(pool_dir: Path, monkeypatch: object,
                           permissions: Permissions | None = None) -> AsyncIterator[Mounted]:
    store = Store(pool_dir, lock_timeout=0.5)
    await store.open()
    try:
        mounted = Mounted(build_filesystem(store, Intrinsics(FqdnCache()),
                                           permissions=permissions), store)

        def reply(token: int, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
            mounted.listing.append((name, attr, next_id))
            return len(mounted.listing) < token

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)  # type: ignore[attr-defined]
        yield mounted
    finally:
        store.close()


async def refused(call: Awaitable[object]) -> int:
    """The errno a handler answers with; fails the test if it answers at all."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno
