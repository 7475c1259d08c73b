"""`kvpfs get/set/rm/ls/status/dump`: the pool files for scripts, with or without a mount.

Everything here works on the pool files directly, so it serves machines where kvpfs is not
running (an initramfs, a rescue shell, a container with the directory bind-mounted, a machine
still on hv_kvp_daemon) as well as machines where it is. It uses the daemon's own rules:

* reads take the shared locks (OFD read lock + `flock(LOCK_SH)`), so a reader never sees the
  reference daemon's truncate-and-rewrite half done, and never create or modify anything;
* writes go through `PoolFile.locked()` (OFD write lock + `flock(LOCK_EX)`, crash recovery)
  and change the file exactly as `kvpfs.storage.store` does: an upsert modifies the last valid
  record with the key in place or appends one, a delete removes every valid record with the key,
  last to first. A running kvpfs on the same directory notices within a second (it compares
  file signatures four times a second), as it notices cloud-init's appends;
* a key or value the host could not receive whole is refused with nothing written (the same
  limits as the mount: key 254 UTF-16 units / 511 bytes, value 1022 units / 2047 bytes,
  valid UTF-8, no NUL);
* records that are not valid UTF-8 (or have an empty key) are never printed as values: the
  host never sees them either. They are counted, and listed by slot with `--all-records`.

All output is UTF-8 bytes whatever the locale (KVP data is UTF-8). Functions raise `ToolError`
(with the exit status to use) or `PoolFileError` (an I/O problem, exit status 4); `run` turns
both into a message on stderr and an exit status. No argparse here: `kvpfs.cli.main` parses.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import io
import json
import os
import platform
import pwd
import re
import socket
import stat
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

from kvpfs import __version__
from kvpfs.storage import writeplan
from kvpfs.storage.poolfile import (
    POOL_COUNT,
    PoolContents,
    PoolFile,
    PoolFileError,
    Record,
    pool_path,
    read_pool,
)
from kvpfs.wire import limits
from kvpfs.wire.pools import AUTO, GUEST, POOL_NAMES

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_IO = 4

DEFAULT_POOL_DIR = Path("/var/lib/hyperv")
DEFAULT_LOCK_TIMEOUT = 5.0
DEFAULT_EXPORT_PREFIX = "KVP_"

HV_KVP_DAEMON_NAMES = ("hv_kvp_daemon", "hypervkvpd")  # Debian/Ubuntu, RHEL/SUSE
MOUNT_PROBE_TIMEOUT = 3.0


class ToolError(Exception):
    """A failure with a known exit status; the message is printed as is."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ToolError):
    """Bad arguments or a key/value the host could not receive (exit 2, nothing written)."""

    exit_code = EXIT_USAGE


class NotFound(ToolError):
    """The key (or pool file) does not exist (exit 1)."""

    exit_code = EXIT_NOT_FOUND


@dataclass
class Output:
    """What a command prints: stdout bytes, notes for stderr, and its exit status."""

    stdout: bytes = b""
    notes: list[str] = field(default_factory=list)
    code: int = EXIT_OK


# --------------------------------------------------------------------------- reading


def invalid_reason(record: Record) -> str:
    if not record.key:
        return "empty key"
    try:
        record.key.decode("utf-8")
    except UnicodeDecodeError:
        return "key is not valid UTF-8"
    return "value is not valid UTF-8"


# --------------------------------------------------------------------------- validation


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
    if pool == GUEST:
        return
    name = f"{POOL_NAMES[pool]} ({pool})"
    if pool == AUTO:
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


# --------------------------------------------------------------------------- formats


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
_VALID_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def export_name(key: str, prefix: str = DEFAULT_EXPORT_PREFIX) -> str:
    """`prefix` + key with every character other than A-Z a-z 0-9 _ replaced by `_`
    (a non-ASCII character counts as one)."""
    return prefix + _NOT_NAME.sub("_", key)


def invalid_entry(slot: int, record: Record) -> dict:
    """How an invalid record appears in JSON: where it is and what its key bytes are, never
    its value (which the host never sees either)."""
    return {"invalid": True, "slot": slot, "reason": invalid_reason(record),
            "key_hex": record.key.hex(), "value_bytes": len(record.value)}


