"""What a key or scratch file reads as, which is not always what the pool holds.

A value being published is shown before it is stored (a `cat` right after
close must not see the old one); bytes written through the mount read back as
written, trailing newline included, while the pool still holds the value they
became; pool 2 (auto) is computed per read.
"""

from __future__ import annotations

import trio

from kvpfs.fuse.nodes import Node
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.host.intrinsic import Intrinsics
from kvpfs.storage.store import Store
from kvpfs.wire.protocol import Pool


class Contents:
    def __init__(self, store: Store, intrinsics: Intrinsics) -> None:
        self.store = store
        self.intrinsics = intrinsics

    def value(self, node: Node) -> bytes | None:
        """The current value of a key node as a reader sees it, None if it no longer exists:
        the bytes written through the mount while the stored value is still what they
        became, else the stored value."""
        if node.held.inflight is not None:
            return node.held.inflight
        if node.key is None or node.pending or node.replaced:
            return node.held.content
        if node.pool == Pool.AUTO:
            return None  # computed by current()
        value = self.store.get(node.pool, node.key)
        if node.held.shown is not None and value is not None and node.held.shown[0] == value:
            return node.held.shown[1]
        return value

    def stored(self, node: Node) -> bytes:
        """What the pool holds for a guest key node (b"" for a pending one)."""
        if node.key is None or node.pending:
            return b""
        return self.store.get(node.pool, node.key) or b""

    async def current(self, node: Node) -> bytes | None:
        if node.pool == Pool.AUTO and node.key is not None:
            return await self._auto_value(node.key)
        return self.value(node)

    async def _auto_value(self, key: bytes) -> bytes:
        index = INTRINSIC_KEYS.index(key.decode())
        if self.intrinsics.needs_thread(index):
            item = await trio.to_thread.run_sync(self.intrinsics.value, index)
        else:
            item = self.intrinsics.value(index)
        assert item is not None  # an index from KEYS
        return item[1].encode()
