"""Tests for kvpfs.storage.poolfile against real files, real locks and real child processes."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpfs.storage import poolfile
from kvpfs.storage.errors import LockTimeout, PoolFileError
from kvpfs.storage.journal import Journal
from kvpfs.storage.poolfile import PoolFile, pool_path
from kvpfs.storage.poolrecords import Signature, stat_signature
from kvpfs.storage.readonly import load_pool_dir
from kvpfs.storage.records import (
    KEY_FIELD,
    RECORD_SIZE,
    VALUE_FIELD,
    Record,
    encode_record,
    parse_pool,
)
from kvpfs.wire.pools import POOL_COUNT
from tests.support.lockholder import LOCKER, start_locker, stop_locker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference-daemon"


def slot(key: bytes, value: bytes, key_tail: bytes = b"", value_tail: bytes = b"") -> bytes:
    """A record as a sloppy writer leaves it: terminator, then arbitrary stale bytes."""
    k = (key + b"\0" + key_tail)[:KEY_FIELD].ljust(KEY_FIELD, b"\0")
    v = (value + b"\0" + value_tail)[:VALUE_FIELD].ljust(VALUE_FIELD, b"\0")
    return k + v


def pairs(records) -> list[tuple[bytes, bytes]]:
    return [(r.key, r.value) for r in records]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[PoolFile]:
    pf = PoolFile(pool_path(tmp_path / "hyperv", 1), lock_timeout=2.0)
    pf.open()
    yield pf
    pf.close()


def fill(pf: PoolFile, items: list[tuple[bytes, bytes]]) -> None:
    with pf.locked():
        for key, value in items:
            pf.append_record(key, value)


# --------------------------------------------------------------------------- format


def test_constants_and_pool_path(tmp_path: Path) -> None:
    assert (RECORD_SIZE, KEY_FIELD, VALUE_FIELD, POOL_COUNT) == (2560, 512, 2048, 5)
    assert pool_path(tmp_path, 3) == tmp_path / ".kvp_pool_3"
    with pytest.raises(ValueError):
        pool_path(tmp_path, 5)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="reference fixtures not present")
def test_reference_daemon_fixtures_load_as_expected(tmp_path: Path) -> None:
    expected = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
    loaded = load_pool_dir(FIXTURES)  # read-only path: shared locks, nothing modified
    for n in range(POOL_COUNT):
        want = [(k.encode(), v.encode()) for k, v in expected[str(n)]]
        data = pool_path(FIXTURES, n).read_bytes()
        records, trailing = parse_pool(data)
        assert trailing == 0
        assert pairs(records) == want
        assert pairs(loaded[n]) == want
        assert all(r.valid and r.raw is None for r in records)
        # A copy read through PoolFile gives the same answer (never open the fixtures O_RDWR).
        shutil.copyfile(pool_path(FIXTURES, n), pool_path(tmp_path, n))
        with PoolFile(pool_path(tmp_path, n)) as pf, pf.locked():
            snap = pf.read()
        assert pairs(snap.records) == want
        assert snap.trailing_bytes == 0
        assert snap.signature.size == len(data)
    # The cases the fixture README calls out.
    pool0 = dict(pairs(loaded[0]))
    assert pool0[b"cloudstack-vm-userdata"] == b"template=domP type=secstorage"
    assert b"IPoIB_Data" in pool0  # key field holds "IPoIB_Data\0oken\0"
    assert pool0[b"unicode-note"].decode() == "café ☃ 日本"
    assert [r.key for r in loaded[1]].count(b"PROVISIONING_REPORT") == 2
    assert loaded[1][2].key == b"Status"


def test_garbage_after_nul_is_ignored() -> None:
    data = slot(b"alpha", b"v2", b"junk-key-tail", b"st-long-value\xff\xfe") + slot(b"beta", b"")
    records, trailing = parse_pool(data)
    assert trailing == 0
    assert records == [Record(b"alpha", b"v2"), Record(b"beta", b"")]
    assert all(r.valid for r in records)


def test_trailing_partial_record_is_reported() -> None:
    data = slot(b"a", b"1") + b"partial-junk"
    records, trailing = parse_pool(data)
    assert pairs(records) == [(b"a", b"1")]
    assert trailing == len(b"partial-junk")
    assert parse_pool(b"") == ([], 0)
    assert parse_pool(b"x" * (RECORD_SIZE - 1)) == ([], RECORD_SIZE - 1)


def test_append_overwrites_trailing_partial(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1")])
    with open(pool.path, "ab") as f:
        f.write(b"\x01" * 100)
    with pool.locked():
        assert pool.read().trailing_bytes == 100
        assert pool.append_record(b"b", b"2") == 1
        snap = pool.read()
    assert snap.trailing_bytes == 0
    assert snap.signature.size == 2 * RECORD_SIZE
    assert pairs(snap.records) == [(b"a", b"1"), (b"b", b"2")]
    assert pool.path.read_bytes()[RECORD_SIZE:] == encode_record(b"b", b"2")


def test_invalid_records_keep_raw_bytes() -> None:
    bad_value = slot(b"k", b"\xff\xfe", b"", b"tail")
    empty_key = slot(b"", b"orphan")
    long_key = b"K" * KEY_FIELD + b"value".ljust(VALUE_FIELD, b"\0")  # cloud-init "512s"
    good = slot(b"ok", b"fine", b"garbage")
    records, _ = parse_pool(bad_value + empty_key + long_key + good)
    assert [r.valid for r in records] == [False, False, True, True]
    assert records[0].raw == bad_value
    assert records[1].raw == empty_key
    assert records[2].raw == long_key and records[2].key == b"K" * KEY_FIELD
    assert records[3].raw is None


def test_delete_copies_invalid_records_back_untouched(pool: PoolFile) -> None:
    bad = slot(b"bad\xc3", b"\xff value", b"\x00stale", b"more-stale")
    long_key = b"K" * KEY_FIELD + b"v".ljust(VALUE_FIELD, b"\0")
    sloppy = slot(b"good", b"value", b"old-key-tail", b"old-value-tail")
    with open(pool.path, "wb") as f:
        f.write(encode_record(b"first", b"x") + bad + sloppy + long_key)
    with pool.locked():
        snap = pool.read()
        pool.delete_record(0, snap.records)
        after = pool.read()
    data = pool.path.read_bytes()
    assert len(data) == 3 * RECORD_SIZE
    assert data[:RECORD_SIZE] == bad
    assert data[RECORD_SIZE : 2 * RECORD_SIZE] == encode_record(b"good", b"value")  # scrubbed
    assert data[2 * RECORD_SIZE :] == long_key
    assert after.records == snap.records[1:]


# --------------------------------------------------------------------------- encode


def test_encode_limits() -> None:
    rec = encode_record(b"k" * 511, b"v" * 2047)
    assert len(rec) == RECORD_SIZE
    assert rec[511] == 0 and rec[-1] == 0
    assert encode_record(b"", b"") == bytes(RECORD_SIZE)
    assert encode_record(b"key", b"val") == b"key".ljust(512, b"\0") + b"val".ljust(2048, b"\0")
    with pytest.raises(ValueError, match="512 bytes; at most 511"):
        encode_record(b"k" * 512, b"")
    with pytest.raises(ValueError, match="2048 bytes; at most 2047"):
        encode_record(b"k", b"v" * 2048)
    with pytest.raises(ValueError, match="key contains a NUL"):
        encode_record(b"a\0b", b"")
    with pytest.raises(ValueError, match="value contains a NUL"):
        encode_record(b"a", b"\0")
    with pytest.raises(TypeError):
        encode_record("str", b"")  # type: ignore[arg-type]


@given(
    key=st.binary(min_size=1, max_size=511).filter(lambda b: b"\0" not in b),
    value=st.binary(max_size=2047).filter(lambda b: b"\0" not in b),
)
def test_encode_parse_round_trip(key: bytes, value: bytes) -> None:
    records, trailing = parse_pool(encode_record(key, value))
    assert trailing == 0
    assert (records[0].key, records[0].value) == (key, value)
    assert (records[0].raw is None) == records[0].valid


# --------------------------------------------------------------------------- open / modes


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277])
def test_new_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with PoolFile(pool_path(tmp_path / "d", 0)) as pf:
            assert stat.S_IMODE(os.stat(pf.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
    finally:
        os.umask(old)


def test_existing_mode_is_kept(tmp_path: Path) -> None:
    path = pool_path(tmp_path, 0)
    path.write_bytes(encode_record(b"a", b"b"))
    os.chmod(path, 0o644)
    with PoolFile(path) as pf, pf.locked():
        pf.append_record(b"c", b"d")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_existing_directory_mode_is_kept(tmp_path: Path) -> None:
    d = tmp_path / "hyperv"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with PoolFile(pool_path(d, 0)):
        pass
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


def test_symlinked_pool_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    link = pool_path(tmp_path, 1)
    link.symlink_to(target)
    with pytest.raises(PoolFileError, match="symlink") as info:
        PoolFile(link).open()
    assert info.value.errno == errno.ELOOP
    assert info.value.filename == str(link)
    # dangling symlink: must not create the target either
    dangling = pool_path(tmp_path, 2)
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(PoolFileError, match="symlink"):
        PoolFile(dangling).open()
    assert not (tmp_path / "nowhere").exists()


def test_symlinked_pool_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PoolFileError, match=r"pool directory .* is a symlink"):
        PoolFile(pool_path(tmp_path / "link", 0)).open()
    assert not pool_path(real, 0).exists()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o773])
def test_world_writable_directory_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(PoolFileError, match="world-writable") as info:
        PoolFile(pool_path(d, 0)).open()
    assert "chmod o-w" in str(info.value)
    assert not pool_path(d, 0).exists()


def test_non_regular_pool_files_are_refused(tmp_path: Path) -> None:
    pool_path(tmp_path, 0).mkdir()
    with pytest.raises(PoolFileError, match="is a directory") as info:
        PoolFile(pool_path(tmp_path, 0)).open()
    assert info.value.errno == errno.EISDIR
    os.mkfifo(pool_path(tmp_path, 1))
    with pytest.raises(PoolFileError, match="not a regular file"):
        PoolFile(pool_path(tmp_path, 1)).open()
    with pytest.raises(PoolFileError, match="is a directory"):
        load_pool_dir(tmp_path)
    os.rmdir(pool_path(tmp_path, 0))
    with pytest.raises(PoolFileError, match="not a regular file"):
        load_pool_dir(tmp_path)  # must not block opening the FIFO either


def test_missing_grandparent_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PoolFileError, match="cannot create pool directory") as info:
        PoolFile(pool_path(tmp_path / "a" / "b", 0)).open()
    assert info.value.errno == errno.ENOENT


def test_deleted_file_is_recreated(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1")])
    assert pool.ensure_open() is False
    pool.path.unlink()
    assert pool.ensure_open() is True
    assert stat.S_IMODE(os.stat(pool.path).st_mode) == 0o600
    with pool.locked():
        assert pool.read().records == []
    # locked() does it by itself too
    pool.path.unlink()
    with pool.locked():
        pool.append_record(b"b", b"2")
    assert pool.path.read_bytes() == encode_record(b"b", b"2")


def test_replaced_file_is_reopened(pool: PoolFile) -> None:
    fill(pool, [(b"old", b"1")])
    new = pool.path.with_name("replacement")
    new.write_bytes(encode_record(b"new", b"2"))
    os.replace(new, pool.path)
    with pool.locked():
        assert pairs(pool.read().records) == [(b"new", b"2")]
    assert pool.ensure_open() is False


def test_ensure_open_inside_locked(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1")])
    with pool.locked():
        assert pool.ensure_open() is False
    pool.path.unlink()
    with pool.locked():
        assert pool.ensure_open() is True  # this block had to recreate the file
        assert pool.ensure_open() is True
        with pytest.raises(RuntimeError):
            pool.close()
    with pool.locked():
        assert pool.ensure_open() is False


def test_file_replaced_while_locked_moves_the_lock(pool: PoolFile) -> None:
    fill(pool, [(b"old", b"1")])
    new = pool.path.with_name("replacement")
    new.write_bytes(encode_record(b"new", b"2"))
    with pool.locked():
        os.replace(new, pool.path)  # a writer that ignores locks
        assert pool.ensure_open() is True
        assert pairs(pool.read().records) == [(b"new", b"2")]
        assert probe_locks(pool.path) == "lockf-busy flock-busy"
    assert probe_locks(pool.path) == "lockf-free flock-free"


def test_signatures(pool: PoolFile) -> None:
    assert stat_signature(pool.path.with_name("missing")) is None
    before = pool.fstat_signature()
    assert before == stat_signature(pool.path)
    assert isinstance(before, Signature) and before.size == 0
    fill(pool, [(b"a", b"1")])
    after = pool.fstat_signature()
    assert after.size == RECORD_SIZE and after != before
    with pool.locked():
        assert pool.read().signature == after


def test_enospc_is_distinguishable(pool: PoolFile, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(poolfile.os, "pwrite", full)
    with pool.locked(), pytest.raises(PoolFileError) as info:
        pool.append_record(b"a", b"1")
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert str(pool.path) in str(info.value) and "free space" in str(info.value)


# --------------------------------------------------------------------------- records ops


def test_write_append_delete_keep_order(pool: PoolFile) -> None:
    fill(pool, [(b"k%d" % i, b"v%d" % i) for i in range(5)])
    with pool.locked():
        pool.write_record(2, b"k2", b"changed")
        with pytest.raises(IndexError):
            pool.write_record(5, b"x", b"y")
        pool.delete_record(1, pool.read().records)
        snap = pool.read()
    assert pairs(snap.records) == [
        (b"k0", b"v0"),
        (b"k2", b"changed"),
        (b"k3", b"v3"),
        (b"k4", b"v4"),
    ]
    assert not pool.path.with_name(pool.path.name + ".kvpfs-delete").exists()
    with pool.locked():
        pool.delete_record(3, pool.read().records)  # last: truncate only
        pool.delete_record(0, pool.read().records)
        assert pairs(pool.read().records) == [(b"k2", b"changed"), (b"k3", b"v3")]
        with pytest.raises(ValueError, match="stale snapshot"):
            pool.delete_record(0, ())
        pool.delete_record(0, pool.read().records)
        pool.delete_record(0, pool.read().records)
        assert pool.read().signature.size == 0


def test_delete_drops_trailing_partial(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1"), (b"b", b"2")])
    with open(pool.path, "ab") as f:
        f.write(b"junk")
    with pool.locked():
        pool.delete_record(0, pool.read().records)
        snap = pool.read()
    assert pairs(snap.records) == [(b"b", b"2")] and snap.trailing_bytes == 0


def test_duplicates_are_separate_records(pool: PoolFile) -> None:
    fill(pool, [(b"dup", b"1"), (b"x", b""), (b"dup", b"2")])
    with pool.locked():
        snap = pool.read()
        pool.delete_record(0, snap.records)
        assert pairs(pool.read().records) == [(b"x", b""), (b"dup", b"2")]


# --------------------------------------------------------------------------- locking

@pytest.mark.parametrize(("mode", "kind"), [("lockf", "POSIX"), ("flock", "FLOCK")])
def test_foreign_lock_holder_times_out_and_is_named(pool: PoolFile, mode: str, kind: str) -> None:
    proc = start_locker(pool.path, mode)
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info, pool.locked(timeout=0.3):
            pytest.fail("got the lock while a child holds it")
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 1.5
        assert f"pid {proc.pid}" in info.value.holders
        assert kind in info.value.holders
        assert info.value.holders in str(info.value)
        assert str(pool.path) in str(info.value)
        assert info.value.errno == errno.EAGAIN
    finally:
        stop_locker(proc)
    with pool.locked(timeout=2):
        pool.append_record(b"after", b"release")


def test_lock_acquired_when_holder_releases_during_wait(pool: PoolFile) -> None:
    proc = start_locker(pool.path, "lockf")
    threading.Timer(0.2, stop_locker, args=(proc,)).start()
    started = time.monotonic()
    with pool.locked(timeout=5):
        waited = time.monotonic() - started
    assert 0.15 < waited < 3
    proc.wait(timeout=5)


def probe_locks(path: Path) -> str:
    """Ask a child process whether it could take a lockf and a flock lock right now."""
    return subprocess.run(
        [sys.executable, "-c", LOCKER, str(path), "probe"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()


def test_our_lock_excludes_posix_and_flock_users(pool: PoolFile) -> None:
    with pool.locked():
        assert probe_locks(pool.path) == "lockf-busy flock-busy"
    assert probe_locks(pool.path) == "lockf-free flock-free"


def test_second_poolfile_in_same_process_is_excluded(pool: PoolFile) -> None:
    other = PoolFile(pool.path)
    with pool.locked():
        with pytest.raises(LockTimeout) as info, other.locked(timeout=0.1):
            pass
        assert "OFDLCK WRITE" in info.value.holders
        assert f"pid {os.getpid()}" in info.value.holders  # found through /proc/PID/fdinfo
    with other.locked(timeout=1):
        pass
    other.close()


def test_threads_sharing_a_poolfile_are_serialised(pool: PoolFile) -> None:
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with pool.locked():
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(LockTimeout, match="another thread"), pool.locked(timeout=0.1):
            pass
    finally:
        release.set()
        t.join()
    with pool.locked(), pool.locked():  # re-entrant in one thread
        pass


def test_load_pool_dir_shared_locks(tmp_path: Path) -> None:
    assert load_pool_dir(tmp_path / "missing") == {n: [] for n in range(POOL_COUNT)}
    pf = PoolFile(pool_path(tmp_path, 1))
    fill(pf, [(b"a", b"1")])
    proc = start_locker(pf.path, "lockf")
    try:
        with pytest.raises(LockTimeout):
            load_pool_dir(tmp_path, lock_timeout=0.1)
    finally:
        stop_locker(proc)
    loaded = load_pool_dir(tmp_path)
    assert pairs(loaded[1]) == [(b"a", b"1")] and loaded[0] == []
    assert not pool_path(tmp_path, 0).exists()  # tools never create pool files
    pf.close()


# --------------------------------------------------------------------------- concurrency

APPENDER = r"""
import fcntl, struct, sys, time
path, count = sys.argv[1], int(sys.argv[2])
for j in range(count):
    time.sleep(0.001)  # spread the appends over our whole loop
    rec = struct.pack("512s2048s", b"ci-%04d" % j, b"cloud-init event %d" % j)
    with open(path, "ab") as f:           # exactly what cloud-init's KVP handler does
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(rec)
        f.flush()
