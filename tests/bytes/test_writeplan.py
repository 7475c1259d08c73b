"""The pool write rules (kvpfs.storage.writeplan), with records and bytes alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvpfs.storage import writeplan
from kvpfs.storage.poolrecords import PoolRecords
from kvpfs.storage.records import Record, encode_record, parse_pool, slot_bytes
from kvpfs.storage.writeplan import (
    Append,
    Delete,
    Modify,
    Remove,
    Truncate,
    Unchanged,
    Upsert,
    plan,
)

BAD = Record(b"\xff\xfe", b"x", encode_record(b"\xff\xfe", b"x"))  # not UTF-8: never matched


def recs(*pairs: tuple[bytes, bytes]) -> list[Record]:
    return [Record(k, v) for k, v in pairs]


def test_upsert_of_a_new_key_appends_after_the_last_record():
    records = recs((b"a", b"1"), (b"b", b"2"))
    assert plan(records, Upsert(b"c", b"3")) == Append(2, Record(b"c", b"3"))


def test_upsert_changes_the_last_duplicate_in_place_and_leaves_earlier_ones():
    records = recs((b"k", b"old"), (b"x", b"1"), (b"k", b"newer"))
    change = plan(records, Upsert(b"k", b"v"))
    assert change == Modify(2, Record(b"k", b"v"))
    assert after(records, change) == recs((b"k", b"old"), (b"x", b"1"), (b"k", b"v"))


def test_upsert_of_the_same_value_writes_nothing():
    records = recs((b"k", b"old"), (b"k", b"same"))
    assert plan(records, Upsert(b"k", b"same")) == Unchanged()
    # Only the last record counts: an earlier duplicate with the value is not enough.
    assert plan(recs((b"k", b"v"), (b"k", b"w")), Upsert(b"k", b"v")) == Modify(
        1, Record(b"k", b"v"))


def test_invalid_records_never_match_a_key():
    records = [BAD, *recs((b"a", b"1"))]
    assert plan(records, Upsert(BAD.key, b"y")) == Append(2, Record(BAD.key, b"y"))
    assert plan(records, Delete(BAD.key)) == Unchanged()


def test_delete_of_a_missing_key_writes_nothing():
    assert plan(recs((b"a", b"1")), Delete(b"b")) == Unchanged()


def test_delete_of_the_last_records_is_a_truncation():
    records = recs((b"a", b"1"), (b"k", b"2"), (b"k", b"3"))
    change = plan(records, Delete(b"k"))
    assert change == Truncate((1, 2), b"k")
    assert change.slot == 1
    assert after(records, change) == recs((b"a", b"1"))


def test_delete_elsewhere_removes_every_duplicate_and_keeps_the_order():
    records = recs((b"k", b"1"), (b"a", b"2"), (b"k", b"3"), (b"b", b"4"))
    change = plan(records, Delete(b"k"))
    assert isinstance(change, Remove)
    assert change.slots == (0, 2)
    assert after(records, change) == recs((b"a", b"2"), (b"b", b"4"))


def test_an_index_given_by_the_caller_is_used_as_is():
    records = recs((b"k", b"1"), (b"k", b"2"))
    assert plan(records, Upsert(b"k", b"x"), slots=[0]) == Modify(0, Record(b"k", b"x"))


KEYS = st.sampled_from([b"a", b"b", b"c"])
EDITS = st.one_of(st.builds(Upsert, KEYS, st.sampled_from([b"1", b"2", b""])),
                  st.builds(Delete, KEYS))


def after(records: list[Record], change: writeplan.Plan) -> list[Record]:
    """The records a plan leaves, as the store's memory takes it (`PoolRecords.apply`)."""
    return PoolRecords(list(records)).apply(change).records


RECORDS = st.one_of(st.builds(Record, KEYS, st.sampled_from([b"1", b"2"])), st.just(BAD))


@given(st.lists(RECORDS, max_size=8), st.lists(EDITS, max_size=8))
def test_plans_follow_a_last_wins_model_through_the_bytes_of_a_pool_file(initial, edits):
    """Carried out on the file's bytes, every plan leaves what a dict of last values predicts,
    upserts never disturb other records, and the index kept in memory, changed by the same
    plan, is the one a fresh read of the bytes builds."""
    pool = PoolRecords(list(initial))
    model: dict[bytes, bytes] = {}
    for record in initial:
        if record.valid:
            model[record.key] = record.value
    for edit in edits:
        change = plan(pool.records, edit, pool.slots.get(edit.key, []))
        assert change == plan(pool.records, edit)  # the index gives what a scan gives
        pool = pool.apply(change)
        records, trailing = parse_pool(b"".join(slot_bytes(r) for r in pool.records))
        assert trailing == 0
        fresh = PoolRecords(records)
        assert (pool.records, pool.slots, pool.visible) == (records, fresh.slots, fresh.visible)
        if isinstance(edit, Upsert):
            model[edit.key] = edit.value
        else:
            model.pop(edit.key, None)
        assert fresh.last_wins() == model
        assert [r for r in records if not r.valid] == [r for r in initial if not r.valid]
    assert writeplan.key_slots(pool.records, b"zzz") == []
