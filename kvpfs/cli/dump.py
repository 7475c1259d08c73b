"""`kvpfs dump`: one support bundle (versions, status, every record, the raw pool files)."""

from __future__ import annotations

import base64
import io
import os
import platform
import socket
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Literal

from kvpfs import __version__
from kvpfs.cli.formats import invalid_entry, utf8_text
from kvpfs.cli.results import EXIT_IO, EXIT_OK, JsonObject, Output, UsageError, json_bytes
from kvpfs.cli.status import collect_status, iso_time, status_notes
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import Record


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


def system_info() -> JsonObject:
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


def _redacted(record: Record) -> list[str]:
    return [utf8_text(record.key), f"<redacted: {len(record.value)} bytes>"]


def build_dump(pool_dir: Path, *, redact: bool = False, embed_raw: bool = True,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> tuple[JsonObject, dict[int, bytes]]:
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
            (_redacted(r) if redact else [utf8_text(r.key), utf8_text(r.value)])
            if r.valid else invalid_entry(slot, r)
            for slot, r in enumerate(pool_contents.records)
        ]
        if not redact and pool_contents.exists:
            raws[pool] = bytes(pool_contents.data)
            if embed_raw:
                info["raw_base64"] = base64.b64encode(pool_contents.data).decode("ascii")
    dump = {
        "format": "kvpfs-dump 1",
        "created": iso_time(time.time()),
        "redacted": redact,
        "system": system_info(),
        **status,
    }
    dump["notes"] = status_notes(status)
    return dump, raws


TarMode = Literal["w", "w:gz", "w:xz"]
TAR_SUFFIXES: dict[str, TarMode] = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz",
                                    ".tar.xz": "w:xz"}
DUMP_TOP = "kvpfs-dump"


def _tar_mode(output: Path) -> TarMode | None:
    name = output.name
    for suffix, mode in TAR_SUFFIXES.items():
        if name.endswith(suffix):
            return mode
    return None


def write_dump(output: Path, dump: JsonObject, raws: dict[int, bytes]) -> None:
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