"""


def test_cloud_init_appender_loses_nothing(pool: PoolFile) -> None:
    n_ci = 300
    fill(pool, [(b"seed", b"0")])
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(pool.path), str(n_ci)])
    ours: list[bytes] = []
    i = 0
    while proc.poll() is None or i < 50:
        with pool.locked():
            pool.append_record(b"ours-%d" % i, b"v")
            ours.append(b"ours-%d" % i)
        with pool.locked():
            snap = pool.read()
            idx = next(j for j, r in enumerate(snap.records) if r.key == ours[-1])
            pool.write_record(idx, ours[-1], b"modified")
        if len(ours) > 3:
            with pool.locked():
                snap = pool.read()
                victim = ours.pop(0)
                idx = next(j for j, r in enumerate(snap.records) if r.key == victim)
                pool.delete_record(idx, snap.records)
        i += 1
    assert proc.wait(timeout=60) == 0
    with pool.locked():
        snap = pool.read()
    keys = [r.key for r in snap.records]
    assert snap.trailing_bytes == 0
    assert [k for k in keys if k.startswith(b"ci-")] == [b"ci-%04d" % j for j in range(n_ci)]
    assert [k for k in keys if k.startswith(b"ours-")] == ours
    assert keys[0] == b"seed"
    assert all(r.value == b"modified" for r in snap.records if r.key in ours)
    assert len(keys) == 1 + n_ci + len(ours)


# --------------------------------------------------------------------------- crash window


def _delete_and_die(path: str, index: int, kill_in: str) -> None:
    """Child: run a delete and SIGKILL ourselves in os.pwrite or os.ftruncate of the pool
    file (the journal's own calls go through)."""
    pf = PoolFile(Path(path))
    real = {"pwrite": os.pwrite, "ftruncate": os.ftruncate}[kill_in]

    def die_on_the_pool(fd: int, *args: object) -> object:
        if fd == pf._fd:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd, *args)

    with pf.locked():
        snap = pf.read()
        # ftruncate: pwrite already done, the duplicate-last-record state;
        # pwrite: journal written, pool file untouched
        setattr(os, kill_in, die_on_the_pool)
        pf.delete_record(index, snap.records)


