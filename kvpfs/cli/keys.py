"""`kvpfs get/set/rm/ls`: one pool's keys, read and changed in the pool file itself.

These work on the pool files directly, so they serve machines where kvpfs is not running (an
initramfs, a rescue shell, a container with the directory bind-mounted, a machine still on
hv_kvp_daemon) as well as machines where it is:

* reads take the shared locks (OFD read lock + `flock(LOCK_SH)`), so a reader never sees the
  reference daemon's truncate-and-rewrite half done, and never create or modify anything;
* writes take `PoolFile.locked()` (OFD write lock + `flock(LOCK_EX)`, crash recovery) and
  follow the same write plan as the mount (`kvpfs.storage.writeplan`). A running kvpfs on the
  same directory notices within a second (it compares file signatures four times a second),
  as it notices cloud-init's appends;
* a key or value the host could not receive whole is refused with nothing written (the
  limits of `kvpfs.wire.limits`, the mount's);
* records that are not valid UTF-8 (or have an empty key) are never printed as values: the
  host never sees them either. They are counted, and listed by slot with `--all-records`.

All output is UTF-8 bytes whatever the locale (KVP data is UTF-8).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

from kvpfs.cli.formats import (
    DEFAULT_EXPORT_PREFIX,
    VALID_PREFIX,
    format_export,
    format_json,
    format_text,
)
from kvpfs.cli.results import EXIT_NOT_FOUND, Output, UsageError
from kvpfs.storage import writeplan
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.storage.poolfile import PoolFile, pool_path
from kvpfs.storage.readonly import read_pool
from kvpfs.wire import limits
from kvpfs.wire.protocol import Pool


def check_key(key: bytes) -> None:
    """Refuse a key the host could not receive whole (UsageError naming the limit)."""
    try:
        limits.check_key(key)
    except limits.LimitError as exc:
        raise UsageError(str(exc)) from None


def check_value(value: bytes) -> None:
    """Refuse a value the host could not receive whole (UsageError naming the limit)."""
    try:
        limits.check_value(value)
    except limits.LimitError as exc:
        raise UsageError(str(exc)) from None


def check_writable(pool: int, force: bool) -> None:
    """Only pool 1 (guest) reaches the host; refuse the others unless forced (never pool 2)."""
    if pool == Pool.GUEST:
        return
    name = f"{Pool(pool).dirname} ({pool})"
    if pool == Pool.AUTO:
        raise UsageError(
            f"pool {name} is computed by the daemon each time the host asks; its file is not "
            "read by anyone, so writing it would change nothing. Write guest data to pool guest"
        )
    if not force:
        raise UsageError(
            f"pool {name} holds data the host sends: the host never reads what the guest "
            "writes there, and the daemon overwrites it when the host sends its items again. "
            "Guest data goes to pool guest (1); use --force-pool to change this pool file anyway "
            "(for tests, or to repair a file)"
        )


# --------------------------------------------------------------------------- writing


def set_key(pool_dir: Path, pool: int, key: bytes, value: bytes, *,
            lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> str:
    """Upsert as the daemon does; returns "modified", "appended" or "unchanged".

    The last valid record with the key is modified in place (earlier duplicates, which
    cloud-init style appenders leave, stay as they are); otherwise a record is appended. An
    identical value writes nothing. The pool file (and directory) is created 0600 (0700) if
    missing, as kvpfs and the reference daemon do.
    """
    check_key(key)
    check_value(value)
    pf = PoolFile(pool_path(pool_dir, pool), lock_timeout=lock_timeout)
    try:
        with pf.locked():
            records = pf.read().records
            change = writeplan.plan(records, writeplan.Upsert(key, value))
            pf.apply(change, records)
    finally:
        pf.close()
    if isinstance(change, writeplan.Modify):
        return "modified"
    return "appended" if isinstance(change, writeplan.Append) else "unchanged"


def delete_key(pool_dir: Path, pool: int, key: bytes, *,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> int:
    """Remove every valid record with `key`, last to first, keeping the others' order.

    Returns how many were removed. A missing pool file is not created.
    """
    path = pool_path(pool_dir, pool)
    if not os.path.lexists(path):
        return 0
    pf = PoolFile(path, lock_timeout=lock_timeout)
    try:
        with pf.locked():
            records = pf.read().records
            change = writeplan.plan(records, writeplan.Delete(key))
            pf.apply(change, records)
    finally:
        pf.close()
    return len(change.slots) if isinstance(change, writeplan.Truncate | writeplan.Remove) else 0


# --------------------------------------------------------------------------- commands


def _key_bytes(key: str) -> bytes:
    """The key's bytes exactly as given on the command line (argv is bytes underneath)."""
    return os.fsencode(key)


