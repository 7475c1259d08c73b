"""The write rules of a pool, as pure data: given its records and an edit, what to write.

kvpfs and `kvpfs set/rm` change pool files by the same rules, the reference daemon's,
minus its bugs:

* an upsert changes the *last* valid record with the key in place (the one lookups, the
  mount and the host's GET see; earlier duplicates, which cloud-init style appenders leave,
  stay as they are), or appends a record; the same value again writes nothing;
* a delete removes *every* valid record with the key, keeping the others in order; when
  they are the last records of the file that is only a truncation.

`plan` decides; `storage.poolfile.PoolFile.apply` carries a plan out under the pool's lock,
and the store updates its memory from the same plan (`storage.poolrecords.PoolRecords.apply`).
No I/O here, so the rules are tested with records alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvpfs.storage.records import Record


@dataclass(frozen=True, slots=True)
class Upsert:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


Edit = Upsert | Delete


@dataclass(frozen=True, slots=True)
class Unchanged:
    """Nothing to write: the value is already there, or the key is not."""


@dataclass(frozen=True, slots=True)
class Modify:
    """Overwrite record `slot` in place."""

    slot: int
    record: Record


@dataclass(frozen=True, slots=True)
class Append:
    """Add `record` after the last whole record (it becomes slot `slot`)."""

    slot: int
    record: Record


@dataclass(frozen=True, slots=True)
class Truncate:
    """Drop the records in `slots`: the deleted key held exactly the last records."""

    slots: tuple[int, ...]
    key: bytes

    @property
    def slot(self) -> int:
        """The first record dropped: the file keeps `slot` records."""
        return self.slots[0]


@dataclass(frozen=True, slots=True)
class Remove:
    """Delete `slots` (ascending) and shift the later records up; `remaining` is the result."""

    slots: tuple[int, ...]
    key: bytes
    remaining: tuple[Record, ...]


Plan = Unchanged | Modify | Append | Truncate | Remove


def key_slots(records: Sequence[Record], key: bytes) -> list[int]:
    """Every valid record holding `key`, in file order."""
    return [slot for slot, record in enumerate(records) if record.valid and record.key == key]


def plan(records: Sequence[Record], edit: Edit, slots: Sequence[int] | None = None) -> Plan:
    """What `edit` writes to a pool holding `records`.

    `slots` may give `key_slots(records, edit.key)` from an index the caller keeps.
    """
    if slots is None:
        slots = key_slots(records, edit.key)
    if isinstance(edit, Upsert):
        record = Record(edit.key, edit.value)
        if not slots:
            return Append(len(records), record)
        if records[slots[-1]].value == edit.value:
            return Unchanged()
        return Modify(slots[-1], record)
    if not slots:
        return Unchanged()
    if list(slots) == list(range(slots[0], len(records))):
        return Truncate(tuple(slots), edit.key)
    doomed = set(slots)
    remaining = tuple(r for slot, r in enumerate(records) if slot not in doomed)
    return Remove(tuple(slots), edit.key, remaining)