def run_crashing_delete(path: Path, index: int, kill_in: str) -> None:
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_delete_and_die, args=(str(path), index, kill_in))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL


def intent(path: Path) -> Path:
    """The redo journal: kept beside the pool, empty unless a change is in flight."""
    return path.with_name(".kvpfs-journal" + path.name)


def pending(path: Path) -> bool:
    """Does the journal hold a change (a crash came before it was emptied)?"""
    return intent(path).exists() and intent(path).stat().st_size > 0


def test_crash_between_pwrite_and_ftruncate_is_recovered(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"d", b"4")])
    run_crashing_delete(pool.path, 1, "ftruncate")
    raw = pool.path.read_bytes()
    assert len(raw) == 4 * RECORD_SIZE  # a c d d
    assert pairs(parse_pool(raw)[0]) == [(b"a", b"1"), (b"c", b"3"), (b"d", b"4"), (b"d", b"4")]
    assert pending(pool.path)
    assert stat.S_IMODE(os.stat(intent(pool.path)).st_mode) == 0o600
    with pool.locked():
        assert pairs(pool.read().records) == [(b"a", b"1"), (b"c", b"3"), (b"d", b"4")]
    assert not pending(pool.path)


def test_crash_before_pwrite_is_redone(pool: PoolFile) -> None:
    items = [(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"d", b"4")]
    fill(pool, items)
    run_crashing_delete(pool.path, 1, "pwrite")
    assert pending(pool.path)
    assert pairs(parse_pool(pool.path.read_bytes())[0]) == items  # untouched so far
    with pool.locked():  # the journal is complete: the delete is rolled forward
        assert pairs(pool.read().records) == [items[0], items[2], items[3]]
    assert not pending(pool.path)


