"""Tests for kvpfs.storage.store: the in-memory pools kept in step with real pool files in tmp_path.

Everything goes through real files, real locks (fcntl/flock) and, for foreign lock holders,
real child processes.  Pool file bytes are checked directly, not through the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from kvpfs.storage.errors import LockTimeout
from kvpfs.storage.store import Change, ChangeKind, Origin, Store
from tests.support.lockholder import start_locker, stop_locker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference-daemon"
RECORD = 2560
KEY_FIELD = 512
VALUE_FIELD = 2048


# --------------------------------------------------------------------------- helpers


def record_bytes(key: bytes, value: bytes, key_tail: bytes = b"", value_tail: bytes = b"") -> bytes:
    """One 2560-byte slot; the tails are stale bytes after the NUL, as sloppy writers leave."""
    k = (key + b"\0" + key_tail)[:KEY_FIELD].ljust(KEY_FIELD, b"\0")
    v = (value + b"\0" + value_tail)[:VALUE_FIELD].ljust(VALUE_FIELD, b"\0")
    return k + v


def canonical(key: bytes, value: bytes) -> bytes:
    """A slot with nothing but zeros after each terminator."""
    return key.ljust(KEY_FIELD, b"\0") + value.ljust(VALUE_FIELD, b"\0")


def slots_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert len(data) % RECORD == 0, f"{path} is not whole records ({len(data)} bytes)"
    return [data[i : i + RECORD] for i in range(0, len(data), RECORD)]


def file_pairs(path: Path) -> list[tuple[bytes, bytes]]:
    """(key, value) of every slot, each cut at its first NUL -- parsed here, not by kvpfs."""
    out = []
    for s in slots_of(path):
        out.append((s[:KEY_FIELD].split(b"\0", 1)[0], s[KEY_FIELD:].split(b"\0", 1)[0]))
    return out


def pairs(records) -> list[tuple[bytes, bytes]]:
    return [(r.key, r.value) for r in records]


def pool_file(pool_dir: Path, pool: int) -> Path:
    return pool_dir / f".kvp_pool_{pool}"


def external_append(path: Path, slot: bytes) -> None:
    """Append one record the way cloud-init does: open for append, flock LOCK_EX, write."""
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(slot)
        f.flush()


def external_write_slot(path: Path, index: int, slot: bytes) -> None:
    """Rewrite one slot in place under flock (an in-place editor such as ejsiron/hvkvp)."""
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(index * RECORD)
        f.write(slot)
        f.flush()


class Recorder:
    """A store listener that keeps every Change it is told about."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    async def __call__(self, changes: list[Change]) -> None:
        self.changes.extend(changes)

    def take(self) -> list[Change]:
        out, self.changes = self.changes, []
        return out


def copy_reference(dest: Path) -> None:
    dest.mkdir(mode=0o700)
    for src in sorted(FIXTURES.glob(".kvp_pool_*")):
        shutil.copyfile(src, dest / src.name)  # data only: the fixture files are read-only


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "pools", lock_timeout=0.5)
    await s.open()
    yield s
    s.close()


@pytest.fixture
async def reference_store(tmp_path: Path) -> AsyncIterator[Store]:
    pool_dir = tmp_path / "pools"
    copy_reference(pool_dir)
    s = Store(pool_dir, lock_timeout=0.5)
    await s.open()
    yield s
    s.close()


# --------------------------------------------------------------------------- opening


