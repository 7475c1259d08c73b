"""pyfuse3's floor on this machine: a minimal filesystem that serves fixed bytes.

Run as its own process (the benchmark starts it)::

    python bench/floorfs.py MOUNTPOINT --files N --value-bytes B [--ttl 1.0]

The tree is ``MOUNTPOINT/guest/key-000000 .. key-(N-1)``, every file holding the
same B bytes. It does the least a sane read-write filesystem does and nothing
else, so its cost per request is pyfuse3's own (libfuse, the Cython layer, trio):

* entry and attribute timeouts of ``--ttl`` seconds (1 s, as kvpfs), explicit
  invalidation never needed (nothing changes);
* pyfuse3's default ``keep_cache=True`` and no ``direct_io`` on open: the bytes
  never change, so the kernel may serve them from its page cache (kvpfs does
  the same while a value is unchanged since the last open);
* no ``flush`` (the first FLUSH gets ENOSYS and the kernel stops sending them;
  kvpfs needs it to commit a value at close); ``release`` is a no-op. With
  ``--flush`` it answers FLUSH with a no-op instead, to measure what that
  round trip costs;
* writes (and truncation) are accepted and discarded; lookups are one dict
  access and readdir replies come from a prepared list.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

DIR_INODE = pyfuse3.ROOT_INODE + 1
FIRST_FILE_INODE = 100
DIR_NAME = b"guest"


class FloorOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, files: int, value: bytes, ttl: float, flush: bool = False) -> None:
        super().__init__()
        if flush:
            self.flush = self._noop_flush  # type: ignore[method-assign]
        self.value = value
        self.ttl = ttl
        self.now_ns = time.time_ns()
        self.names = [f"key-{i:06d}".encode() for i in range(files)]
        self.inode_of = {name: FIRST_FILE_INODE + i for i, name in enumerate(self.names)}
        self.attrs = {
            FIRST_FILE_INODE + i: self._attr(FIRST_FILE_INODE + i, stat.S_IFREG | 0o644, len(value))
            for i in range(files)
        }
        self.attrs[pyfuse3.ROOT_INODE] = self._attr(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, 0)
        self.attrs[DIR_INODE] = self._attr(DIR_INODE, stat.S_IFDIR | 0o755, 0)
        self.entries = [(FIRST_FILE_INODE + i, name) for i, name in enumerate(self.names)]

    def _attr(self, inode: int, mode: int, size: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = mode
        attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_size = size
        attr.st_blksize = 4096
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.now_ns
        attr.entry_timeout = self.ttl
        attr.attr_timeout = self.ttl
        return attr

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == DIR_NAME:
            return self.attrs[DIR_INODE]
        if parent_inode == DIR_INODE:
            inode = self.inode_of.get(name)
            if inode is not None:
                return self.attrs[inode]
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self.attrs[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return await self.getattr(inode, ctx)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == pyfuse3.ROOT_INODE:
            entries = [(DIR_INODE, DIR_NAME)] if start_id == 0 else []
        else:
            # next_id of entry i is i + 1, so start_id is the index to continue from.
            entries = self.entries[start_id:]
        for index, (inode, name) in enumerate(entries, start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.attrs[inode], index):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in self.attrs:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.value[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return len(buf)

    async def release(self, fh: int) -> None:
        return None

    async def _noop_flush(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.names) + 2
        data.f_namemax = 255
        return data


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="minimal pyfuse3 filesystem (benchmark floor)")
    parser.add_argument("mountpoint")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--flush", action="store_true", help="answer FLUSH (a no-op)")
    args = parser.parse_args(argv)
    operations = FloorOperations(args.files, b"v" * args.value_bytes, args.ttl, args.flush)
    options = set(pyfuse3.default_options) | {"fsname=kvpfs-bench-floor", "noatime"}
    pyfuse3.init(operations, args.mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
