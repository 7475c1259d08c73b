"""`Handle`, an open value file, as an explicit state machine (kvpfs/fuse/handles.py).

Every move the tables allow is taken once, every other one raises BadMove,
and the properties the handlers read (`written`, `dirty`, `failed`) follow
the publication state.
"""

from __future__ import annotations

import itertools

import pytest

from kvpfs.fuse.handles import (
    BUFFER_MOVES,
    PUBLICATION_MOVES,
    BadMove,
    Buffer,
    Handle,
    Publication,
)
from kvpfs.fuse.nodes import Node
from kvpfs.wire.protocol import Pool


def handle(mode: Buffer = Buffer.SHARED,
           publication: Publication = Publication.CLEAN) -> Handle:
    node = Node(100, Pool.GUEST, b"Status", b"Status")
    return Handle(node, b"value", True, False, mode=mode, publication=publication)


@pytest.mark.parametrize(("start", "to"), list(itertools.product(Buffer, Buffer)))
def test_buffer_moves_are_exactly_the_table(start, to):
    h = handle(mode=start)
    if to in BUFFER_MOVES[start]:
        h.move_buffer(to)
        assert h.mode is to
    else:
        with pytest.raises(BadMove, match=f"{start.name} -> {to.name}"):
            h.move_buffer(to)
        assert h.mode is start


def test_a_private_buffer_is_final():
    h = handle()
    h.move_buffer(Buffer.PRIVATE)
    assert h.private and not h.in_draft
    for to in Buffer:
        with pytest.raises(BadMove):
            h.move_buffer(to)


def test_a_draft_goes_back_to_shared_once_published():
    h = handle()
    h.move_buffer(Buffer.DRAFT)
    assert h.in_draft and not h.private
    h.move_buffer(Buffer.SHARED)
    assert not h.in_draft


@pytest.mark.parametrize(("start", "to"), list(itertools.product(Publication, Publication)))
def test_publication_moves_are_exactly_the_table(start, to):
    h = handle(publication=start)
    if to is start or to in PUBLICATION_MOVES[start]:
        h._publication(to)
        assert h.publication is to
    else:
        with pytest.raises(BadMove, match=f"{start.name} -> {to.name}"):
            h._publication(to)
        assert h.publication is start


def test_what_a_commit_does_follows_the_publication_state():
    h = handle()
    assert (h.written, h.dirty, h.failed) == (False, False, False)
    h.changed()  # a write went in: a flush publishes it
    assert (h.written, h.dirty, h.failed) == (True, True, False)
    h.published()
    assert (h.written, h.dirty) == (False, False)
    truncated = handle(publication=Publication.TRUNCATED)
    # `: > key`: not published by a flush (nothing written), but by the release.
    assert (truncated.written, truncated.dirty) == (False, True)


def test_a_refused_handle_stays_refused_until_an_append_succeeds():
    h = handle()
    h.changed()
    h.refused()
    assert h.failed and not h.written
    h.changed()  # a later write does not revive it
    assert h.failed
    with pytest.raises(BadMove):
        h.published()  # nothing was published: a bug if anyone says so
    h.appended()  # an append that succeeds after one refused is stored at close
    assert h.written and not h.failed


def test_a_clean_handle_cannot_be_truncated_after_the_fact():
    h = handle()
    with pytest.raises(BadMove, match="CLEAN -> TRUNCATED"):
        h._publication(Publication.TRUNCATED)
