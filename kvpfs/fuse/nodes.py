"""Inode numbers and the table of key and scratch files the kernel knows.

Fixed inodes for the root, the pool directories, their numeric links and
/.events; every key or scratch file gets a new number that is never reused,
so a name that comes back after a delete is a new file to the kernel.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from kvpfs.fuse.unpublished import Unpublished
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.storage.store import Store
from kvpfs.wire import names
from kvpfs.wire.protocol import Pool

ROOT_INODE: pyfuse3.InodeT = pyfuse3.ROOT_INODE
DIR_INODES = tuple(ROOT_INODE + 1 + pool for pool in Pool)  # 2..6, by pool number
LINK_INODES = tuple(ROOT_INODE + 6 + pool for pool in Pool)  # 7..11: "0" -> external
EVENTS_INODE = ROOT_INODE + 11  # 12: the change feed, /.events
EVENTS_NAME = b".events"
FIXED_INODES = (ROOT_INODE, *DIR_INODES, *LINK_INODES, EVENTS_INODE)
FIRST_KEY_INODE = 100


@dataclass(eq=False)
class KernelView:
    """What the kernel may hold for a file without asking us again."""

    cached: bool = False  # its page cache, if any, holds the current value
    attrs_until: float = 0.0  # until then (monotonic) it may use the attributes we gave
    size: int = 0  # the size those attributes said
    seen: bytes | None = None  # the value last handed to it (by that size or an open)


@dataclass(eq=False)
class HeldBytes:
    """Bytes kvpfs keeps for a file beside the pool, in memory only."""

    content: bytes = b""  # scratch files and pending keys only
    charged: int = 0  # bytes of `content` counted as unpublished
    inflight: bytes | None = None  # being published: what readers must already see
    # (stored value, bytes as written): what was written through the mount, shown while
    # the stored value is still the one it became (read what you wrote, trailing newline
    # included).
    shown: tuple[bytes, bytes] | None = None


@dataclass(eq=False)
class AppendDraft:
    """O_APPEND writes, at the end of the value as it was when they came, shared by every
    appending handle until the last of them commits."""

    data: bytearray | None = None
    writers: int = 0  # appending handles whose bytes are in `data`, not yet committed
    charged: int = 0  # bytes of `data` counted as unpublished


@dataclass(eq=False)
class ChmodMemory:
    """chmod/chown are accepted and remembered while kvpfs runs; pools have no modes."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(eq=False)
class Node:
    """A key (or scratch) file; its inode number is never reused.

    The fields here are the inode's bookkeeping; each other concern has its own part.
    """

    ino: int
    pool: int
    key: bytes | None  # None for a scratch file
    name: bytes
    lookups: int = 0  # the kernel's references (LOOKUP, READDIRPLUS, CREATE minus FORGET)
    handles: int = 0  # open files
    writers: int = 0  # open files that may write (among `handles`)
    linked: bool = True
    # Replaced by a host change while open for reading (docs/tools.md): its open files keep
    # `held.content`, the value they saw, with its size; the key's name leads to a new node.
    replaced: bool = False
    pending: bool = False  # created through the mount, not committed yet
    mtime_ns: int = field(default_factory=time.time_ns)
    mtime_explicit: bool = False  # set by utimensat after the last write: a close keeps it
    ctime_ns: int = 0
    atime_ns: int = 0
    kernel: KernelView = field(default_factory=KernelView)
    held: HeldBytes = field(default_factory=HeldBytes)
    appends: AppendDraft = field(default_factory=AppendDraft)
    chmod: ChmodMemory = field(default_factory=ChmodMemory)


