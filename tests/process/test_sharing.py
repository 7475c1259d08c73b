"""Sharing the pool files: kvpfs beside the other programs that write and read them.

For a bounded time (10 s, or 120 s with --soak) these all run at once on one pool directory:

* two cloud-init-style appenders (separate processes, flock + O_APPEND, pool 1);
* one writer in the style of hv_kvp_daemon and the Microsoft sample (separate process,
  whole-file POSIX lock, in-place update, append, delete by shifting + ftruncate; pools 0, 1);
* a reader taking the fcntl read lock and flock(LOCK_SH) that checks every snapshot;
* the host setting and deleting keys in pools 0 and 1 through kvpfs;
* writes and deletes through the mount (Python and bash) in guest/.

Every value is self-checking (key:seq:hash). Afterwards every record any writer completed is
in the pool files exactly as written (the last value for each key; deleted keys absent), the
host and the mount see exactly that, and the reader never saw a torn record.

Also: a program that holds a pool lock and never lets go costs the host one E_FAIL after
--lock-timeout (not the kernel's 30 s), kvpfs's log names the holder's pid, and the next SET
after the holder lets go succeeds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from kvpfs import control
from kvpfs.wire.protocol import Status
from tests.conftest import REPO, KvpfsProcess, requires_fuse
from tests.support.safety import (
    checked_value,
    pool_file,
    record_figures,
    seeded_random,
    slot,
    slot_pairs,
    value_is_checked,
)

pytestmark = requires_fuse

SECONDS = 10.0
SOAK_SECONDS = 120.0
FILLERS = 30


def run_role(role: str, pools: Path, name: str, seconds: float, seed: int,
             out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.pool_writers", role, "--pools", str(pools),
         "--name", name, "--seconds", str(seconds), "--seed", str(seed), "--out", str(out)],
        cwd=REPO,
    )


class HostWriter(threading.Thread):
    """The host's administrator: SET/DELETE on its own keys in pools 0 and 1."""

    def __init__(self, kv: KvpfsProcess, rng: random.Random, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.kv, self.rng, self.stop = kv, rng, stop
        self.ops: list[list] = []
        self.errors: list[str] = []

    def run(self) -> None:
        keys = [(pool, f"host{pool}-{i}") for pool in (0, 1) for i in range(8)]
        seq = 0
        while not self.stop.is_set():
            pool, key = self.rng.choice(keys)
            seq += 1
            try:
                if self.rng.random() < 0.7:
                    value = checked_value(key, seq)
                    answer = self.kv.host("set", pool, key, value)
                    op = [pool, "set", key, value]
                    ok = answer["status"] == Status.S_OK
                else:
                    answer = self.kv.host("delete", pool, key)
                    op = [pool, "delete", key, None]
                    ok = answer["status"] in (Status.S_OK, Status.S_CONT)
            except control.ControlError as exc:
                self.errors.append(f"{key}: {exc}")
                return
            if not ok:
                self.errors.append(f"{op}: {answer}")
                return
            self.ops.append(op)
            time.sleep(self.rng.uniform(0.0, 0.005))


class MountWriter(threading.Thread):
    """A guest program writing guest/ keys through the mount (Python and bash)."""

    def __init__(self, kv: KvpfsProcess, rng: random.Random, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.kv, self.rng, self.stop = kv, rng, stop
        self.ops: list[list] = []
        self.errors: list[str] = []

    def run(self) -> None:
        keys = [f"mnt-{i}" for i in range(8)]
        seq = 0
        while not self.stop.is_set():
            key = self.rng.choice(keys)
            path = self.kv.path("guest", key)
            seq += 1
            try:
                roll = self.rng.random()
                if roll < 0.25:
                    path.unlink(missing_ok=True)
                    self.ops.append([1, "delete", key, None])
                    continue
                value = checked_value(key, seq)
                if roll < 0.5:
                    subprocess.run(["bash", "-c", f"echo {value} > {path}"], check=True,
                                   capture_output=True, timeout=30)
                else:
                    with open(path, "w") as f:
                        f.write(value)
                self.ops.append([1, "set", key, value])
            except (OSError, subprocess.SubprocessError) as exc:
                self.errors.append(f"{key}: {exc!r}")
                return
            time.sleep(self.rng.uniform(0.0, 0.005))


def expected_state(op_lists: list[list[list]]) -> dict[int, dict[str, str]]:
    """Each key belongs to one writer, whose operations are in order: the last one wins."""
    state: dict[int, dict[str, str]] = {0: {}, 1: {}}
    for ops in op_lists:
        for pool, kind, key, value in ops:
            if kind == "set":
                state[pool][key] = value
            else:
                state[pool].pop(key, None)
    return state


def read_pools_locked(pools: Path) -> dict[int, list[tuple[bytes, bytes]]]:
    out = {}
    for pool in (0, 1):
        with open(pool_file(pools, pool), "rb") as f:
            fcntl.lockf(f, fcntl.LOCK_SH)
            fcntl.flock(f, fcntl.LOCK_SH)
            out[pool] = slot_pairs(f.read(), pool_file(pools, pool))
    return out


def test_kvpfs_shares_pool_files_with_other_writers(tmp_path: Path, request) -> None:
    rng, seed = seeded_random("test_sharing")
    seconds = SOAK_SECONDS if request.config.getoption("--soak") else SECONDS
    kv = KvpfsProcess(tmp_path)
    kv.pools.mkdir(mode=0o700)
    fillers: list[list] = []
    for pool in (0, 1):
        items = [(f"fill{pool}-{i}", checked_value(f"fill{pool}-{i}", 0)) for i in range(FILLERS)]
        pool_file(kv.pools, pool).write_bytes(
            b"".join(slot(k.encode(), v.encode()) for k, v in items))
        fillers += [[pool, "set", k, v] for k, v in items]
    outs = {name: tmp_path / f"{name}.json" for name in ("app-a", "app-b", "dmn", "reader")}
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    kv.start()
    try:
        procs = [
            run_role("appender", kv.pools, "app-a", seconds, rng.randrange(1 << 30),
                     outs["app-a"]),
            run_role("appender", kv.pools, "app-b", seconds, rng.randrange(1 << 30),
                     outs["app-b"]),
            run_role("daemon", kv.pools, "dmn", seconds, rng.randrange(1 << 30), outs["dmn"]),
            run_role("reader", kv.pools, "reader", seconds + 1, rng.randrange(1 << 30),
                     outs["reader"]),
        ]
        threads: list[HostWriter | MountWriter] = [
            HostWriter(kv, random.Random(rng.random()), stop),
            MountWriter(kv, random.Random(rng.random()), stop),
        ]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(60)
        for proc in procs:
            assert proc.wait(60) == 0, f"a pool writer failed (exit {proc.returncode})"
        for thread in threads:
            assert not thread.errors, f"{type(thread).__name__} failed: {thread.errors[:5]}"
        results = {name: json.loads(path.read_text()) for name, path in outs.items()}

        # ---- the pool files hold exactly what every writer completed
        expected = expected_state([fillers, *(results[n]["ops"] for n in ("app-a", "app-b",
                                                                       "dmn")),
                                   *(t.ops for t in threads)])
        files = read_pools_locked(kv.pools)
        records_checked = 0
        for pool in (0, 1):
            pairs = files[pool]
            keys = [k.decode() for k, _ in pairs]
            duplicates = sorted(k for k, n in Counter(keys).items() if n > 1)
            assert not duplicates, f"pool {pool}: duplicated keys {duplicates[:10]}"
            found = {k.decode(): v.decode() for k, v in pairs}
            for key, value in found.items():
                assert value_is_checked(key.encode(), value.encode()), (pool, key, value)
            lost = sorted(set(expected[pool]) - set(found))
            assert not lost, f"pool {pool}: completed records lost: {lost[:10]}"
            extra = sorted(set(found) - set(expected[pool]))
            assert not extra, f"pool {pool}: deleted or unknown keys present: {extra[:10]}"
            altered = sorted(k for k in found if found[k] != expected[pool][k])
            assert not altered, (
                f"pool {pool}: values differ from the last completed write: "
                + ", ".join(f"{k}={found[k]!r} (expected {expected[pool][k]!r})"
                            for k in altered[:5]))
            records_checked += len(pairs)

        # ---- the host and the mount agree with the files (external changes show within 1 s)
        deadline = time.monotonic() + 5
        while True:
            views = {pool: dict(kv.host("list", pool)["items"]) for pool in (0, 1)}
            listed = set(os.listdir(kv.mnt / "guest"))
            if (all(views[p] == expected[p] for p in (0, 1))
                    and listed == set(expected[1])) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pool in (0, 1):
            assert views[pool] == expected[pool], f"the host's view of pool {pool} differs"
        assert listed == set(expected[1]), "guest/ differs from pool 1"

        # ---- the reader never saw a torn record
        reader = results["reader"]
        assert reader["torn"] == 0, "torn snapshots:\n" + "\n".join(reader["problems"])
        assert reader["snapshots"] > 0
        assert "Traceback" not in kv.output()
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kv.cleanup()

    writes = {
        "appender_a": len(results["app-a"]["ops"]),
        "appender_b": len(results["app-b"]["ops"]),
        "daemon_style": len(results["dmn"]["ops"]),
        "host": len(threads[0].ops),
        "mount": len(threads[1].ops),
    }
    record_figures(
        "sharing",
        seed=seed,
        seconds=seconds,
        **{f"{name}_changes": n for name, n in writes.items()},
        daemon_updates=results["dmn"]["updates"],
        daemon_appends=results["dmn"]["appends"],
        daemon_deletes=results["dmn"]["deletes"],
        concurrent_changes_verified=sum(writes.values()),
        final_records_checked=records_checked,
        reader_snapshots=reader["snapshots"],
        reader_records_checked=reader["records_checked"],
        torn=reader["torn"],
        lost=0,
    )


# --------------------------------------------------------------------------- stuck lock holders

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
if sys.argv[2] == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_stuck_lock_holder_costs_one_lock_timeout(tmp_path: Path, kind: str) -> None:
    kv = KvpfsProcess(tmp_path, "--lock-timeout", "1").start()
    holder = None
    try:
        assert kv.host("set", 0, "before", "1")["status"] == Status.S_OK
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(pool_file(kv.pools, 0)), kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"

        started = time.monotonic()
        answer = kv.host("set", 0, "blocked", "x")
        took = time.monotonic() - started
        assert answer["status"] == Status.E_FAIL == 0x80004005
        assert 0.8 <= took <= 3.0, f"the host waited {took:.2f} s for a 1 s lock timeout"
        deadline = time.monotonic() + 2
        while f"pid {holder.pid}" not in kv.output():
            assert time.monotonic() < deadline, f"no log line names pid {holder.pid}:\n" + (
                kv.output()[-1500:])
            time.sleep(0.05)
        line = next(line for line in kv.output().splitlines() if f"pid {holder.pid}" in line)
        assert ("FLOCK" if kind == "flock" else "POSIX") in line, line

        # a guest write through the mount is refused (EBUSY) as quickly, not hung
        holder2 = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(pool_file(kv.pools, 1)), kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder2.stdout is not None and holder2.stdin is not None
        assert holder2.stdout.readline() == "locked\n"
        started = time.monotonic()
        with pytest.raises(OSError) as info, open(kv.path("guest", "Status"), "w") as f:
            f.write("Ready")
        assert info.value.errno == errno.EBUSY
        assert time.monotonic() - started <= 3.0
        holder2.stdin.close()
        holder2.wait(5)

        holder.stdin.close()  # the holder exits and its lock goes with it
        assert holder.wait(5) == 0
        assert kv.host("set", 0, "blocked", "x")["status"] == Status.S_OK
        pairs = slot_pairs(pool_file(kv.pools, 0).read_bytes())
        assert (b"blocked", b"x") in pairs and (b"before", b"1") in pairs
        record_figures(f"lock timeout ({kind})", seconds_host_waited=round(took, 2),
                       status=f"0x{answer['status']:08X}", holder_named=True)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        kv.cleanup()
