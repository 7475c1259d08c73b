"""Guest keys' mode, owner, mtime and trailing newline, kept across restarts.

The records live in `storage.keymeta` (one file beside the pools); this module is the
mount's side: it applies a record to a key's node when the node is made, and saves the
record of a key whenever what the user set on it changes.

Two speeds (docs/tools.md):
- a change of a key's mode, owner or group is saved before it is answered, and before a
  new value is stored under a key whose mode or owner it changes: a crash then leaves at
  worst a record about a value never stored, never a key shown more widely than its user
  set it;
- facts about the value (mtime, trailing newline), which every write changes, are saved
  by `saver()` a moment later, many writes in one save (not fsynced, like the pools), and
  at shutdown; a crash may lose the last moment's, and then shows the value as the pool
  holds it, with the pool's time.
Saves run in a worker thread, one at a time, in order. A mode or owner that cannot be
saved fails the call that set it (its errno), rather than being lost at the next restart.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

import pyfuse3
import trio

from kvpfs.fuse.nodes import Node
from kvpfs.storage.keymeta import UNREADABLE_MODE, KeyMeta, KeyMetaFile

log = logging.getLogger(__name__)

# Value facts written within this are saved together, without fsync: a save that syncs
# would make writes to the pool files wait for the disk.
COALESCE_SECONDS = 0.2


class DurableMeta:
    def __init__(self, file: KeyMetaFile | None, guest_keys: Iterable[bytes] = ()) -> None:
        """`guest_keys`: the keys the guest pool holds now; records of others (keys deleted
        while kvpfs was not running, or by the host) are dropped at the next save."""
        self.file = file
        loaded = file.load() if file is not None else None
        self.on_disk: dict[bytes, KeyMeta] = dict(loaded.records) if loaded else {}
        keys = set(guest_keys)
        self.records = {k: r for k, r in self.on_disk.items() if k in keys}
        self.unreadable = loaded.unreadable if loaded else False
        if self.unreadable:
            # The lost file may have held a chmod 600 for any of these keys: each keeps an
            # owner-only record of its own, so the next save cannot widen it.
            for key in keys:
                self.records[key] = KeyMeta(mode=UNREADABLE_MODE)
        self._saving = trio.Lock()
        self._dirty = trio.Event()

    def apply(self, node: Node, stored: bytes | None) -> None:
        """A guest key's node is made: what the user set on it, if anything."""
        if node.key is None:
            return
        record = self.records.get(node.key)
        if record is None:
            if self.unreadable:
                node.chmod.mode = UNREADABLE_MODE
            return
        node.chmod.mode, node.chmod.uid, node.chmod.gid = record.mode, record.uid, record.gid
        facts = record.about(stored) if stored is not None else None
        if facts is None:
            return  # the value changed since: it wins over what was kept about the old one
        if facts.mtime_ns is not None:
            node.mtime_ns = facts.mtime_ns
            node.mtime_explicit = True
        if facts.newline and stored is not None:
            node.held.shown = (stored, stored + b"\n")
            node.kernel.size = len(stored) + 1

    @staticmethod
    def record_of(node: Node, stored: bytes, written: bytes) -> KeyMeta:
        """What to keep for a key whose file is `node`, its stored value (or the one about
        to be stored) `stored`, read back as `written`."""
        return KeyMeta(mode=node.chmod.mode, uid=node.chmod.uid, gid=node.chmod.gid).with_value(
            stored, mtime_ns=node.mtime_ns, newline=written == stored + b"\n")

    async def keep(self, key: bytes, record: KeyMeta | None) -> None:
        """Keep `key`'s record (None: forget it). Saved now if its mode or owner differ from
        the saved one's, else by `saver()`. A record that must be on disk now and cannot be
        is a FUSEError with the save's errno (the caller's change is not answered as done);
        a record to forget that cannot be is left to the next save (a stale record only
        restricts)."""
        previous = self.records.get(key)
        if record is None or record.is_empty():
            record = None
            if self.records.pop(key, None) is None:
                return
        else:
            if previous == record:
                return
            self.records[key] = record
        saved = self.on_disk.get(key, KeyMeta())
        new = record or KeyMeta()
        if (new.mode, new.uid, new.gid) != (saved.mode, saved.uid, saved.gid) \
                or self.unreadable:
            error = await self._save()
            if error is not None and record is not None:
                # Not on disk: the next keep of this record must try again (unless another
                # change of this key came meanwhile: its own save decides for it).
                if self.records.get(key) is record:
                    if previous is None:
                        del self.records[key]
                    else:
                        self.records[key] = previous
                raise pyfuse3.FUSEError(error.errno or errno.EIO)
        else:
            self._dirty.set()

    async def saver(self) -> None:
        """Save value facts a moment after they change; what is left, when cancelled."""
        try:
            while True:
                await self._dirty.wait()
                await trio.sleep(COALESCE_SECONDS)
                await self._save(durable=False)
        finally:
            with trio.CancelScope(shield=True):
                if self.records != self.on_disk:
                    await self._save()

    async def _save(self, *, durable: bool = True) -> OSError | None:
        """Save the records; the error (logged) if that failed."""
        if self.file is None:
            return None
        async with self._saving:
            self._dirty = trio.Event()
            snapshot = dict(self.records)
            try:
                await trio.to_thread.run_sync(
                    lambda: self.file.save(snapshot, durable=durable) if self.file else None)
            except OSError as exc:
                log.warning("could not save guest keys' modes, owners and mtimes to %s: %s;"
                            " they hold until kvpfs restarts", self.file.path, exc)
                return exc
            self.on_disk = snapshot
            self.unreadable = False
            return None
