"""`kvpfs status`: the pool files' health, the kvpfs mounts and any hv_kvp_daemon, at a glance."""

from __future__ import annotations

import datetime
import errno
import os
import pwd
import stat
import threading
from pathlib import Path

from kvpfs import mountinfo
from kvpfs.cli.results import EXIT_IO, EXIT_OK, JsonObject, Output, json_bytes
from kvpfs.storage.errors import PoolFileError
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.readonly import PoolFileRead, read_pool
from kvpfs.wire.pools import POOL_COUNT
from kvpfs.wire.protocol import Pool

HV_KVP_DAEMON_NAMES = ("hv_kvp_daemon", "hypervkvpd")  # Debian/Ubuntu, RHEL/SUSE
MOUNT_PROBE_TIMEOUT = 3.0


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


def hv_kvp_daemons() -> list[JsonObject]:
    """Running hv_kvp_daemon processes visible here (/proc/*/comm)."""
    found: list[JsonObject] = []
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


def _probe_mount(mountpoint: Path) -> JsonObject:
    """Ask one kvpfs mount for its status through its control socket."""
    from kvpfs import control  # imports trio; only needed here

    info: JsonObject = {"mountpoint": str(mountpoint)}
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


def kvpfs_mounts(pool_dir: Path) -> list[JsonObject]:
    """Running kvpfs mounts, each with its pool directory and whether it is `pool_dir`.

    Each probe runs in a daemon thread with a time bound: a stopped kvpfs would otherwise
    hang the getxattr on its mount, and status is what one runs to diagnose exactly that.
    Mounts stacked on one path are probed once (only the top one is reachable).
    """

    counts: dict[Path, int] = {}
    for mountpoint in mountinfo.kvpfs_mounts():
        counts[mountpoint] = counts.get(mountpoint, 0) + 1
    results = []
    for mountpoint, count in counts.items():
        box: list[JsonObject] = []
        thread = threading.Thread(target=lambda m=mountpoint, b=box: b.append(_probe_mount(m)),
                                  daemon=True)
        thread.start()
        thread.join(MOUNT_PROBE_TIMEOUT + 1)
        info: JsonObject = box[0] if box else {"mountpoint": str(mountpoint),
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


def iso_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def pool_status(contents: PoolFileRead, boot: float | None) -> JsonObject:
    """Counts, size, mode and age of one pool (as `kvpfs status --json` shows it)."""
    valid = contents.visible_count()
    unique = len(contents.slots)
    st = contents.stat_result
    info: JsonObject = {
        "pool": contents.pool,
        "name": contents.name,
        "path": str(contents.path),
        "exists": st is not None,
        "records": len(contents.records),
        "unique_keys": unique,
        "duplicates": valid - unique,
        "invalid": len(contents.records) - valid,
        "invalid_slots": contents.invalid_slots(),
        "trailing_bytes": contents.trailing_bytes,
        "size": 0 if st is None else st.st_size,
        "mode": None if st is None else f"{stat.S_IMODE(st.st_mode):04o}",
        "owner": None if st is None else _owner(st.st_uid),
        "mtime": None if st is None else st.st_mtime,
        "mtime_iso": None if st is None else iso_time(st.st_mtime),
        "predates_boot": None if st is None or boot is None else st.st_mtime < boot,
        "interrupted_change": contents.unfinished_change,
    }
    return info


def collect_status(pool_dir: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
                   ) -> tuple[JsonObject, dict[int, PoolFileRead]]:
    """Status of the whole pool directory, plus the contents it was computed from.

    A pool that cannot be read gets an "error" entry instead of stopping the others.
    """
    boot = boot_time()
    status: JsonObject = {
        "pool_dir": str(pool_dir),
        "pool_dir_exists": pool_dir.is_dir(),
        "boot_time": boot,
        "boot_time_iso": None if boot is None else iso_time(boot),
        "kvpfs_mounts": kvpfs_mounts(pool_dir),
        "hv_kvp_daemon": hv_kvp_daemons(),
        "pools": [],
    }
    contents: dict[int, PoolFileRead] = {}
    for pool in range(POOL_COUNT):
        try:
            contents[pool] = read_pool(pool_dir, pool, lock_timeout=lock_timeout)
        except PoolFileError as exc:
            status["pools"].append({"pool": pool, "name": Pool(pool).dirname,
                                    "path": str(pool_path(pool_dir, pool)), "error": str(exc)})
            continue
        status["pools"].append(pool_status(contents[pool], boot))
    return status, contents


def status_notes(status: JsonObject) -> list[str]:
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
        if info["predates_boot"] and info["records"] and info["pool"] != Pool.AUTO:
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


def format_status(status: JsonObject) -> str:
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
    rows: list[tuple[str, ...]] = []
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


def cmd_status(pool_dir: Path, *, as_json: bool = False,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Output:
    status, _ = collect_status(pool_dir, lock_timeout=lock_timeout)
    code = EXIT_IO if any("error" in info for info in status["pools"]) else EXIT_OK
    if as_json:
        status["notes"] = status_notes(status)
        return Output(json_bytes(status), [], code)
    return Output(format_status(status).encode("utf-8"), [], code)


