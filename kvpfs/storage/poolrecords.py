"""A pool's records as read at one moment, and the cheap identity of the file they came from.

`PoolRecords` is the one shape of a pool's contents: `PoolFile.read` returns it, the store
keeps one per pool in memory (changing it by the same write plans it writes to the file), and
the tools read one (with the file's facts, `readonly.PoolFileRead`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvpfs.storage import writeplan
from kvpfs.storage.records import Record, parse_pool


@dataclass(frozen=True, slots=True)
class Signature:
    """Cheap identity of a file's current contents, to skip re-reading unchanged pools."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Signature:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_signature(path: Path | str) -> Signature | None:
    """Signature of whatever is at `path` now (not following symlinks), None if missing."""
    try:
        return Signature.from_stat(os.lstat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass
class PoolRecords:
    """A pool's records in file order (duplicates and invalid records included), with the
    last-wins index by key that lookups, the mount and the host's GET see."""

    records: list[Record] = field(default_factory=list)
    # Bytes of a partial record after the last whole one (a foreign writer that crashed).
    trailing_bytes: int = 0
    # The file's identity when read; None for a pool never read, or one to re-read.
    signature: Signature | None = None
    # When the pool last changed as kvpfs shows it: the file's mtime when read, then the
    # time of each change kvpfs makes or notices.
    mtime_ns: int = 0
    # key -> every slot holding it, in file order (duplicates are normal in pool 1).
    slots: dict[bytes, list[int]] = field(init=False, repr=False, compare=False)
    # Slots of records the host may see; None while every record is valid.
    visible: list[int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.reindex()

    @classmethod
    def parse(cls, data: bytes | bytearray, signature: Signature) -> PoolRecords:
        """The records of a pool file's contents, read when it had `signature`."""
        records, trailing = parse_pool(data)
        return cls(records, trailing, signature, signature.mtime_ns)

    def reindex(self) -> None:
        self.slots = {}
        invalid = False
        for slot, record in enumerate(self.records):
            if record.valid:
                self.slots.setdefault(record.key, []).append(slot)
            else:
                invalid = True
        self.visible = (
            [slot for slot, r in enumerate(self.records) if r.valid] if invalid else None
        )

    def get(self, key: bytes) -> bytes | None:
        """The value of the last valid record with `key`, or None."""
        slots = self.slots.get(key)
        return self.records[slots[-1]].value if slots else None

    def visible_count(self) -> int:
        """How many records the host may see (the valid ones, duplicates included)."""
        return len(self.records) if self.visible is None else len(self.visible)

    def visible_record(self, index: int) -> Record | None:
        """The index-th record the host may see, in file order."""
        if index < 0 or index >= self.visible_count():
            return None
        return self.records[index if self.visible is None else self.visible[index]]

    def invalid_slots(self) -> list[int]:
        """Slots of records never shown: not UTF-8, or an empty key."""
        return [slot for slot, r in enumerate(self.records) if not r.valid]

    def unique_keys(self) -> Iterator[bytes]:
        """Every key once, in the order of its first appearance."""
        return iter(self.slots)

    def last_wins(self) -> dict[bytes, bytes]:
        """Key -> value of its last valid record (what the mount and lookups show), ordered by
        each key's first appearance."""
        return {key: self.records[slots[-1]].value for key, slots in self.slots.items()}

    def apply(self, change: writeplan.Plan) -> PoolRecords:
        """The pool once `change` (planned from these records) is made: these records changed
        in place and reindexed only as far as needed, or new ones when records shifted."""
        if isinstance(change, writeplan.Modify):
            self.records[change.slot] = change.record
        elif isinstance(change, writeplan.Append):
            slot = change.slot
            del self.records[slot:]
            self.records.append(change.record)
            if change.record.valid:
                self.slots.setdefault(change.record.key, []).append(slot)
                if self.visible is not None:
                    self.visible.append(slot)
            else:
                self.reindex()
        elif isinstance(change, writeplan.Truncate):
            # The common delete (the newest key): no later slot moves, no reindex.
            del self.records[change.slot:]
            del self.slots[change.key]
            if self.visible is not None:
                self.visible = [slot for slot in self.visible if slot < change.slot]
        elif isinstance(change, writeplan.Remove):
            return PoolRecords(list(change.remaining))
        return self
