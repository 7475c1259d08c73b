"""How `kvpfs ls` prints a pool: one line per record, JSON, or shell variables."""

from __future__ import annotations

import re

from kvpfs.cli.results import JsonObject, Output, UsageError, json_bytes
from kvpfs.storage.readonly import PoolFileRead
from kvpfs.storage.records import Record

DEFAULT_EXPORT_PREFIX = "KVP_"


def invalid_reason(record: Record) -> str:
    if not record.key:
        return "empty key"
    try:
        record.key.decode("utf-8")
    except UnicodeDecodeError:
        return "key is not valid UTF-8"
    return "value is not valid UTF-8"


_TEXT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_text(text: str) -> str:
    """One-line form for `ls` text output: backslash, tab, CR, LF and other control
    characters as C-style escapes, so each record is exactly one line of tab-separated
    fields. Exact values come from `get`, `--json` or `--export`."""
    out = []
    for char in text:
        if char in _TEXT_ESCAPES:
            out.append(_TEXT_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def shell_quote(text: str) -> str:
    """Single-quoted for any POSIX shell: only `'` needs care, written as '\\''."""
    return "'" + text.replace("'", "'\\''") + "'"


_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")
VALID_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def export_name(key: str, prefix: str = DEFAULT_EXPORT_PREFIX) -> str:
    """`prefix` + key with every character other than A-Z a-z 0-9 _ replaced by `_`
    (a non-ASCII character counts as one)."""
    return prefix + _NOT_NAME.sub("_", key)


def invalid_entry(slot: int, record: Record) -> JsonObject:
    """How an invalid record appears in JSON: where it is and what its key bytes are, never
    its value (which the host never sees either)."""
    return {"invalid": True, "slot": slot, "reason": invalid_reason(record),
            "key_hex": record.key.hex(), "value_bytes": len(record.value)}


def utf8_text(data: bytes) -> str:
    return data.decode("utf-8")  # only called on records that are `valid`


def _invalid_note(contents: PoolFileRead) -> list[str]:
    slots = contents.invalid_slots()
    if not slots:
        return []
    listed = ", ".join(str(s) for s in slots[:10]) + (", ..." if len(slots) > 10 else "")
    return [f"pool {contents.name}: {len(slots)} record(s) not shown because they are not "
            f"valid UTF-8 or have an empty key (slot {listed}); the host never sees them "
            f"either. `kvpfs ls {contents.name} --all-records` lists them"]


def format_text(contents: PoolFileRead, *, all_records: bool = False) -> Output:
    """`KEY<TAB>VALUE` per key (last wins), or `SLOT<TAB>KEY<TAB>VALUE` per record."""
    lines = []
    if all_records:
        for slot, record in enumerate(contents.records):
            if record.valid:
                lines.append(f"{slot}\t{escape_text(utf8_text(record.key))}\t"
                             f"{escape_text(utf8_text(record.value))}")
            else:
                lines.append(f"{slot}\t(invalid record: {invalid_reason(record)}; "
                             f"key_hex {record.key.hex()})")
        notes = []
    else:
        for key, value in contents.last_wins().items():
            lines.append(f"{escape_text(utf8_text(key))}\t{escape_text(utf8_text(value))}")
        notes = _invalid_note(contents)
    return Output("".join(line + "\n" for line in lines).encode("utf-8"), notes)


def format_json(contents: PoolFileRead, *, all_records: bool = False) -> Output:
    """An object key -> value (last wins), or a list of [key, value] in file order with
    duplicates and `invalid_entry` objects."""
    if all_records:
        entries: list[object] = [
            [utf8_text(r.key), utf8_text(r.value)] if r.valid else invalid_entry(slot, r)
            for slot, r in enumerate(contents.records)
        ]
        return Output(json_bytes(entries))
    obj = {utf8_text(k): utf8_text(v) for k, v in contents.last_wins().items()}
    return Output(json_bytes(obj), _invalid_note(contents))


def format_export(contents: PoolFileRead, *, prefix: str = DEFAULT_EXPORT_PREFIX) -> Output:
    """`export NAME='value'` per key (last wins), for `eval`. Keys that map to the same name
    are all printed, in file order (so the last one wins), and reported on stderr."""
    if not VALID_PREFIX.fullmatch(prefix):
        raise UsageError(f"--prefix {prefix!r} is not a shell variable name "
                         "(letters, digits and _, not starting with a digit)")
    lines = []
    by_name: dict[str, list[str]] = {}
    for key, value in contents.last_wins().items():
        text = utf8_text(key)
        name = export_name(text, prefix)
        by_name.setdefault(name, []).append(text)
        lines.append(f"export {name}={shell_quote(utf8_text(value))}\n")
    notes = _invalid_note(contents)
    for name, keys in by_name.items():
        if len(keys) > 1:
            notes.append(f"keys {', '.join(repr(k) for k in keys)} of pool {contents.name} all "
                         f"become {name}; all are printed and the last ({keys[-1]!r}) wins")
    return Output("".join(lines).encode("utf-8"), notes)


