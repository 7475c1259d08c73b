"""Other programs that share the pool files with kvpfs, run as separate processes.

    python -m tests.support.pool_writers ROLE --pools DIR --name NAME --seconds S --out FILE

Roles, each in the style of a real program:

* `appender` -- cloud-init / azure-init: open pool 1 with O_APPEND, `flock(LOCK_EX)`, write
  whole records with unique keys, unlock.
* `daemon` -- hv_kvp_daemon and the Microsoft sample: a whole-file classic POSIX lock
  (`lockf` = fcntl F_SETLKW, no flock), the file re-read under that lock, then an in-place
  update of the key's record (copying only the new bytes, as the daemon does, so stale bytes
  stay after the NUL), an append, or a delete that shifts the later records up and
  `ftruncate`s. Pool 0 gets all three; in pool 1 it only updates and appends (with O_APPEND):
  its delete would race with the flock-only appenders, which it cannot see -- a conflict
  between those two programs that no third program can prevent.
* `reader` -- takes the fcntl read lock and then flock(LOCK_SH), like kvpfs, reads pools 0
  and 1 whole and checks each snapshot: whole records, every record's key non-empty UTF-8 and
  its value self-checking (tests.support.safety.checked_value).

Writers write self-checking values and report every change they completed, in order, as
JSON in FILE; the reader reports its counts and the first problems it saw.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import time
from pathlib import Path

from tests.support.safety import (
    KEY_FIELD,
    RECORD,
    checked_value,
    pool_file,
    slot,
    slot_pair,
    value_is_checked,
)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def appender(pools: Path, name: str, seconds: float, rng: random.Random) -> dict:
    path = pool_file(pools, 1)
    ops = []
    end = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < end:
        key = f"{name}-{seq}"
        value = checked_value(key, seq)
        with open(path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(slot(key.encode(), value.encode()))
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        ops.append([1, "set", key, value])
        seq += 1
        time.sleep(rng.uniform(0.002, 0.02))
    return {"ops": ops}


def daemon(pools: Path, name: str, seconds: float, rng: random.Random) -> dict:
    fds = {pool: os.open(pool_file(pools, pool), os.O_RDWR) for pool in (0, 1)}
    append_fd = os.open(pool_file(pools, 1), os.O_WRONLY | os.O_APPEND)
    keys = {pool: [f"{name}{pool}-{i}" for i in range(8)] for pool in (0, 1)}
    ops = []
    counts = {"updates": 0, "appends": 0, "deletes": 0}
    end = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < end:
        pool = rng.choice((0, 1))
        key = rng.choice(keys[pool])
        fd = fds[pool]
        fcntl.lockf(fd, fcntl.LOCK_EX)  # F_SETLKW, whole file, like kvp_acquire_lock
        try:
            data = _read_all(fd)  # re-read under the lock, like kvp_update_mem_state
            whole = len(data) // RECORD
            index = next((i for i in range(whole)
                          if slot_pair(data[i * RECORD : (i + 1) * RECORD])[0] == key.encode()),
                         None)
            seq += 1
            if index is not None and pool == 0 and rng.random() < 0.3:
                assert whole * RECORD == len(data), "a partial record in pool 0"
                os.pwrite(fd, data[(index + 1) * RECORD :], index * RECORD)
                os.ftruncate(fd, (whole - 1) * RECORD)
                ops.append([pool, "delete", key, None])
                counts["deletes"] += 1
            else:
                value = checked_value(key, seq)
                if index is not None:
                    # kvp_key_add_or_modify: copy value_size bytes, leave the old tail
                    os.pwrite(fd, value.encode() + b"\0", index * RECORD + KEY_FIELD)
                    counts["updates"] += 1
                elif pool == 0:
                    os.pwrite(fd, slot(key.encode(), value.encode()), whole * RECORD)
                    counts["appends"] += 1
                else:
                    os.write(append_fd, slot(key.encode(), value.encode()))
                    counts["appends"] += 1
                ops.append([pool, "set", key, value])
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        time.sleep(rng.uniform(0.001, 0.01))
    return {"ops": ops, **counts}


def reader(pools: Path, name: str, seconds: float, rng: random.Random) -> dict:
    counts = {"snapshots": 0, "records_checked": 0, "torn": 0}
    problems: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for pool in (0, 1):
            fd = os.open(pool_file(pools, pool), os.O_RDONLY)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH)  # fcntl F_SETLKW F_RDLCK first, as kvpfs
                fcntl.flock(fd, fcntl.LOCK_SH)
                data = _read_all(fd)
            finally:
                os.close(fd)  # drops both locks
            counts["snapshots"] += 1
            bad = []
            if len(data) % RECORD:
                bad.append(f"pool {pool}: {len(data)} bytes, not whole records")
            for i in range(len(data) // RECORD):
                key, value = slot_pair(data[i * RECORD : (i + 1) * RECORD])
                counts["records_checked"] += 1
                try:
                    key.decode("utf-8")
                except UnicodeDecodeError:
                    key = b""
                if not key or not value_is_checked(key, value):
                    bad.append(f"pool {pool} record {i}: {key[:80]!r} = {value[:120]!r}")
            if bad:
                counts["torn"] += 1
                if len(problems) < 20:
                    problems.extend(bad[:5])
        time.sleep(rng.uniform(0.001, 0.01))
    return {**counts, "problems": problems}


ROLES = {"appender": appender, "daemon": daemon, "reader": reader}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--pools", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = ROLES[args.role](args.pools, args.name, args.seconds, random.Random(args.seed))
    args.out.write_text(json.dumps({"role": args.role, "name": args.name, **result}))


if __name__ == "__main__":
    main()
