"""What users set on guest keys through the mount, kept on disk beside the pool files.

Pool records hold only key and value, so a key's mode, owner, group and mtime, and the
written form of its value (the trailing newline the pool does not keep), live in one file
of their own: `<pool dir>/.kvpfs-keymeta`, outside the `.kvp_pool_*` names the host side
and hv_kvp_daemon read. It is JSON, rewritten whole by atomic replace (a temporary file
beside it, renamed over it), so after a crash it is the old or the new version, never a
mix. A `durable` save also fsyncs the file and the directory, so that it survives a power
loss too (the pools themselves survive the death of a process, not a power loss).

Two kinds of facts, two rules:
- the key's own (mode, uid, gid) hold whatever the value becomes;
- facts about the value (mtime, the trailing newline) hold only while the stored value is
  the one they describe: each record keeps a hash of that value, and a value another
  program wrote meanwhile wins (`KeyMeta.about`).

Safety of modes: a record is written (and synced) before the change it describes is
answered, and removed only after the key is gone from the pool, so a crash can leave a
stale restrictive record but never a key shown more widely than its user set it. A file
that exists but cannot be read makes every guest key owner-only (`UNREADABLE_MODE`), a
record each that later saves keep (kvpfs.fuse.durable). Pure but for the file itself: no
FUSE, no pools, no threads (the caller runs `save` in a worker thread).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = ".kvpfs-keymeta"
FORMAT = 1
# Keys shown while a metadata file exists but cannot be read: nobody but the owner may read
# them, as some may have been chmod 600.
UNREADABLE_MODE = 0o600
# More than the guest pool can hold (its file is bounded by the room on disk, its keys by
# the host's limits); a larger file is refused as not ours.
MAX_FILE_BYTES = 16 << 20


def value_hash(value: bytes) -> str:
    """The value a record's value facts describe (sha256, hex)."""
    return hashlib.sha256(value).hexdigest()


@dataclass(frozen=True, slots=True)
class ValueFacts:
    """What a record says about the value it was written for."""

    mtime_ns: int | None
    newline: bool  # written with one trailing newline, which the pool does not keep


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """One guest key's record; None where the user set nothing (the mount's default holds)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    value_sha256: str | None = None  # the stored value the fields below describe
    mtime_ns: int | None = None
    newline: bool = False

    def about(self, stored: bytes) -> ValueFacts | None:
        """The value facts if `stored` is still the value they were written for."""
        if self.value_sha256 is None or self.value_sha256 != value_hash(stored):
            return None
        return ValueFacts(self.mtime_ns, self.newline)

    def with_value(self, stored: bytes, *, mtime_ns: int | None, newline: bool) -> KeyMeta:
        return replace(self, value_sha256=value_hash(stored), mtime_ns=mtime_ns,
                       newline=newline)

    def is_empty(self) -> bool:
        return self == KeyMeta()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name in ("mode", "uid", "gid", "value_sha256", "mtime_ns"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.newline:
            out["newline"] = True
        return out

    @classmethod
    def from_json(cls, data: object) -> KeyMeta:
        """A record as saved; ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError("a record is not an object")

        def integer(name: str, low: int, high: int) -> int | None:
            item = data.get(name)
            if item is None:
                return None
            if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= high:
                raise ValueError(f"{name} {item!r} is not an integer in [{low}, {high}]")
            return item

        digest = data.get("value_sha256")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
            raise ValueError("value_sha256 is not a sha256")
        newline = data.get("newline", False)
        if not isinstance(newline, bool):
            raise ValueError("newline is not true or false")
        return cls(mode=integer("mode", 0, 0o7777), uid=integer("uid", 0, 2**32 - 1),
                   gid=integer("gid", 0, 2**32 - 1), value_sha256=digest,
                   mtime_ns=integer("mtime_ns", -(2**63), 2**63 - 1), newline=newline)


@dataclass(frozen=True, slots=True)
class Loaded:
    """The records found at start, and whether the file was unreadable (then every key is
    shown `UNREADABLE_MODE` until a save replaces it)."""

    records: dict[bytes, KeyMeta]
    unreadable: bool = False


class KeyMetaFile:
    """The metadata file of one pool directory."""

    def __init__(self, pool_dir: Path) -> None:
        self.path = pool_dir / FILE_NAME
        self._temp = pool_dir / (FILE_NAME + ".new")

    def load(self) -> Loaded:
        """The records on disk; never raises (a problem is logged and made safe)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return Loaded({})
        except OSError as exc:
            log.warning("cannot open %s (%s): guest keys are shown mode %o until kvpfs saves"
                        " it anew", self.path, exc.strerror, UNREADABLE_MODE)
            return Loaded({}, unreadable=True)
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            return Loaded(parse(data))
        except (OSError, ValueError) as exc:
            log.warning("%s is not a kvpfs metadata file (%s): guest keys are shown mode %o"
                        " until kvpfs saves it anew", self.path, exc, UNREADABLE_MODE)
            return Loaded({}, unreadable=True)

    def save(self, records: Mapping[bytes, KeyMeta], *, durable: bool = True) -> None:
        """Replace the file with `records`; with `durable`, on disk when this returns
        (OSError if it fails; the old file then stays as it was)."""
        data = serialize(records)
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._temp, self.path)
        if not durable:
            return
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def serialize(records: Mapping[bytes, KeyMeta]) -> bytes:
    items = {key.hex(): meta.to_json() for key, meta in sorted(records.items())
             if not meta.is_empty()}
    return json.dumps({"format": FORMAT, "keys": items}, indent=0, sort_keys=True).encode()


def parse(data: bytes) -> dict[bytes, KeyMeta]:
    """The records of a saved file; ValueError naming what is wrong."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:  # nested deeper than any file kvpfs writes
        raise ValueError("nested too deeply to be a kvpfs metadata file") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"not format {FORMAT}")
    keys = document.get("keys")
    if not isinstance(keys, dict):
        raise ValueError("no table of keys")
    records: dict[bytes, KeyMeta] = {}
    for hex_key, item in keys.items():
        try:
            key = bytes.fromhex(hex_key)
        except ValueError:
            raise ValueError(f"key {hex_key!r} is not hex") from None
        try:
            records[key] = KeyMeta.from_json(item)
        except ValueError as exc:
            raise ValueError(f"key {key!r}: {exc}") from None
    return records
