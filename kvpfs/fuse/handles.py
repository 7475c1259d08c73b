"""An open value file: what it holds, and whether and when that is published.

Two small state machines instead of a row of flags, each move checked
against the moves allowed (a wrong one is a bug in kvpfs, raised as such):

- `Buffer`, where the handle's bytes are: the value it opened, shared with
  other readers; the key's shared O_APPEND draft (writes.py); or its own copy.
- `Publication`, what its close will do: nothing; store what was written;
  store the empty value an O_TRUNC open made (at release only, as shells
  open, dup2 and close before they write); or nothing, because a write was
  refused (only a later successful append revives it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvpfs.fuse.nodes import Node


class Buffer(enum.Enum):
    """Where a handle's bytes are."""

    SHARED = "the value it opened, not copied"
    DRAFT = "appended to the key's shared draft"
    PRIVATE = "its own copy, counted as unpublished"


class Publication(enum.Enum):
    """What the next commit (flush, fsync, release) does with a handle's bytes."""

    CLEAN = "nothing to publish"
    TRUNCATED = "emptied at open: published at release, not at a flush"
    CHANGED = "written: published at the next commit"
    REFUSED = "a write was refused: nothing is published"


BUFFER_MOVES = {
    Buffer.SHARED: {Buffer.DRAFT, Buffer.PRIVATE},
    Buffer.DRAFT: {Buffer.SHARED, Buffer.PRIVATE},  # SHARED: its draft was published
    Buffer.PRIVATE: set(),
}
PUBLICATION_MOVES = {
    Publication.CLEAN: {Publication.CHANGED, Publication.REFUSED},
    Publication.TRUNCATED: {Publication.CHANGED, Publication.CLEAN, Publication.REFUSED},
    Publication.CHANGED: {Publication.CLEAN, Publication.REFUSED},
    Publication.REFUSED: {Publication.CHANGED},  # an append that succeeds after one refused
}


class BadMove(RuntimeError):
    """A handle was moved to a state it cannot reach from where it is (a kvpfs bug)."""


@dataclass(eq=False)
class Handle:
    """One open of a value or scratch file (its open mode never changes)."""

    node: Node
    # Read-only and untouched handles share the value they opened (no copy); the first
    # change through a handle that does not append makes it a private bytearray.
    buffer: bytes | bytearray
    writable: bool
    append: bool
    mode: Buffer = Buffer.SHARED
    publication: Publication = Publication.CLEAN
    prepared: bool = False  # the pool's lock and room were checked for this handle
    charged: int = 0  # bytes of `buffer` counted as unpublished

    # ---------------------------------------------------------------- buffer
    @property
    def private(self) -> bool:
        return self.mode is Buffer.PRIVATE

    @property
    def in_draft(self) -> bool:
        return self.mode is Buffer.DRAFT

    def move_buffer(self, to: Buffer) -> None:
        if to not in BUFFER_MOVES[self.mode]:
            raise BadMove(f"handle buffer {self.mode.name} -> {to.name}")
        self.mode = to

    # ---------------------------------------------------------------- publication
    @property
    def failed(self) -> bool:
        return self.publication is Publication.REFUSED

    @property
    def written(self) -> bool:
        """Changed since the last commit: a flush publishes it."""
        return self.publication is Publication.CHANGED

    @property
    def dirty(self) -> bool:
        """Differs from what is published: a release publishes it."""
        return self.publication in (Publication.CHANGED, Publication.TRUNCATED)

    def changed(self) -> None:
        """A write or truncate went in (a handle refused before stays refused)."""
        if self.publication is not Publication.REFUSED:
            self._publication(Publication.CHANGED)

    def appended(self) -> None:
        """An append went in: stored at this handle's close, even after one refused."""
        self._publication(Publication.CHANGED)

    def refused(self) -> None:
        self._publication(Publication.REFUSED)

    def published(self) -> None:
        self._publication(Publication.CLEAN)

    def _publication(self, to: Publication) -> None:
        if to is not self.publication and to not in PUBLICATION_MOVES[self.publication]:
            raise BadMove(f"handle publication {self.publication.name} -> {to.name}")
        self.publication = to