async def test_open_creates_five_empty_0600_files(tmp_path: Path) -> None:
    pool_dir = tmp_path / "pools"
    s = Store(pool_dir)
    await s.open()
    try:
        names = sorted(p.name for p in pool_dir.iterdir())
        assert names == [f".kvp_pool_{n}" for n in range(5)]
        for n in range(5):
            st = os.lstat(pool_file(pool_dir, n))
            assert stat.S_ISREG(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_size == 0
            assert s.states[n].records == []
            assert s.enumerate(n, 0) is None
    finally:
        s.close()


async def test_reference_fixture_loads_as_expected(reference_store: Store) -> None:
    expected = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
    for n in range(5):
        want = [(k.encode(), v.encode()) for k, v in expected[str(n)]]
        assert pairs(reference_store.states[n].records) == want, f"pool {n}"
        # enumerate lists every valid record in file order, duplicates included.
        listed = []
        i = 0
        while (record := reference_store.enumerate(n, i)) is not None:
            listed.append((record.key, record.value))
            i += 1
        assert listed == want, f"pool {n}"
        # get() is last-wins over duplicates.
        last = dict(want)
        for key, value in last.items():
            assert reference_store.get(n, key) == value
    assert reference_store.get(0, b"unicode-note") == "café ☃ 日本".encode()
    assert reference_store.get(1, b"PROVISIONING_REPORT").startswith(b"result=success|")
    assert reference_store.enumerate(1, 1).value.startswith(b"result=error|")
    assert reference_store.enumerate(1, 3).value.startswith(b"result=success|")
    assert reference_store.enumerate(1, 4) is None
    assert reference_store.get(0, b"temporary-token") is None
    assert reference_store.get(0, b"oken") is None  # a stale key fragment, not a key


async def test_open_leaves_reference_files_untouched(tmp_path: Path) -> None:
    pool_dir = tmp_path / "pools"
    copy_reference(pool_dir)
    before = {p.name: p.read_bytes() for p in pool_dir.iterdir()}
    s = Store(pool_dir)
    await s.open()
    s.close()
    assert {p.name: p.read_bytes() for p in pool_dir.iterdir()} == before


# --------------------------------------------------------------------------- set


async def test_set_modifies_in_place_with_zero_padding(reference_store: Store) -> None:
    path = pool_file(reference_store.pool_dir, 0)
    before = slots_of(path)
    key = b"cloudstack-vm-userdata"
    # The reference daemon left the tail of an older, longer value after the NUL.
    assert before[0][KEY_FIELD:].split(b"\0", 1)[1].strip(b"\0")
    await reference_store.set(0, key, b"v2", Origin.HOST)
    after = slots_of(path)
    assert len(after) == len(before)  # same file size
    assert after[0] == canonical(key, b"v2")  # same slot, zeros after the new value
    assert after[1:] == before[1:]  # nothing else touched
    assert reference_store.states[0].records[0].value == b"v2"
    assert reference_store.get(0, key) == b"v2"
    assert [r.key for r in reference_store.states[0].records] == [k for k, _ in file_pairs(path)]


async def test_set_shorter_value_zeroes_the_old_tail(store: Store) -> None:
    path = pool_file(store.pool_dir, 1)
    await store.set(1, b"alpha", b"first-long-value", Origin.MOUNT)
    await store.set(1, b"beta", b"b", Origin.MOUNT)
    await store.set(1, b"alpha", b"v2", Origin.MOUNT)
    assert slots_of(path) == [canonical(b"alpha", b"v2"), canonical(b"beta", b"b")]


async def test_set_on_duplicate_key_modifies_the_last_record(reference_store: Store) -> None:
    path = pool_file(reference_store.pool_dir, 1)
    before = slots_of(path)
    await reference_store.set(1, b"PROVISIONING_REPORT", b"result=retry", Origin.MOUNT)
    after = slots_of(path)
    assert after[:3] == before[:3]
    assert after[3] == canonical(b"PROVISIONING_REPORT", b"result=retry")
    assert reference_store.get(1, b"PROVISIONING_REPORT") == b"result=retry"
    assert reference_store.enumerate(1, 1).value.startswith(b"result=error|")


async def test_set_appends_new_keys(reference_store: Store) -> None:
    path = pool_file(reference_store.pool_dir, 3)
    before = path.read_bytes()
    await reference_store.set(3, b"NewKey", b"new value", Origin.HOST)
    await reference_store.set(3, "schlüssel".encode(), "wert ☃".encode(), Origin.HOST)
    after = path.read_bytes()
    assert len(after) == len(before) + 2 * RECORD
    assert after[: len(before)] == before
    assert after[len(before) :] == canonical(b"NewKey", b"new value") + canonical(
        "schlüssel".encode(), "wert ☃".encode()
    )
    keys = [r.key for r in reference_store.states[3].records]
    assert keys[-2:] == [b"NewKey", "schlüssel".encode()]
    assert reference_store.enumerate(3, 16).key == b"NewKey"


async def test_set_same_value_leaves_file_alone(store: Store) -> None:
    path = pool_file(store.pool_dir, 0)
    await store.set(0, b"k", b"v", Origin.HOST)
    mtime = path.stat().st_mtime_ns
    data = path.read_bytes()
    recorder = Recorder()
    store.add_listener(recorder)
    await store.set(0, b"k", b"v", Origin.HOST)
    assert path.read_bytes() == data
    assert path.stat().st_mtime_ns == mtime
    assert recorder.changes == []


async def test_set_refuses_pool_2_and_bad_keys(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.set(2, b"k", b"v", Origin.MOUNT)
    with pytest.raises(ValueError):
        await store.set(5, b"k", b"v", Origin.MOUNT)
    for key, value in [(b"", b"v"), (b"a\0b", b"v"), (b"k" * 512, b"v"), (b"k", b"v" * 2048)]:
        with pytest.raises(ValueError):
            await store.set(1, key, value, Origin.MOUNT)
    await store.set(1, b"k" * 511, b"v" * 2047, Origin.MOUNT)  # the largest that fit
    assert all(pool_file(store.pool_dir, n).stat().st_size == 0 for n in (0, 2, 3, 4))
    assert file_pairs(pool_file(store.pool_dir, 1)) == [(b"k" * 511, b"v" * 2047)]


async def test_listeners_hear_our_own_changes(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    await store.set(4, b"k", b"1", Origin.MOUNT)
    await store.set(4, b"k", b"2", Origin.HOST)
    assert await store.delete(4, b"k", Origin.HOST) is True
    assert await store.delete(4, b"k", Origin.HOST) is False
    assert recorder.take() == [
        Change(ChangeKind.SET, 4, b"k", Origin.MOUNT),
        Change(ChangeKind.SET, 4, b"k", Origin.HOST),
        Change(ChangeKind.DELETE, 4, b"k", Origin.HOST),
    ]


# --------------------------------------------------------------------------- delete


async def test_delete_keeps_order_and_removes_all_duplicates(reference_store: Store) -> None:
    path = pool_file(reference_store.pool_dir, 1)
    status_before = slots_of(path)[2]
    assert await reference_store.delete(1, b"PROVISIONING_REPORT", Origin.HOST) is True
    keys = [k for k, _ in file_pairs(path)]
    assert keys[0].startswith(b"CLOUD_INIT|")
    assert keys[1:] == [b"Status"]
    assert pairs(reference_store.states[1].records) == file_pairs(path)
    assert reference_store.get(1, b"PROVISIONING_REPORT") is None
    assert reference_store.enumerate(1, 2) is None
    # The shifted record keeps its key and value (its stray bytes need not survive).
    assert file_pairs(path)[1] == (b"Status", status_before[KEY_FIELD:].split(b"\0", 1)[0])


async def test_delete_in_the_middle_shifts_later_records_up(reference_store: Store) -> None:
    path = pool_file(reference_store.pool_dir, 0)
    before = slots_of(path)
    pairs_before = file_pairs(path)
    assert pairs_before[3][0] == b"NdDriverVersion"
    assert await reference_store.delete(0, b"NdDriverVersion", Origin.HOST) is True
    after = slots_of(path)
    assert len(after) == len(before) - 1
    assert after[:3] == before[:3]  # records before the hole are not rewritten
    assert file_pairs(path) == pairs_before[:3] + pairs_before[4:]
    assert pairs(reference_store.states[0].records) == pairs_before[:3] + pairs_before[4:]


async def test_delete_missing_key_changes_nothing(store: Store) -> None:
    await store.set(0, b"a", b"1", Origin.HOST)
    path = pool_file(store.pool_dir, 0)
    data = path.read_bytes()
    assert await store.delete(0, b"b", Origin.HOST) is False
    assert await store.delete(0, b"A", Origin.HOST) is False  # exact, case-sensitive
    assert path.read_bytes() == data


async def test_invalid_record_survives_delete_byte_identical(tmp_path: Path) -> None:
    pool_dir = tmp_path / "pools"
    pool_dir.mkdir(mode=0o700)
    bad_key = record_bytes(b"bad-\xff\xfe", b"value", b"junk\x01tail", b"old\x80tail")
    bad_value = record_bytes(b"bad-value", b"\xc3(", b"", b"more\xffjunk")
    path = pool_file(pool_dir, 1)
    path.write_bytes(
        record_bytes(b"first", b"1", b"stale")
        + bad_key
        + record_bytes(b"second", b"2")
        + bad_value
        + record_bytes(b"third", b"3")
    )
    s = Store(pool_dir, lock_timeout=0.5)
    await s.open()
    try:
        visible = [(s.enumerate(1, i).key, s.enumerate(1, i).value) for i in range(3)]
        assert visible == [(b"first", b"1"), (b"second", b"2"), (b"third", b"3")]
        assert s.enumerate(1, 3) is None
        assert s.get(1, b"bad-value") is None
        assert await s.delete(1, b"bad-value", Origin.HOST) is False  # not a visible key

        assert await s.delete(1, b"first", Origin.HOST) is True
        after = slots_of(path)
        assert len(after) == 4
        assert after[0] == bad_key  # shifted up, byte for byte
        assert after[2] == bad_value
        assert file_pairs(path)[1] == (b"second", b"2")
        assert file_pairs(path)[3] == (b"third", b"3")
        visible = [(s.enumerate(1, i).key, s.enumerate(1, i).value) for i in range(2)]
        assert visible == [(b"second", b"2"), (b"third", b"3")]
        assert s.enumerate(1, 2) is None

        # A set of the invalid record's key appends a new, valid record and keeps the old one.
        await s.set(1, b"bad-value", b"fixed", Origin.MOUNT)
        after = slots_of(path)
        assert after[0] == bad_key and after[2] == bad_value
        assert after[4] == canonical(b"bad-value", b"fixed")
        assert s.get(1, b"bad-value") == b"fixed"
    finally:
        s.close()


def host_view(path: Path) -> list[tuple[bytes, bytes]]:
    """The records the host may see, parsed here: non-empty key, both fields UTF-8."""
    def valid(key: bytes, value: bytes) -> bool:
        try:
            key.decode("utf-8")
            value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return bool(key)
    return [(k, v) for k, v in file_pairs(path) if valid(k, v)]


async def test_memory_follows_the_file_through_every_kind_of_change(tmp_path: Path) -> None:
    """Modify, append, truncate and a delete that shifts records, with duplicates and invalid
    records in the pool: after each change, what the store answers from memory (the host's
    ENUMERATE and GET, the keys) is what the file now holds."""
    pool_dir = tmp_path / "pools"
    pool_dir.mkdir(mode=0o700)
    path = pool_file(pool_dir, 1)
    path.write_bytes(record_bytes(b"k1", b"a") + record_bytes(b"bad-\xff", b"x")
                     + record_bytes(b"k2", b"b") + record_bytes(b"k1", b"c"))
    keys = [b"k%d" % i for i in range(5)]
    rng = random.Random(7)
    s = Store(pool_dir, lock_timeout=0.5)
    await s.open()
    try:
        for step in range(150):
            key = rng.choice(keys)
            if rng.random() < 0.6:
                await s.set(1, key, rng.choice([b"1", b"22", b"333"]), Origin.MOUNT)
            else:
                await s.delete(1, key, Origin.MOUNT)
            if rng.random() < 0.1:  # a cloud-init style duplicate, picked up by a reload
                external_append(path, record_bytes(rng.choice(keys), b"ext"))
                await s.check_external_changes()
            want = host_view(path)
            seen = []
            while (record := s.enumerate(1, len(seen))) is not None:
                seen.append((record.key, record.value))
            assert seen == want, f"step {step}"
            assert {k: s.get(1, k) for k in keys} == {k: dict(want).get(k) for k in keys}
            assert list(s.states[1].unique_keys()) == list(dict.fromkeys(k for k, _ in want))
        assert b"bad-\xff" in dict(file_pairs(path))  # invalid: never shown, never deleted
    finally:
        s.close()


# --------------------------------------------------------------------------- external writers


async def test_external_append_is_picked_up(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    path = pool_file(store.pool_dir, 1)
    await store.set(1, b"ours", b"1", Origin.MOUNT)
    recorder.take()
    external_append(path, record_bytes(b"CLOUD_INIT|event", b'{"msg":"hi"}'))
    await store.check_external_changes()
    assert recorder.take() == [Change(ChangeKind.SET, 1, b"CLOUD_INIT|event", Origin.OTHER_PROGRAM)]
    assert store.get(1, b"CLOUD_INIT|event") == b'{"msg":"hi"}'
    assert store.enumerate(1, 1).key == b"CLOUD_INIT|event"
    await store.check_external_changes()  # nothing new: no second notification
    assert recorder.changes == []


async def test_external_duplicate_append_updates_last_wins_view(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    path = pool_file(store.pool_dir, 1)
    external_append(path, record_bytes(b"REPORT", b"old"))
    await store.check_external_changes()
    external_append(path, record_bytes(b"REPORT", b"new"))
    await store.check_external_changes()
    assert recorder.take() == [
        Change(ChangeKind.SET, 1, b"REPORT", Origin.OTHER_PROGRAM),
        Change(ChangeKind.SET, 1, b"REPORT", Origin.OTHER_PROGRAM),
    ]
    assert store.get(1, b"REPORT") == b"new"
    assert [store.enumerate(1, i).value for i in range(2)] == [b"old", b"new"]


async def test_external_truncate_is_seen_as_deletes(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    for key in (b"a", b"b"):
        await store.set(0, key, b"v", Origin.HOST)
    recorder.take()
    with open(pool_file(store.pool_dir, 0), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
    await store.check_external_changes()
    assert sorted(c.key for c in recorder.changes) == [b"a", b"b"]
    assert all(c.kind is ChangeKind.DELETE and c.origin is Origin.OTHER_PROGRAM
               for c in recorder.changes)
    assert store.states[0].records == []


async def test_our_append_after_external_append_keeps_both(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    path = pool_file(store.pool_dir, 1)
    await store.set(1, b"a", b"1", Origin.MOUNT)
    recorder.take()
    external_append(path, record_bytes(b"ext", b"x"))
    # No check_external_changes(): the write itself must notice the change under the lock.
    await store.set(1, b"ours", b"2", Origin.MOUNT)
    want = [(b"a", b"1"), (b"ext", b"x"), (b"ours", b"2")]
    assert file_pairs(path) == want
    assert pairs(store.states[1].records) == want
    assert recorder.take() == [
        Change(ChangeKind.SET, 1, b"ext", Origin.OTHER_PROGRAM),
        Change(ChangeKind.SET, 1, b"ours", Origin.MOUNT),
    ]


async def test_our_delete_after_external_changes_loses_nothing(store: Store) -> None:
    path = pool_file(store.pool_dir, 1)
    for key in (b"a", b"b", b"c"):
        await store.set(1, key, b"1", Origin.MOUNT)
    external_append(path, record_bytes(b"ext", b"x"))
    external_write_slot(path, 2, record_bytes(b"c", b"changed-outside"))  # same size
    # The delete shifts the later records up; it must shift what is on disk now.
    assert await store.delete(1, b"a", Origin.MOUNT) is True
    want = [(b"b", b"1"), (b"c", b"changed-outside"), (b"ext", b"x")]
    assert file_pairs(path) == want
    assert pairs(store.states[1].records) == want


async def test_our_modify_after_external_change_keeps_it(store: Store) -> None:
    path = pool_file(store.pool_dir, 0)
    await store.set(0, b"a", b"1", Origin.HOST)
    await store.set(0, b"b", b"1", Origin.HOST)
    external_write_slot(path, 1, record_bytes(b"b", b"outside"))
    external_append(path, record_bytes(b"c", b"outside"))
    await store.set(0, b"a", b"2", Origin.HOST)
    want = [(b"a", b"2"), (b"b", b"outside"), (b"c", b"outside")]
    assert file_pairs(path) == want
    assert pairs(store.states[0].records) == want


async def test_deleted_pool_file_is_recreated_empty(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    path = pool_file(store.pool_dir, 3)
    for key in (b"HostName", b"VirtualMachineId"):
        await store.set(3, key, b"x", Origin.HOST)
    recorder.take()
    path.unlink()
    await store.check_external_changes()
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 0
    assert store.states[3].records == []
    assert store.get(3, b"HostName") is None
    changes = recorder.take()
    assert sorted(c.key for c in changes) == [b"HostName", b"VirtualMachineId"]
    assert all(c.kind is ChangeKind.DELETE and c.origin is Origin.OTHER_PROGRAM for c in changes)
    # And the pool keeps working on the new file.
    await store.set(3, b"HostName", b"y", Origin.HOST)
    assert file_pairs(path) == [(b"HostName", b"y")]


async def test_pool_file_deleted_then_written_by_us(store: Store) -> None:
    path = pool_file(store.pool_dir, 0)
    await store.set(0, b"old", b"x", Origin.HOST)
    path.unlink()
    await store.set(0, b"new", b"y", Origin.HOST)  # no check_external_changes() first
    assert file_pairs(path) == [(b"new", b"y")]
    assert pairs(store.states[0].records) == [(b"new", b"y")]


# --------------------------------------------------------------------------- locking


async def test_foreign_lock_times_out_then_set_succeeds(store: Store) -> None:
    path = pool_file(store.pool_dir, 1)
    await store.set(1, b"before", b"1", Origin.MOUNT)
    data = path.read_bytes()
    proc = start_locker(path)
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            await store.set(1, b"k", b"v", Origin.MOUNT)
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 1.5
        assert f"pid {proc.pid}" in info.value.holders
        with pytest.raises(LockTimeout):
            await store.delete(1, b"before", Origin.MOUNT)
        assert path.read_bytes() == data
        assert store.get(1, b"k") is None
        assert store.get(1, b"before") == b"1"  # reads are served from memory meanwhile
    finally:
        stop_locker(proc)
    await store.set(1, b"k", b"v", Origin.MOUNT)
    assert file_pairs(path) == [(b"before", b"1"), (b"k", b"v")]
    assert store.get(1, b"k") == b"v"


async def test_pool_file_replaced_by_rename_is_followed(store: Store) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    path = pool_file(store.pool_dir, 0)
    await store.set(0, b"old", b"1", Origin.HOST)
    recorder.take()
    replacement = path.with_name("replacement.tmp")
    replacement.write_bytes(record_bytes(b"from-rename", b"2", b"junk"))
    os.rename(replacement, path)
    await store.check_external_changes()
    assert pairs(store.states[0].records) == [(b"from-rename", b"2")]
    assert sorted((c.kind.value, c.key) for c in recorder.take()) == [
        ("delete", b"old"),
        ("set", b"from-rename"),
    ]
    # Our next write goes to the new inode, not the orphaned one.
    await store.set(0, b"ours", b"3", Origin.HOST)
    assert file_pairs(path) == [(b"from-rename", b"2"), (b"ours", b"3")]


async def test_trailing_partial_record_is_ignored_then_overwritten(store: Store) -> None:
    path = pool_file(store.pool_dir, 1)
    await store.set(1, b"a", b"1", Origin.MOUNT)
    with open(path, "ab") as f:  # a writer that crashed after 100 bytes of a record
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(b"half-written-key\0" + b"x" * 83)
    await store.check_external_changes()
    assert pairs(store.states[1].records) == [(b"a", b"1")]
    assert store.enumerate(1, 1) is None
    await store.set(1, b"b", b"2", Origin.MOUNT)
    assert path.stat().st_size == 2 * RECORD
    assert slots_of(path)[1] == canonical(b"b", b"2")
    assert pairs(store.states[1].records) == [(b"a", b"1"), (b"b", b"2")]


async def test_queued_changes_share_one_lock_timeout(store: Store) -> None:
    """Six changes queued behind a stuck lock (and the watcher) each fail after about one
    lock timeout, not one timeout per change ahead of them; a RequestLock's changes
    together wait one timeout; the next change after them tries once."""
    path = pool_file(store.pool_dir, 1)
    await store.set(1, b"before", b"1", Origin.MOUNT)
    with open(path, "ab") as f:  # a foreign change the watcher wants to read
        f.write(canonical(b"foreign", b"x"))
    proc = start_locker(path)
    waited: dict[str, float] = {}
    try:
        async def change(name: str) -> None:
            started = time.monotonic()
            with pytest.raises(LockTimeout):
                await store.set(1, name.encode(), b"v", Origin.MOUNT)
            waited[name] = time.monotonic() - started

        async def request(lock) -> None:
            started = time.monotonic()
            with pytest.raises(LockTimeout):
                async with lock:  # a filesystem rename: a set, then a delete
                    try:
                        await store.set(1, b"renamed", b"v", Origin.MOUNT)
                    finally:
                        await store.delete(1, b"before", Origin.MOUNT)
            waited["request"] = time.monotonic() - started

        lock = store.request_lock(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.check_external_changes)
            for i in range(6):
                nursery.start_soon(change, f"k{i}")
            nursery.start_soon(request, lock)
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="still held"):
            await store.set(1, b"later", b"v", Origin.MOUNT)
        waited["later, stuck"] = time.monotonic() - started
        print({name: round(seconds, 2) for name, seconds in waited.items()})
        assert len(waited) == 8
        for name, seconds in waited.items():
            assert seconds < 2 * store.lock_timeout, (name, waited)
        assert waited["later, stuck"] < store.lock_timeout / 2, waited
    finally:
        stop_locker(proc)
    await store.set(1, b"k0", b"v", Origin.MOUNT)  # released: no longer stuck
    assert store.get(1, b"k0") == b"v" and store.get(1, b"before") == b"1"
