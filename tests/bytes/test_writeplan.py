"""The pool write rules (kvpfs.storage.writeplan), with records and bytes alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvpfs.storage import writeplan
from kvpfs.storage.records import Record, encode_record, parse_pool
from kvpfs.storage.writeplan import (
    Append,
    Delete,
    Modify,
    Remove,
    Truncate,
    Unchanged,
    Upsert,
    apply_to_records,
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
    assert apply_to_records(records, change) == recs((b"k", b"old"), (b"x", b"1"), (b"k", b"v"))


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
    assert apply_to_records(records, change) == recs((b"a", b"1"))


def test_delete_elsewhere_removes_every_duplicate_and_keeps_the_order():
    records = recs((b"k", b"1"), (b"a", b"2"), (b"k", b"3"), (b"b", b"4"))
    change = plan(records, Delete(b"k"))
    assert isinstance(change, Remove)
    assert change.slots == (0, 2)
    assert apply_to_records(records, change) == recs((b"a", b"2"), (b"b", b"4"))


def test_an_index_given_by_the_caller_is_used_as_is():
    records = recs((b"k", b"1"), (b"k", b"2"))
    assert plan(records, Upsert(b"k", b"x"), slots=[0]) == Modify(0, Record(b"k", b"x"))


KEYS = st.sampled_from([b"a", b"b", b"c"])
EDITS = st.one_of(st.builds(Upsert, KEYS, st.sampled_from([b"1", b"2", b""])),
                  st.builds(Delete, KEYS))


@given(st.lists(st.tuples(KEYS, st.sampled_from([b"1", b"2"])), max_size=8),
       st.lists(EDITS, max_size=8))
def test_plans_follow_a_last_wins_model_through_the_bytes_of_a_pool_file(pairs, edits):
    """Carried out on the file's bytes, every plan leaves what a dict of last values predicts,
    and upserts never disturb other records."""
    records = recs(*pairs)
    model: dict[bytes, bytes] = {}
    for key, value in pairs:
        model[key] = value
    for edit in edits:
        change = plan(records, edit)
        records = apply_to_records(records, change)
        data = b"".join(encode_record(r.key, r.value) for r in records)
        records, trailing = parse_pool(data)
        assert trailing == 0
        if isinstance(edit, Upsert):
            model[edit.key] = edit.value
        else:
            model.pop(edit.key, None)
        last: dict[bytes, bytes] = {}
        for record in records:
            last[record.key] = record.value
        assert last == model
    assert writeplan.key_slots(records, b"zzz") == []
