"""What the host sees while a tool runs: guest's pool file, sampled every few milliseconds.

The host reads the guest pool through the KVP protocol, which kvpfs answers from the pool
file; a temporary name that reached the host for a moment was in that file for that moment.
A thread re-reads it (under a shared flock, so a write in progress is never read half done)
and remembers every key name it ever found, so a test can say "the host never saw X".
"""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path
from types import TracebackType

from kvpfs.storage.records import parse_pool
from kvpfs.wire.protocol import Pool

GUEST = int(Pool.GUEST)

POLL_INTERVAL = 0.002


def pool_file(pools: Path, pool: int = GUEST) -> Path:
    return pools / f".kvp_pool_{pool}"


def read_pool(pools: Path, pool: int = GUEST) -> dict[str, str]:
    """The pool's keys and values now (the later record wins, as for the host)."""
    path = pool_file(pools, pool)
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            data = f.read()
    except FileNotFoundError:
        return {}
    records, _ = parse_pool(data)
    return {r.key.decode(errors="replace"): r.value.decode(errors="replace")
            for r in records if r.key}


class HostWatch:
    """A poller thread recording every guest key name and (name, value) the host could see."""

    def __init__(self, pools: Path, pool: int = GUEST) -> None:
        self.pools = pools
        self.pool = pool
        self.names: set[str] = set()
        self.items: set[tuple[str, str]] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostwatch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = read_pool(self.pools, self.pool)
            self.names.update(seen)
            self.items.update(seen.items())
            self.samples += 1
            time.sleep(POLL_INTERVAL)

    def __enter__(self) -> HostWatch:
        self._thread.start()
        # At least one sample before the tool starts: what was there already.
        while self.samples == 0 and self._thread.is_alive():
            time.sleep(POLL_INTERVAL)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        # One more full sample after the tool ended, then stop.
        taken = self.samples
        while self.samples < taken + 2 and self._thread.is_alive():
            time.sleep(POLL_INTERVAL)
        self._stop.set()
        self._thread.join(5)

    def unexpected(self, allowed: set[str]) -> set[str]:
        """Names the host saw that are not in `allowed`."""
        return self.names - allowed