class NodeTable:
    """The nodes by inode and by key, and guest's files the pool does not hold (yet).

    A node stays while it has a name, a lookup count or an open file: the
    kernel may still use its inode number after the key is gone.
    """

    def __init__(self, store: Store, unpublished: Unpublished, started_ns: int) -> None:
        self.store = store
        self.unpublished = unpublished
        self.started_ns = started_ns
        self.by_ino: dict[int, Node] = {}
        self.by_key: dict[tuple[int, bytes], Node] = {}
        self.guest_extra: dict[bytes, Node] = {}  # name -> scratch or pending node
        self._next_ino = FIRST_KEY_INODE
        # Applies what users set on a guest key (durable.DurableMeta.apply) to a new node.
        self.on_guest_node: Callable[[Node, bytes | None], None] | None = None

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def key_node(self, pool: int, key: bytes) -> Node:
        node = self.by_key.get((pool, key))
        if node is None:
            node = Node(self.new_ino(), pool, key, names.key_to_name(key))
            node.mtime_ns = node.ctime_ns = self.store.states[pool].mtime_ns or self.started_ns
            if pool == Pool.GUEST and self.on_guest_node is not None:
                self.on_guest_node(node, self.store.get(pool, key))
            self.by_ino[node.ino] = node
            self.by_key[(pool, key)] = node
        return node

    def add_guest(self, name: bytes, key: bytes | None) -> Node:
        """A new guest file not in the pool: a scratch file, or a key created (pending)."""
        if key is None:
            node = Node(self.new_ino(), Pool.GUEST, None, name)
        else:
            # Listed as any key is (a name over NAME_MAX shows shortened).
            node = Node(self.new_ino(), Pool.GUEST, key, names.key_to_name(key), pending=True)
            self.by_key[(Pool.GUEST, key)] = node
        self.by_ino[node.ino] = node
        self.guest_extra[node.name] = node
        return node

    def rename(self, node: Node, name: bytes, key: bytes | None) -> None:
        """The same inode lives on under its new guest name (a key, or scratch if None)."""
        if node.key is not None and self.by_key.get((Pool.GUEST, node.key)) is node:
            del self.by_key[(Pool.GUEST, node.key)]
        if self.guest_extra.get(node.name) is node:
            del self.guest_extra[node.name]
        node.name = name if key is None else names.key_to_name(key)
        node.key = key
        node.pending = False
        if key is None:
            self.guest_extra[name] = node
        else:
            self.by_key[(Pool.GUEST, key)] = node

    def replace(self, node: Node) -> None:
        """A host change replaces a key's file open for reading, as a rename over it would:
        its open files keep the value the kernel saw (`kernel.seen`), with its size; the
        key's name leads to a new node."""
        if node.key is not None and self.by_key.get((node.pool, node.key)) is node:
            del self.by_key[(node.pool, node.key)]
        frozen = node.kernel.seen if node.kernel.seen is not None else b""
        node.linked = False
        node.replaced = True
        node.held.content = frozen
        node.held.shown = None
        node.held.inflight = None
        node.kernel.size = len(frozen)
        node.kernel.cached = False

    def stored(self, node: Node) -> None:
        """A pending key's value is in the pool now: it is listed from there."""
        node.pending = False
        if self.guest_extra.get(node.name) is node:
            del self.guest_extra[node.name]

    def unlink(self, node: Node) -> None:
        node.linked = False
        if node.key is None:  # a scratch file's bytes go with its name
            node.held.content = b""
            node.held.charged = self.unpublished.account(node.pool, node.name, node.held.charged, 0)
        if node.key is not None and self.by_key.get((node.pool, node.key)) is node:
            del self.by_key[(node.pool, node.key)]
        if self.guest_extra.get(node.name) is node:
            del self.guest_extra[node.name]
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        if not node.linked and node.lookups <= 0 and node.handles <= 0:
            self.by_ino.pop(node.ino, None)

    def forget(self, ino: int, count: int) -> None:
        node = self.by_ino.get(ino)
        if node is not None:
            node.lookups -= count
            self.maybe_drop(node)

    def pool_of_dir(self, inode: int) -> Pool:
        if inode in DIR_INODES:
            return Pool(DIR_INODES.index(inode))
        raise pyfuse3.FUSEError(errno.ENOTDIR if inode in self.by_ino else errno.ENOENT)

    def pending_count(self) -> int:
        """New guest keys created through the mount whose values are not stored yet."""
        return sum(1 for node in self.guest_extra.values() if node.pending)

    def listing(self, pool: int) -> list[Node]:
        """Every file of a pool directory (unordered)."""
        if pool == Pool.AUTO:
            return [self.key_node(pool, k.encode()) for k in INTRINSIC_KEYS]
        nodes = [self.key_node(pool, key) for key in self.store.states[pool].unique_keys()]
        if pool == Pool.GUEST:
            seen = {n.ino for n in nodes}
            nodes += [n for n in self.guest_extra.values() if n.ino not in seen]
        return nodes

    def find(self, pool: int, name: bytes) -> Node | None:
        """The live node for `name` in a pool directory, or None."""
        if pool == Pool.GUEST:
            extra = self.guest_extra.get(name)
            if extra is not None:
                return extra
            if name.startswith(b"."):
                return None
        if pool == Pool.AUTO:
            try:
                key = names.name_to_key(name)
            except names.InvalidName:
                return None
            return self.key_node(pool, key) if key.decode() in INTRINSIC_KEYS else None
        if names.is_shortened(name):
            for key in self.store.states[pool].unique_keys():
                if names.key_to_name(key) == name:
                    return self.key_node(pool, key)
            return None
        try:
            key = names.name_to_key(name)
        except names.InvalidName:
            return None
        pending = self.by_key.get((pool, key))
        if pending is not None and pending.pending:
            return pending  # created through the mount, named here by its full long name
        if self.store.get(pool, key) is None:
            return None
        return self.key_node(pool, key)