def test_crash_then_foreign_append_is_left_alone(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    run_crashing_delete(pool.path, 0, "ftruncate")
    with open(pool.path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(encode_record(b"late", b"x"))
    with pool.locked():
        got = pairs(pool.read().records)
    assert got == [(b"b", b"2"), (b"c", b"3"), (b"c", b"3"), (b"late", b"x")]  # nothing lost
    assert not pending(pool.path)


def test_garbage_intent_file_is_removed(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1"), (b"a", b"1")])
    intent(pool.path).write_text("not an intent\n")
    with pool.locked():
        assert len(pool.read().records) == 2
    assert not pending(pool.path)


def test_journal_is_kept_empty_private_and_outside_the_pool_glob(pool: PoolFile) -> None:
    fill(pool, [(b"a", b"1")])
    with pool.locked():
        pool.write_record(0, b"a", b"2")
    journal = intent(pool.path)
    assert journal.stat().st_size == 0 and stat.S_IMODE(journal.stat().st_mode) == 0o600
    assert sorted(p.name for p in pool.path.parent.glob(".kvp_pool_*")) == [pool.path.name]


def test_torn_journal_entry_is_ignored(pool: PoolFile, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash inside the journal write leaves a prefix of the entry: the pool was not
    touched yet, so the entry must be dropped, not half applied."""
    fill(pool, [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    before = pool.path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "clear", lambda self: None)
        with pool.locked():
            pool.delete_record(0, pool.read().records)
    entry = intent(pool.path).read_bytes()
    for cut in (4096, len(entry) - 1, 20):
        pool.path.write_bytes(before)  # as before the change: it never reached the pool
        intent(pool.path).write_bytes(entry[:cut])
        with pool.locked():
            assert pairs(pool.read().records) == [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
        assert not pending(pool.path)


def test_journal_removed_or_replaced_by_a_symlink(pool: PoolFile, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Removed while we run: made again. Replaced by a symlink: never followed; the change
    still happens, unprotected, with a warning."""
    fill(pool, [(b"a", b"1")])
    intent(pool.path).unlink()
    with pool.locked():
        pool.write_record(0, b"a", b"2")
    assert intent(pool.path).is_file() and not pending(pool.path)
    intent(pool.path).unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    intent(pool.path).symlink_to(target)
    with pool.locked():
        pool.write_record(0, b"a", b"3")
        assert pairs(pool.read().records) == [(b"a", b"3")]
    assert target.read_bytes() == b""
    assert "not protected against a crash" in caplog.text


def test_journal_left_after_a_finished_change_never_undoes_a_later_foreign_write(
    pool: PoolFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the delete but before the journal was removed; cloud-init then appends
    a record that brings the file back to its old size. The redo must see that the file
    is neither the old, the new nor a torn state, and leave it alone."""
    fill(pool, [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "clear", lambda self: None)
        with pool.locked():
            pool.delete_record(2, pool.read().records)
    assert pending(pool.path)
    with open(pool.path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(encode_record(b"cloudinit", b"telemetry"))
    with pool.locked():
        assert pairs(pool.read().records) == [(b"a", b"1"), (b"b", b"2"),
                                              (b"cloudinit", b"telemetry")]
    assert not pending(pool.path)


def test_failed_change_is_rolled_back_not_redone_later(
    pool: PoolFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (here: the disk fills up mid-way) is reported, and stays undone."""
    fill(pool, [(b"a", b"1"), (b"b", b"2")])
    real_pwrite = os.pwrite
    calls = []

    def failing_pwrite(fd, data, offset):
        if fd == pool._fd:  # the pool file's first write fails half-way; the journal's not
            calls.append(offset)
            if len(calls) == 1:
                real_pwrite(fd, bytes(data[:100]), offset)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    with pool.locked():
        monkeypatch.setattr(os, "pwrite", failing_pwrite)
        with pytest.raises(PoolFileError):
            pool.write_record(0, b"a", b"new value")
        monkeypatch.undo()
    with pool.locked():
        assert pairs(pool.read().records) == [(b"a", b"1"), (b"b", b"2")]
    assert not pending(pool.path)