def cmd_get(pool_dir: Path, pool: int, key: str, *, raw: bool = False,
            lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Output:
    """The value of the key's last valid record, then a newline unless `raw`."""
    key_bytes = _key_bytes(key)
    contents = read_pool(pool_dir, pool, lock_timeout=lock_timeout)
    value = contents.get(key_bytes)
    if value is not None:
        return Output(value if raw else value + b"\n")
    notes = []
    hidden = [s for s, r in enumerate(contents.records) if not r.valid and r.key == key_bytes]
    if hidden:
        notes.append(f"pool {contents.name} has the key only in records that are not valid "
                     f"UTF-8 (slot {', '.join(map(str, hidden))}); they are never shown")
    if not contents.exists:
        notes.append(f"{contents.path} does not exist")
    if pool == Pool.AUTO:
        notes.append("pool auto (2) is computed by the daemon when the host asks and is not "
                     "stored in its file; read it from a kvpfs mount (auto/)")
    return Output(b"", notes, EXIT_NOT_FOUND)


def read_value(value: str, *, raw: bool, stdin: BinaryIO | None = None) -> bytes:
    """VALUE from the command line, or from stdin for `-` (one trailing newline dropped
    unless `raw`, as the mount does for `echo value > file`)."""
    if value != "-":
        return os.fsencode(value)
    # Read no more than could be valid (the limit and a newline) plus one byte to tell.
    source = stdin or sys.stdin.buffer
    data = b""
    while len(data) <= limits.VALUE_MAX_BYTES + 1:
        chunk = source.read(limits.VALUE_MAX_BYTES + 2 - len(data))
        if not chunk:
            break
        data += chunk
    if not raw and data.endswith(b"\n"):
        data = data[:-1]
    if len(data) > limits.VALUE_MAX_BYTES:
        raise UsageError(f"the value on stdin is longer than {limits.VALUE_MAX_BYTES} bytes;"
                         f" the host takes at most {limits.VALUE_MAX_UNITS} UTF-16 units. Split"
                         " it into several keys")
    return data


def cmd_set(pool_dir: Path, pool: int, key: str, value: str, *, raw: bool = False,
            force_pool: bool = False, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
            stdin: BinaryIO | None = None) -> Output:
    check_writable(pool, force_pool)
    key_bytes = _key_bytes(key)
    check_key(key_bytes)  # before reading stdin: a bad key should not consume input
    data = read_value(value, raw=raw, stdin=stdin)
    set_key(pool_dir, pool, key_bytes, data, lock_timeout=lock_timeout)
    return Output()


def cmd_rm(pool_dir: Path, pool: int, key: str, *, force_pool: bool = False,
           missing_ok: bool = False, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Output:
    check_writable(pool, force_pool)
    key_bytes = _key_bytes(key)
    if delete_key(pool_dir, pool, key_bytes, lock_timeout=lock_timeout) or missing_ok:
        return Output()
    return Output(b"", [f"no key {key!r} in pool {Pool(pool).dirname}"], EXIT_NOT_FOUND)


def cmd_ls(pool_dir: Path, pool: int, *, fmt: str = "text", all_records: bool = False,
           prefix: str = DEFAULT_EXPORT_PREFIX, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
           ) -> Output:
    """`fmt` is "text", "json" or "export"."""
    if fmt == "export" and all_records:
        raise UsageError("--export prints one variable per key; it cannot show --all-records")
    if fmt == "export" and not VALID_PREFIX.fullmatch(prefix):
        raise UsageError(f"--prefix {prefix!r} is not a shell variable name "
                         "(letters, digits and _, not starting with a digit)")
    contents = read_pool(pool_dir, pool, lock_timeout=lock_timeout)
    if fmt == "json":
        out = format_json(contents, all_records=all_records)
    elif fmt == "export":
        out = format_export(contents, prefix=prefix)
    else:
        out = format_text(contents, all_records=all_records)
    if not contents.exists:
        out.notes.insert(0, f"{contents.path} does not exist: an empty pool")
    if pool == Pool.AUTO and not contents.records:
        out.notes.append("pool auto (2) is computed by the daemon when the host asks and is "
                         "not stored in its file; read it from a kvpfs mount (auto/)")
    return out