def json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _decode(data: bytes) -> str:
    return data.decode("utf-8")  # only called on records that are `valid`


def _invalid_note(contents: PoolContents) -> list[str]:
    slots = contents.invalid_slots()
    if not slots:
        return []
    listed = ", ".join(str(s) for s in slots[:10]) + (", ..." if len(slots) > 10 else "")
    return [f"pool {contents.name}: {len(slots)} record(s) not shown because they are not "
            f"valid UTF-8 or have an empty key (slot {listed}); the host never sees them "
            f"either. `kvpfs ls {contents.name} --all-records` lists them"]


def format_text(contents: PoolContents, *, all_records: bool = False) -> Output:
    """`KEY<TAB>VALUE` per key (last wins), or `SLOT<TAB>KEY<TAB>VALUE` per record."""
    lines = []
    if all_records:
        for slot, record in enumerate(contents.records):
            if record.valid:
                lines.append(f"{slot}\t{escape_text(_decode(record.key))}\t"
                             f"{escape_text(_decode(record.value))}")
            else:
                lines.append(f"{slot}\t(invalid record: {invalid_reason(record)}; "
                             f"key_hex {record.key.hex()})")
        notes = []
    else:
        for key, value in contents.last_wins().items():
            lines.append(f"{escape_text(_decode(key))}\t{escape_text(_decode(value))}")
        notes = _invalid_note(contents)
    return Output("".join(line + "\n" for line in lines).encode("utf-8"), notes)


def format_json(contents: PoolContents, *, all_records: bool = False) -> Output:
    """An object key -> value (last wins), or a list of [key, value] in file order with
    duplicates and `invalid_entry` objects."""
    if all_records:
        entries: list = [
            [_decode(r.key), _decode(r.value)] if r.valid else invalid_entry(slot, r)
            for slot, r in enumerate(contents.records)
        ]
        return Output(json_bytes(entries))
    obj = {_decode(k): _decode(v) for k, v in contents.last_wins().items()}
    return Output(json_bytes(obj), _invalid_note(contents))


def format_export(contents: PoolContents, *, prefix: str = DEFAULT_EXPORT_PREFIX) -> Output:
    """`export NAME='value'` per key (last wins), for `eval`. Keys that map to the same name
    are all printed, in file order (so the last one wins), and reported on stderr."""
    if not _VALID_PREFIX.fullmatch(prefix):
        raise UsageError(f"--prefix {prefix!r} is not a shell variable name "
                         "(letters, digits and _, not starting with a digit)")
    lines = []
    by_name: dict[str, list[str]] = {}
    for key, value in contents.last_wins().items():
        text = _decode(key)
        name = export_name(text, prefix)
        by_name.setdefault(name, []).append(text)
        lines.append(f"export {name}={shell_quote(_decode(value))}\n")
    notes = _invalid_note(contents)
    for name, keys in by_name.items():
        if len(keys) > 1:
            notes.append(f"keys {', '.join(repr(k) for k in keys)} of pool {contents.name} all "
                         f"become {name}; all are printed and the last ({keys[-1]!r}) wins")
    return Output("".join(lines).encode("utf-8"), notes)


# --------------------------------------------------------------------------- status


