"""The per-user bounds (kvpfs.quota) and the refusal log's rate (kvpfs.quietlog.RateLog)."""

from __future__ import annotations

import logging

import pytest

from kvpfs.quietlog import RateLog
from kvpfs.quota import UserQuota


def test_a_user_gets_at_most_its_share_and_root_keeps_headroom():
    quota = UserQuota("open files", lambda: (3, 16, 8))  # headroom: at most 16 // 8 = 2
    assert [quota.take(1000) for _ in range(3)] == [None] * 3
    refused = quota.take(1000)
    assert refused is not None and refused.own and "of uid 1000 would exceed 3" in str(refused)
    assert [quota.take(uid, 3) for uid in (1001, 1002, 1003)] == [None] * 3
    assert quota.take(1004, 2) is None  # users together: 16 - 2
    refused = quota.take(1005)
    assert refused is not None and not refused.own and "kept for root" in str(refused)
    assert quota.take(0, 2) is None  # root: the headroom is there
    assert "of all users would exceed 16" in str(quota.take(0))
    quota.give(1000, 3)
    assert quota.take(0) is None and quota.take(1005) is None
    assert (quota.sum_all, quota.sum_others) == (15, 12)


def test_giving_back_more_than_held_cannot_go_negative():
    quota = UserQuota("bytes", lambda: (100, 1000, 100))
    assert quota.take(5, 60) is None
    quota.give(5, 1000)
    assert (quota.held[5], quota.sum_all, quota.sum_others) == (0, 0, 0)
    assert quota.take(5, -10) is None  # a shrink is a give
    assert quota.sum_all == 0


def test_ratelog_holds_back_past_its_lines_and_counts_them(caplog: pytest.LogCaptureFixture):
    now = [0.0]
    rate = RateLog(logging.getLogger("kvpfs.test.rate"), lines=5, window=10.0,
                   clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="kvpfs.test.rate"):
        for i in range(10_000):
            now[0] += 0.001
            rate.warning("refused %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"refused {i}" for i in range(5)]
        caplog.clear()
        now[0] += 10
        rate.warning("later")
        assert [r.getMessage() for r in caplog.records] == [
            "9995 more refusal(s) like the above were not logged (at most 5 lines per 10 s)",
            "later"]
