"""Per-user bounds with headroom for root: what a user can make kvpfs hold.

Every resource a local user can make kvpfs keep (open files and directories, unpublished
bytes) is counted per user. An unprivileged user gets at most `per_user`, all of them
together at most `total - headroom`; privileged users (root, and the user kvpfs runs as)
count only against `total`. So no user, nor all of them together, can take what root
needs to read and write the pools, and the total bounds kvpfs's memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Refusal:
    """Why an amount was refused; `own` when it was the user's own bound, not a total."""

    reason: str
    own: bool = False

    def __str__(self) -> str:
        return self.reason


Bounds = tuple[int, int, int]  # (per user, total, root's headroom within the total)


@dataclass
class UserQuota:
    what: str  # "open files", "unpublished bytes": for the refusal's message
    # Read at every call, so that a bound set in `wire.limits` applies at once.
    bounds: Callable[[], Bounds]
    privileged: frozenset[int] = frozenset({0})
    held: Counter[int] = field(default_factory=Counter)
    sum_all: int = 0
    sum_others: int = 0

    def refusal(self, uid: int, amount: int = 1) -> Refusal | None:
        """Why `uid` may not take `amount` more, or None if it may. The headroom is at
        most an eighth of the total (a small total leaves users most of it)."""
        per_user, total, headroom = self.bounds()
        if self.sum_all + amount > total:
            return Refusal(f"{self.what} of all users would exceed {total}")
        if uid in self.privileged:
            return None
        if self.held[uid] + amount > per_user:
            return Refusal(f"{self.what} of uid {uid} would exceed {per_user} (the most"
                           " per user)", own=True)
        others = total - min(headroom, total // 8)
        if self.sum_others + amount > others:
            return Refusal(f"{self.what} of unprivileged users would exceed {others} (the"
                           " rest is kept for root)")
        return None

    def take(self, uid: int, amount: int = 1) -> Refusal | None:
        """Count `amount` more for `uid`, or say why not (then nothing is counted)."""
        if amount <= 0:
            self.give(uid, -amount)
            return None
        why = self.refusal(uid, amount)
        if why is None:
            self.held[uid] += amount
            self.sum_all += amount
            if uid not in self.privileged:
                self.sum_others += amount
        return why

    def give(self, uid: int, amount: int = 1) -> None:
        amount = min(amount, self.held[uid])
        if amount <= 0:
            return
        self.held[uid] -= amount
        if not self.held[uid]:
            del self.held[uid]
        self.sum_all -= amount
        if uid not in self.privileged:
            self.sum_others -= amount