def boot_time() -> float | None:
    """When this system booted (`btime` in /proc/stat), or None if unknown."""
    try:
        with open("/proc/stat", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def hv_kvp_daemons() -> list[dict]:
    """Running hv_kvp_daemon processes visible here (/proc/*/comm)."""
    found = []
    try:
        pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in HV_KVP_DAEMON_NAMES:
            found.append({"pid": pid, "comm": comm})
    return found


def _probe_mount(mountpoint: Path) -> dict:
    """Ask one kvpfs mount for its status through its control socket."""
    from kvpfs import control  # imports trio; only needed here

    info: dict = {"mountpoint": str(mountpoint)}
    try:
        path = Path(os.fsdecode(os.getxattr(mountpoint, control.CONTROL_XATTR)))
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            info["error"] = ("dead mount: its kvpfs process is gone; unmount it with "
                             f"`fusermount3 -u {mountpoint}`")
        else:
            info["error"] = f"cannot ask the mount for its control socket: {exc.strerror}"
        return info
    info["control"] = str(path)
    try:
        answer = control.call(path, {"op": "status"}, timeout=MOUNT_PROBE_TIMEOUT)
    except (control.ControlError, OSError, ValueError) as exc:
        info["error"] = str(exc)
        return info
    for name in ("version", "simulated", "pool_dir", "registrations"):
        if name in answer:
            info[name] = answer[name]
    return info


def kvpfs_mounts(pool_dir: Path) -> list[dict]:
    """Running kvpfs mounts, each with its pool directory and whether it is `pool_dir`.

    Each probe runs in a daemon thread with a time bound: a stopped kvpfs would otherwise
    hang the getxattr on its mount, and status is what one runs to diagnose exactly that.
    Mounts stacked on one path are probed once (only the top one is reachable).
    """
    from kvpfs import control

    counts: dict[Path, int] = {}
    for mountpoint in control.kvpfs_mounts():
        counts[mountpoint] = counts.get(mountpoint, 0) + 1
    results = []
    for mountpoint, count in counts.items():
        box: list[dict] = []
        thread = threading.Thread(target=lambda m=mountpoint, b=box: b.append(_probe_mount(m)),
                                  daemon=True)
        thread.start()
        thread.join(MOUNT_PROBE_TIMEOUT + 1)
        info = box[0] if box else {"mountpoint": str(mountpoint),
                                   "error": "no answer (the kvpfs process may be stopped)"}
        if count > 1:
            info["stacked"] = count
        if "pool_dir" in info:
            info["same_pool_dir"] = _same_dir(Path(info["pool_dir"]), pool_dir)
        results.append(info)
    return results


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def pool_status(contents: PoolContents, boot: float | None) -> dict:
    """Counts, size, mode and age of one pool (as `kvpfs status --json` shows it)."""
    valid = contents.valid_items()
    unique = len({key for key, _ in valid})
    st = contents.stat_result
    info: dict = {
        "pool": contents.pool,
        "name": contents.name,
        "path": str(contents.path),
        "exists": st is not None,
        "records": len(contents.records),
        "unique_keys": unique,
        "duplicates": len(valid) - unique,
        "invalid": len(contents.records) - len(valid),
        "invalid_slots": contents.invalid_slots(),
        "trailing_bytes": contents.trailing_bytes,
        "size": 0 if st is None else st.st_size,
        "mode": None if st is None else f"{stat.S_IMODE(st.st_mode):04o}",
        "owner": None if st is None else _owner(st.st_uid),
        "mtime": None if st is None else st.st_mtime,
        "mtime_iso": None if st is None else _iso(st.st_mtime),
        "predates_boot": None if st is None or boot is None else st.st_mtime < boot,
        "interrupted_change": contents.unfinished_change,
    }
    return info


def collect_status(pool_dir: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
                   ) -> tuple[dict, dict[int, PoolContents]]:
    """Status of the whole pool directory, plus the contents it was computed from.

    A pool that cannot be read gets an "error" entry instead of stopping the others.
    """
    boot = boot_time()
    status: dict = {
        "pool_dir": str(pool_dir),
        "pool_dir_exists": pool_dir.is_dir(),
        "boot_time": boot,
        "boot_time_iso": None if boot is None else _iso(boot),
        "kvpfs_mounts": kvpfs_mounts(pool_dir),
        "hv_kvp_daemon": hv_kvp_daemons(),
        "pools": [],
    }
    contents: dict[int, PoolContents] = {}
    for pool in range(POOL_COUNT):
        try:
            contents[pool] = read_pool(pool_dir, pool, lock_timeout=lock_timeout)
        except PoolFileError as exc:
            status["pools"].append({"pool": pool, "name": POOL_NAMES[pool],
                                    "path": str(pool_path(pool_dir, pool)), "error": str(exc)})
            continue
        status["pools"].append(pool_status(contents[pool], boot))
    return status, contents


def status_notes(status: dict) -> list[str]:
    """Things worth a sentence: stale pools, unreadable or damaged records, exposure."""
    notes = []
    if status["hv_kvp_daemon"] and any(not m.get("simulated") for m in status["kvpfs_mounts"]):
        notes.append("hv_kvp_daemon and kvpfs both run; only one of them can own the device")
    if not status["hv_kvp_daemon"] and all("error" in m for m in status["kvpfs_mounts"]):
        notes.append("neither kvpfs nor hv_kvp_daemon is running here: nothing answers the "
                     "host, and host data in the pools is only what an earlier run left")
    for info in status["pools"]:
        label = f"pool {info['pool']} ({info['name']})"
        if "error" in info:
            notes.append(f"{label}: {info['error']}")
            continue
        if info["predates_boot"] and info["records"] and info["pool"] != AUTO:
            notes.append(f"{label} last changed before this boot ({info['mtime_iso']}); it may "
                         "be left over from an earlier boot or a captured image")
        if info["invalid"]:
            notes.append(f"{label}: {info['invalid']} record(s) are not valid UTF-8 or have "
                         f"an empty key (slots {info['invalid_slots']}); they are never shown "
                         "or sent to the host")
        if info["trailing_bytes"]:
            notes.append(f"{label} ends with {info['trailing_bytes']} bytes of a partial "
                         "record (a writer was interrupted); they are ignored")
        if info["interrupted_change"]:
            notes.append(f"{label}: a kvpfs change was interrupted; the next write finishes it")
        mode = int(info["mode"], 8) if info["mode"] else 0
        if info["pool"] == 0 and mode & 0o044:
            notes.append(f"{label} is readable by other users (mode {info['mode']}) and often "
                         "holds secrets; chmod 600 it")
    return notes


def format_status(status: dict) -> str:
    """The human-readable `kvpfs status`."""
    lines = [f"pool directory  {status['pool_dir']}"
             + ("" if status["pool_dir_exists"] else " (does not exist)")]
    if status["boot_time_iso"]:
        lines.append(f"booted          {status['boot_time_iso']}")
    mounts = status["kvpfs_mounts"]
    if not mounts:
        lines.append("kvpfs           no mount")
    for info in mounts:
        if "error" in info:
            detail = f"unreachable: {info['error']}"
        else:
            same = "" if info.get("same_pool_dir") else ", a different pool directory"
            detail = f"kvpfs {info.get('version', '?')}, pools in {info.get('pool_dir')}{same}"
            if info.get("simulated"):
                detail += ", simulated host"
        if info.get("stacked"):
            detail += f"; {info['stacked']} mounts stacked there"
        lines.append(f"kvpfs           mounted on {info['mountpoint']} ({detail})")
    daemons = status["hv_kvp_daemon"]
    lines.append("hv_kvp_daemon   " + (", ".join(f"running (pid {d['pid']}, {d['comm']})"
                                                 for d in daemons) or "not running"))
    lines.append("")
    header = ("POOL", "RECORDS", "KEYS", "DUPS", "INVALID", "PARTIAL", "SIZE", "MODE",
              "CHANGED", "THIS BOOT")
    rows = []
    for info in status["pools"]:
        label = f"{info['pool']} {info['name']}"
        if "error" in info:
            rows.append((label, "unreadable, see below"))
        elif not info["exists"]:
            rows.append((label, "no file"))
        else:
            this_boot = "-" if info["predates_boot"] is None else (
                "no" if info["predates_boot"] else "yes")
            rows.append((label, str(info["records"]), str(info["unique_keys"]),
                         str(info["duplicates"]), str(info["invalid"]),
                         str(info["trailing_bytes"]), str(info["size"]),
                         f"{info['mode']} {info['owner']}", info["mtime_iso"], this_boot))
    widths = [max([len(header[i])] + [len(r[i]) for r in rows if len(r) == len(header)])
              for i in range(len(header))]
    right = {1, 2, 3, 4, 5, 6}

    def row_text(cells: tuple[str, ...]) -> str:
        if len(cells) != len(header):
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    lines += [row_text(header), *(row_text(r) for r in rows)]
    notes = status_notes(status)
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- dump


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _os_release() -> str | None:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = _read_small(path)
        if text is None:
            continue
        for line in text.splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip("\"'")
    return None


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def system_info() -> dict:
    """Versions and the facts support asks first (is this a Hyper-V guest, which kernel)."""
    uname = os.uname()
    return {
        "kvpfs": __version__,
        "python": platform.python_version(),
        "trio": _package_version("trio"),
        "pyfuse3": _package_version("pyfuse3"),
        "kernel": uname.release,
        "machine": uname.machine,
        "os": _os_release(),
        "hostname": socket.gethostname(),
        "kvp_device": os.path.exists("/dev/vmbus/hv_kvp"),
        "dmi_sys_vendor": _read_small("/sys/class/dmi/id/sys_vendor"),
        "dmi_product_name": _read_small("/sys/class/dmi/id/product_name"),
    }


def _redacted(record: Record) -> list:
    return [_decode(record.key), f"<redacted: {len(record.value)} bytes>"]


def build_dump(pool_dir: Path, *, redact: bool = False, embed_raw: bool = True,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> tuple[dict, dict[int, bytes]]:
    """The support bundle as one JSON-able dict, plus the raw pool files it decoded.

    Each pool's entry is its `status` entry plus "entries" (every record in file order,
    duplicates and invalid records included, as `ls --json --all-records` prints them) and,
    if `embed_raw`, the file's bytes as "raw_base64". With `redact`, values become
    "<redacted: N bytes>" and no raw bytes are kept anywhere (keys stay: they say which tool
    wrote what).
    """
    status, contents = collect_status(pool_dir, lock_timeout=lock_timeout)
    raws: dict[int, bytes] = {}
    for info in status["pools"]:
        pool = info["pool"]
        if pool not in contents:
            continue
        pool_contents = contents[pool]
        info["entries"] = [
            (_redacted(r) if redact else [_decode(r.key), _decode(r.value)])
            if r.valid else invalid_entry(slot, r)
            for slot, r in enumerate(pool_contents.records)
        ]
        if not redact and pool_contents.exists:
            raws[pool] = pool_contents.data
            if embed_raw:
                info["raw_base64"] = base64.b64encode(pool_contents.data).decode("ascii")
    dump = {
        "format": "kvpfs-dump 1",
        "created": _iso(time.time()),
        "redacted": redact,
        "system": system_info(),
        **status,
    }
    dump["notes"] = status_notes(status)
    return dump, raws


TAR_SUFFIXES = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.xz": "w:xz"}
DUMP_TOP = "kvpfs-dump"


def _tar_mode(output: Path) -> str | None:
    name = output.name
    for suffix, mode in TAR_SUFFIXES.items():
        if name.endswith(suffix):
            return mode
    return None


def write_dump(output: Path, dump: dict, raws: dict[int, bytes]) -> None:
    """Write the bundle as a directory or, for a .tar/.tar.gz/.tgz/.tar.xz name, an archive:
    `dump.json` and `pools/.kvp_pool_N` (the raw files, named as in /var/lib/hyperv so the
    directory works as a `--pool-dir`). Created 0600/0700 (pools carry secrets); an existing
    output is never overwritten."""
    files = {"pools/" + pool_path(Path(), pool).name: data for pool, data in raws.items()}
    for info in dump["pools"]:
        if info["pool"] in raws:
            info["raw_file"] = "pools/" + pool_path(Path(), info["pool"]).name
    files = {"dump.json": json_bytes(dump), **files}
    mode = _tar_mode(output)
    if mode is not None:
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UsageError(f"{output} exists; remove it or choose another name") from None
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode=mode) as tar:
            now = time.time()
            for directory in (DUMP_TOP, f"{DUMP_TOP}/pools")[: 2 if raws else 1]:
                entry = tarfile.TarInfo(directory)
                entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o700, now
                tar.addfile(entry)
            for name, data in files.items():
                entry = tarfile.TarInfo(f"{DUMP_TOP}/{name}")
                entry.size, entry.mode, entry.mtime = len(data), 0o600, now
                tar.addfile(entry, io.BytesIO(data))
        return
    try:
        os.mkdir(output, 0o700)
    except FileExistsError:
        if not output.is_dir() or any(output.iterdir()):
            raise UsageError(f"{output} exists and is not an empty directory; remove it or "
                             "choose another name") from None
    if raws:
        os.mkdir(output / "pools", 0o700)
    for name, data in files.items():
        fd = os.open(output / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


# --------------------------------------------------------------------------- commands


def _key_bytes(key: str) -> bytes:
    """The key's bytes exactly as given on the command line (argv is bytes underneath)."""
    return os.fsencode(key)


def cmd_get(pool_dir: Path, pool: int, key: str, *, raw: bool = False,
            lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Output:
    """The value of the key's last valid record, then a newline unless `raw`."""
    key_bytes = _key_bytes(key)
    contents = read_pool(pool_dir, pool, lock_timeout=lock_timeout)
    value = contents.lookup(key_bytes)
    if value is not None:
        return Output(value if raw else value + b"\n")
    notes = []
    hidden = [s for s, r in enumerate(contents.records) if not r.valid and r.key == key_bytes]
    if hidden:
        notes.append(f"pool {contents.name} has the key only in records that are not valid "
                     f"UTF-8 (slot {', '.join(map(str, hidden))}); they are never shown")
    if not contents.exists:
        notes.append(f"{contents.path} does not exist")
    if pool == AUTO:
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
    return Output(b"", [f"no key {key!r} in pool {POOL_NAMES[pool]}"], EXIT_NOT_FOUND)


def cmd_ls(pool_dir: Path, pool: int, *, fmt: str = "text", all_records: bool = False,
           prefix: str = DEFAULT_EXPORT_PREFIX, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
           ) -> Output:
    """`fmt` is "text", "json" or "export"."""
    if fmt == "export" and all_records:
        raise UsageError("--export prints one variable per key; it cannot show --all-records")
    if fmt == "export" and not _VALID_PREFIX.fullmatch(prefix):
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
    if pool == AUTO and not contents.records:
        out.notes.append("pool auto (2) is computed by the daemon when the host asks and is "
                         "not stored in its file; read it from a kvpfs mount (auto/)")
    return out


def cmd_status(pool_dir: Path, *, as_json: bool = False,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Output:
    status, _ = collect_status(pool_dir, lock_timeout=lock_timeout)
    code = EXIT_IO if any("error" in info for info in status["pools"]) else EXIT_OK
    if as_json:
        status["notes"] = status_notes(status)
        return Output(json_bytes(status), [], code)
    return Output(format_status(status).encode("utf-8"), [], code)


def cmd_dump(pool_dir: Path, *, output: Path | None = None, redact: bool = False,
             lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Output:
    dump, raws = build_dump(pool_dir, redact=redact, embed_raw=output is None,
                            lock_timeout=lock_timeout)
    code = EXIT_IO if any("error" in info for info in dump["pools"]) else EXIT_OK
    notes = []
    if not redact and any(info.get("entries") for info in dump["pools"] if info["pool"] == 0):
        notes.append("the bundle holds pool 0 (external) values, which often carry secrets "
                     "(user data, keys); --redact leaves all values out")
    if output is None:
        return Output(json_bytes(dump), notes, code)
    write_dump(output, dump, raws)
    notes.append(f"wrote {output}")
    return Output(b"", notes, code)


def run(prog: str, command: Callable[..., Output], *args: object, **kwargs: object) -> int:
    """Run a command, print its output and notes, and map failures to exit statuses."""
    try:
        out = command(*args, **kwargs)
    except ToolError as exc:
        _print_notes(prog, [str(exc)])
        return exc.exit_code
    except PoolFileError as exc:
        _print_notes(prog, [str(exc)])
        return EXIT_IO
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _print_notes(prog, [f"{where}{exc.strerror or exc}"])
        return EXIT_IO
    try:
        sys.stdout.buffer.write(out.stdout)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # `kvpfs ls | head`: the reader is gone; do not let Python complain at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    _print_notes(prog, out.notes)
    return out.code


def _print_notes(prog: str, notes: Iterable[str]) -> None:
    for note in notes:
        print(f"{prog}: {note}", file=sys.stderr)
