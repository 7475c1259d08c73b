"""One pool record: 2560 bytes, `char key[512]; char value[2048];`, each cut at its first NUL.

The reference daemon and other writers leave stale bytes (old values, heap garbage) after the
terminator, so nothing after a NUL is ever read. Records that are not valid UTF-8, or whose
fields are not NUL-terminated, keep their original bytes in `Record.raw`, so that shifting them
during a delete copies them back untouched. Pure: bytes in, records out, and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpfs.wire.protocol import KEY_FIELD, VALUE_FIELD

__all__ = ["KEY_FIELD", "RECORD_SIZE", "VALUE_FIELD", "Record", "encode_record", "parse_pool",
           "slot_bytes"]

RECORD_SIZE = KEY_FIELD + VALUE_FIELD  # 2560


@dataclass(frozen=True, slots=True)
class Record:
    """One 2560-byte slot, key and value cut at their first NUL.

    `raw` is the original slot for records that cannot be rewritten faithfully from key and
    value (not `valid`, or a field with no NUL terminator), so a delete that shifts them copies
    them back byte for byte instead of "repairing" data we do not understand.
    """

    key: bytes
    value: bytes
    raw: bytes | None = None
    # Non-empty key, and both fields UTF-8 (what the host can receive). Decided once here:
    # indexing a pool asks it of every record.
    valid: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        try:
            self.key.decode("utf-8")
            self.value.decode("utf-8")
            valid = bool(self.key)
        except UnicodeDecodeError:
            valid = False
        object.__setattr__(self, "valid", valid)


def _parse_record(data: bytes | bytearray, start: int = 0) -> Record:
    """The record in the slot at `start`, copying only its key and value."""
    value_start = start + KEY_FIELD
    key_end = data.find(b"\0", start, value_start)
    value_end = data.find(b"\0", value_start, value_start + VALUE_FIELD)
    unterminated = key_end < 0 or value_end < 0
    key = bytes(data[start : value_start if key_end < 0 else key_end])
    value = bytes(data[value_start : value_start + VALUE_FIELD if value_end < 0 else value_end])
    record = Record(key, value)
    if not record.valid or unterminated:
        return Record(key, value, bytes(data[start : start + RECORD_SIZE]))
    return record


def parse_pool(data: bytes | bytearray) -> tuple[list[Record], int]:
    """Split a pool file's contents into records; also return the trailing partial length.

    Duplicate keys are kept, in file order: pool 1 writers only append, and the later record
    is the newer one.
    """
    count = len(data) // RECORD_SIZE
    records = [_parse_record(data, i * RECORD_SIZE) for i in range(count)]
    return records, len(data) - count * RECORD_SIZE


def encode_record(key: bytes, value: bytes) -> bytes:
    """One zero-padded 2560-byte slot.

    Zero padding (rather than the reference daemon's copy of only the new bytes) keeps stale
    data from leaking; a NUL terminator always fits, so every reader stops where we meant.
    """
    if not isinstance(key, bytes | bytearray | memoryview) or not isinstance(
        value, bytes | bytearray | memoryview
    ):
        raise TypeError("KVP key and value must be bytes (UTF-8 encoded)")
    key, value = bytes(key), bytes(value)
    if b"\0" in key:
        raise ValueError("KVP key contains a NUL byte; NUL terminates the key in the pool file")
    if b"\0" in value:
        raise ValueError("KVP value contains a NUL byte; NUL terminates the value in the pool file")
    if len(key) > KEY_FIELD - 1:
        raise ValueError(
            f"KVP key is {len(key)} bytes; at most {KEY_FIELD - 1} fit in the {KEY_FIELD}-byte "
            "key field with its NUL terminator"
        )
    if len(value) > VALUE_FIELD - 1:
        raise ValueError(
            f"KVP value is {len(value)} bytes; at most {VALUE_FIELD - 1} fit in the "
            f"{VALUE_FIELD}-byte value field with its NUL terminator"
        )
    return key.ljust(KEY_FIELD, b"\0") + value.ljust(VALUE_FIELD, b"\0")


def slot_bytes(record: Record) -> bytes:
    """The bytes a record is written back as when it is shifted by a delete."""
    if record.raw is not None:
        if len(record.raw) != RECORD_SIZE:
            raise ValueError(f"Record.raw must be {RECORD_SIZE} bytes, not {len(record.raw)}")
        return record.raw
    return encode_record(record.key, record.value)
