"""The guest keys' metadata file (kvpfs.storage.keymeta), with real files: what is saved
loads back, value facts hold only for the value they describe, a damaged file is made safe,
and a save is atomic (the old file stays whole if the new one cannot be written)."""

from __future__ import annotations

import os

import pytest

from kvpfs.storage.keymeta import (
    FILE_NAME,
    UNREADABLE_MODE,
    KeyMeta,
    KeyMetaFile,
    value_hash,
)


def test_saved_records_load_back(tmp_path):
    meta = KeyMetaFile(tmp_path)
    records = {
        b"Secret": KeyMeta(mode=0o600, uid=65534, gid=4242).with_value(
            b"s3cret", mtime_ns=1_600_000_000_123_456_789, newline=True),
        "Ünïcode".encode(): KeyMeta(mode=0o640),
        b"Empty": KeyMeta(),  # nothing set: not written at all
    }
    meta.save(records)
    loaded = meta.load()
    assert not loaded.unreadable
    assert loaded.records == {k: v for k, v in records.items() if k != b"Empty"}
    assert os.stat(tmp_path / FILE_NAME).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]  # no temporary file left


def test_value_facts_hold_only_for_their_value():
    record = KeyMeta(mode=0o600).with_value(b"web", mtime_ns=5, newline=True)
    facts = record.about(b"web")
    assert facts is not None and facts.mtime_ns == 5 and facts.newline
    assert record.about(b"db") is None  # another program changed the value: it wins
    assert record.mode == 0o600  # the key's own facts do not depend on the value
    assert KeyMeta(mode=0o600).about(b"web") is None
    assert record.value_sha256 == value_hash(b"web")


def test_missing_file_is_empty_and_safe(tmp_path):
    loaded = KeyMetaFile(tmp_path).load()
    assert loaded.records == {} and not loaded.unreadable


@pytest.mark.parametrize("content", [
    b"not json", b"[]", b'{"format": 99, "keys": {}}', b'{"format": 1, "keys": {"zz": {}}}',
    b'{"format": 1, "keys": {"41": {"mode": "0777"}}}',
    b'{"format": 1, "keys": {"41": {"mode": 99999}}}',
    b'{"format": 1, "keys": {"41": {"value_sha256": "short"}}}',
    b"\xff\xfe",
    b"[" * 100_000,  # nested past Python's recursion limit: RecursionError, not ValueError
    b'{"format": 1, "keys": {"41": ' + b"{" * 100_000 + b"}",
])
def test_a_damaged_file_makes_every_key_owner_only(tmp_path, content, caplog):
    (tmp_path / FILE_NAME).write_bytes(content)
    loaded = KeyMetaFile(tmp_path).load()
    assert loaded.unreadable and loaded.records == {}
    assert f"mode {UNREADABLE_MODE:o}" in caplog.text


def test_a_failed_save_leaves_the_old_file_whole(tmp_path):
    meta = KeyMetaFile(tmp_path)
    meta.save({b"Key": KeyMeta(mode=0o600)})
    # The temporary file's place is taken by a directory: the new version cannot be written.
    (tmp_path / (FILE_NAME + ".new")).mkdir()
    with pytest.raises(OSError):
        meta.save({b"Key": KeyMeta(mode=0o644)})
    assert meta.load().records == {b"Key": KeyMeta(mode=0o600)}


def test_a_symlinked_file_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text('{"format": 1, "keys": {}}')
    (tmp_path / FILE_NAME).symlink_to(target)
    assert KeyMetaFile(tmp_path).load().unreadable
