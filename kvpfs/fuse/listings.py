"""What a directory lists, in the order readdir's offsets need, shared by every open copy.

An open directory holds no copy of its listing, only which directory it is (issue 18: a
user holding tens of thousands of open directories made kvpfs hold a list per handle).
`readdir` asks here each time: one sorted listing per pool, rebuilt only when the pool
or guest's unstored names changed; entries come in inode order, so the kernel's offset
(the last inode it got) finds its place with a bisection, whatever changed since.
"""

from __future__ import annotations

from kvpfs.fuse.nodes import DIR_INODES, LINK_INODES, ROOT_INODE, Node, NodeTable
from kvpfs.fuse.privatedirs import PrivateDirs
from kvpfs.storage.store import Store
from kvpfs.wire.protocol import Pool

DirEntry = tuple[int, bytes, "Node | None"]
# /.events is reachable by name but not listed: tree walkers (cp -r, find, grep -r, tar,
# updatedb) would block on it or copy it as an empty file.
ROOT_ENTRIES: list[DirEntry] = sorted(
    [(DIR_INODES[p], p.dirname.encode(), None) for p in Pool]
    + [(LINK_INODES[p], str(int(p)).encode(), None) for p in Pool], key=lambda e: e[0])


class Listings:
    def __init__(self, store: Store, table: NodeTable, dirs: PrivateDirs) -> None:
        self.store = store
        self.table = table
        self.dirs = dirs
        self._cached: dict[int, tuple[tuple[int, int], list[DirEntry]]] = {}

    def entries(self, inode: int) -> list[DirEntry]:
        """A directory's entries in inode order (ENOTDIR, ENOENT for other inodes)."""
        if inode == ROOT_INODE:
            return ROOT_ENTRIES
        if self.dirs.get(inode) is not None:
            return []  # a private directory holds nothing
        pool = self.table.pool_of_dir(inode)
        version = (self.store.states[pool].mtime_ns, self.table.extra_version)
        cached = self._cached.get(pool)
        if cached is None or cached[0] != version:
            cached = version, sorted(((n.ino, n.name, n) for n in self.table.listing(pool)),
                                     key=lambda e: e[0])
            self._cached[pool] = cached
        entries = cached[1]
        if pool == Pool.GUEST and self.dirs.by_name:  # a few at most: merged each time
            entries = sorted(entries + [(d.ino, d.name, None)
                                        for d in self.dirs.by_name.values()],
                             key=lambda e: e[0])
        return entries
