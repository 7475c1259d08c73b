"""The pools in memory, kept in step with the pool files on disk.

One `PoolRecords` per pool file mirrors its records in file order. Reads (the
host's GET and ENUMERATE, the filesystem's lookups and reads) are answered from
memory at a cost that does not depend on the pool's size. Every change goes to
the file first, in a worker thread, under both the fcntl and the flock lock,
and only then to memory; before changing anything the file's signature is
compared with the one memory was loaded from, so a change another program made
in between is loaded first and never overwritten.

Changes other programs make while nobody writes are noticed by `watch()`,
which compares file signatures (a stat, not a read) a few times a second.

Listeners learn of every change as `Change` items, with where it came from.

Memory is changed only on the trio thread. The device server's thread reads it
too (`get`, `enumerate`), so every change to memory and those two reads hold
`memory_lock`, a plain lock held for a few dictionary and list operations and
never across I/O.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from kvpfs.quietlog import QuietLog
from kvpfs.storage import writeplan
from kvpfs.storage.errors import LockTimeout, PoolFileError
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.storage.poolfile import PoolFile, pool_path
from kvpfs.storage.poolrecords import PoolRecords, Signature, stat_signature
from kvpfs.storage.records import Record
from kvpfs.storage.worker import Worker
from kvpfs.wire.limits import KEY_MAX_BYTES, VALUE_MAX_BYTES
from kvpfs.wire.pools import POOL_COUNT, SYSTEM_POOL_DIR
from kvpfs.wire.protocol import Pool

log = logging.getLogger(__name__)

class Origin(enum.Enum):
    """Who made a change (never a pool: pool 0 is called `external` too)."""

    HOST = "host"  # the host, through the device
    MOUNT = "mount"  # a program, through the kvpfs mount
    OTHER_PROGRAM = "other program"  # a program writing a pool file directly


class ChangeKind(enum.Enum):
    """What a change did to a key; the value is the word /.events shows for it."""

    SET = "set"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Change:
    """One key's change, as every listener learns of it."""

    kind: ChangeKind
    pool: int
    key: bytes
    origin: Origin


Listener = Callable[[list[Change]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request stops waiting for pool locks, fixed when it arrives.

    Every wait on its way (the filesystem's queue, the pool's queue, the pool file's
    locks) ends at this one moment, so requests queued behind a stuck lock each fail
    after one lock timeout, not after one timeout for each request ahead of them.
    """

    trio_at: float  # on trio's clock, for waits on the trio thread
    monotonic_at: float  # on time.monotonic(), for the worker thread's lock polling
    timeout: float  # the lock timeout it was made from, for messages

    @classmethod
    def after(cls, timeout: float) -> Deadline:
        return cls(trio.current_time() + timeout, time.monotonic() + timeout, timeout)


# The deadline of the request the current task is serving, while it holds a `RequestLock`.
_request_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "kvpfs_request_deadline", default=None)


async def _acquire_by(lock: trio.Lock, deadline: Deadline) -> bool:
    """Take `lock`, giving up at the deadline; a free lock is taken even after it."""
    try:
        lock.acquire_nowait()
        return True
    except trio.WouldBlock:
        pass
    with trio.move_on_at(deadline.trio_at) as scope:
        await lock.acquire()
    return not scope.cancelled_caught


class RequestLock:
    """A trio lock for a sequence of changes to one pool (a filesystem request).

    Its waiters give up with LockTimeout at their request's deadline, fixed on
    entry, and the changes made while holding it keep that deadline: a rename's
    set and delete together wait one lock timeout at most.
    """

    def __init__(self, store: Store, pool: int) -> None:
        self._store = store
        self._pool = pool
        self._lock = trio.Lock()
        self._token: contextvars.Token[Deadline | None] | None = None

    async def __aenter__(self) -> None:
        deadline = _request_deadline.get()
        token = None
        if deadline is None:
            deadline = Deadline.after(self._store.lock_timeout)
            token = _request_deadline.set(deadline)
        try:
            if not await _acquire_by(self._lock, deadline):
                raise self._store.queued_timeout(self._pool, deadline)
        except BaseException:
            if token is not None:
                _request_deadline.reset(token)
            raise
        self._token = token

    async def __aexit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        self._lock.release()
        if token is not None:
            _request_deadline.reset(token)


def diff(old: PoolRecords, new: PoolRecords, pool: int, origin: Origin) -> list[Change]:
    """What changed between two loads of a pool, key by key (last-wins view)."""
    before, after = old.last_wins(), new.last_wins()
    changes = [
        Change(ChangeKind.SET, pool, key, origin)
        for key, value in after.items()
        if before.get(key) != value
    ]
    changes += [Change(ChangeKind.DELETE, pool, key, origin)
                for key in before if key not in after]
    return changes


class Store:
    """The five pools of one pool directory."""

    def __init__(
        self,
        pool_dir: Path,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        poll_interval: float = 0.25,
    ) -> None:
        self.pool_dir = pool_dir
        self.lock_timeout = lock_timeout
        self.poll_interval = poll_interval
        self.files = [
            PoolFile(pool_path(pool_dir, pool), lock_timeout=lock_timeout)
            for pool in range(POOL_COUNT)
        ]
        self.states = [PoolRecords() for _ in range(POOL_COUNT)]
        self._locks = [trio.Lock() for _ in range(POOL_COUNT)]
        # Pool-file work runs in one thread per pool: its lock serializes it anyway.
        self._workers = [Worker(f"kvpfs pool {pool}") for pool in range(POOL_COUNT)]
        self._listeners: list[Listener] = []
        # Who held each pool's lock at the last timeout, for requests that time out queued.
        self._holders: list[str] = [""] * POOL_COUNT
        # Per pool, the invalid records (by their first bytes) already reported.
        self._warned_invalid: list[set[bytes]] = [set() for _ in range(POOL_COUNT)]
        self._quiet = QuietLog(log)
        self._reload_busy_since: list[float | None] = [None] * POOL_COUNT
        self.memory_lock = threading.Lock()

    # ------------------------------------------------------------------ set-up
    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def open(self) -> None:
        for pool in range(POOL_COUNT):
            records = await trio.to_thread.run_sync(self._open_and_read, pool)
            self._install(pool, records)

    def _open_and_read(self, pool: int) -> PoolRecords:
        pf = self.files[pool]
        pf.open()
        with pf.locked():
            return pf.read()

    def close(self) -> None:
        """End and join the pool workers, then close the files they used.

        Called once every request has been answered (`mount.serve` closes the store after
        all services), so each worker is idle and ends at once; one that does not within
        the lock timeout is named in the log rather than waited for forever.
        """
        for worker in self._workers:
            worker.close()
        for worker in self._workers:
            if not worker.join(timeout=self.lock_timeout + 1):
                log.warning("%s: still running a pool-file change at close", worker.name)
        for pf in self.files:
            pf.close()

    def _install(self, pool: int, state: PoolRecords) -> None:
        with self.memory_lock:
            self.states[pool] = state
        self._report_invalid(pool, state)

    def _report_invalid(self, pool: int, state: PoolRecords) -> None:
        """One line for the invalid records not reported yet, however many (a pool full
        of garbage is one line, not one per record), and the partial record once."""
        invalid = state.invalid_slots() if state.visible is not None else []
        seen = {(state.records[slot].raw or b"")[:64] for slot in invalid}
        known = self._warned_invalid[pool]
        new = [slot for slot in invalid if (state.records[slot].raw or b"")[:64] not in known]
        self._warned_invalid[pool] = seen  # only what the pool holds now: memory stays bounded
        if new:
            shown = ", ".join(str(slot) for slot in new[:5])
            if len(new) > 5:
                shown += f" and {len(new) - 5} more"
            log.warning(
                "pool %d (%s): %d record(s) not valid UTF-8 or with an empty key (slot %s;"
                " %d such in all of %d records); they are kept on disk untouched but never"
                " shown or sent to the host",
                pool, self.files[pool].path, len(new), shown, len(invalid), len(state.records),
            )
        if state.trailing_bytes:
            self._quiet.say(
                ("partial", pool), logging.WARNING,
                "pool %d (%s) ends with %d bytes of a partial record (records are 2560 bytes);"
                " they are ignored and will be overwritten by the next new key",
                pool, self.files[pool].path, state.trailing_bytes,
            )
        else:
            self._quiet.clear(("partial", pool), summary=False)  # repeats were re-reads

    # ------------------------------------------------------------------ reads
    def get(self, pool: int, key: bytes) -> bytes | None:
        """The value the last record with `key` holds; callable from any thread."""
        with self.memory_lock:
            return self.states[pool].get(key)

    def enumerate(self, pool: int, index: int) -> Record | None:
        """The index-th record the host may see, in file order (duplicates included);
        callable from any thread."""
        with self.memory_lock:
            return self.states[pool].visible_record(index)

    # ------------------------------------------------------------------ writes
    async def set(self, pool: int, key: bytes, value: bytes, origin: Origin) -> None:
        """Upsert: modify the last record with this key in place, or append one."""
        _check_writable(pool)
        if not key or len(key) > KEY_MAX_BYTES or b"\0" in key:
            raise ValueError(f"key must be 1..{KEY_MAX_BYTES} bytes without NUL")
        if len(value) > VALUE_MAX_BYTES or b"\0" in value:
            raise ValueError(f"value must be at most {VALUE_MAX_BYTES} bytes without NUL")
        await self._change(pool, origin, writeplan.Upsert(key, value))

    async def delete(self, pool: int, key: bytes, origin: Origin) -> bool:
        """Remove every record with this key; False if there was none."""
        _check_writable(pool)
        return await self._change(pool, origin, writeplan.Delete(key))

    @contextlib.contextmanager
    def lock_waits_within(self, seconds: float) -> Iterator[None]:
        """Changes made inside stop waiting for pool locks after `seconds` (or the lock
        timeout, if sooner): for a caller with a deadline of its own, a host request."""
        token = _request_deadline.set(Deadline.after(max(0.0, min(seconds, self.lock_timeout))))
        try:
            yield
        finally:
            _request_deadline.reset(token)

    def request_lock(self, pool: int) -> RequestLock:
        """A lock for a caller's own queue of changes to `pool`, bounded like the store's."""
        return RequestLock(self, pool)

    def queued_timeout(self, pool: int, deadline: Deadline) -> LockTimeout:
        """The error of a request whose deadline passed while it waited its turn."""
        holders = self._holders[pool] or "unknown (no change has timed out yet)"
        return LockTimeout(
            f"timed out after {deadline.timeout:g}s waiting for the lock on "
            f"{self.files[pool].path}, queued behind other changes of pool {pool} waiting "
            f"for it; last seen: {holders}. Wait for or stop that process, or raise the lock "
            "timeout",
            self.files[pool].path,
            self._holders[pool],
        )

    async def prepare_set(self, pool: int, new_records: int) -> None:
        """Check now that a `set` made soon after can succeed: the pool's locks are free
        within the lock timeout (taken and dropped at once, LockTimeout otherwise) and the
        pool file has room for `new_records` more records (PoolFileError(ENOSPC) otherwise).
        The filesystem calls this when a file is opened or first written, because the close
        that stores the value cannot report an error to a shell."""
        _check_writable(pool)
        pf = self.files[pool]
        deadline = _request_deadline.get() or Deadline.after(self.lock_timeout)
        # As in _change: a lock found stuck gets one try, not a fresh wait per writer.
        wait_until = time.monotonic() if self._holders[pool] else deadline.monotonic_at

        def probe() -> None:
            with pf.locked(deadline=wait_until):
                pf.reserve_room(new_records)

        try:
            await self._workers[pool].run(probe)
        except LockTimeout as exc:
            self._holders[pool] = exc.holders or "holder unknown"
            raise

    async def _change(self, pool: int, origin: Origin, edit: writeplan.Edit) -> bool:
        # Fixed on arrival (or by the caller's RequestLock): queueing counts against it.
        deadline = _request_deadline.get() or Deadline.after(self.lock_timeout)
        if not await _acquire_by(self._locks[pool], deadline):
            raise self.queued_timeout(pool, deadline)
        try:
            before = self.states[pool]
            # A lock found stuck by the change before gets one try, not a fresh wait: with
            # a holder that never lets go, the next open-write-close or host request would
            # otherwise wait again, one timeout per step. Any success ends this.
            stuck = bool(self._holders[pool])
            try:
                reloaded, change, signature = await self._workers[pool].run(
                    self._locked_change, pool, before, edit,
                    time.monotonic() if stuck else deadline.monotonic_at,
                )
            except LockTimeout as exc:
                self._holders[pool] = exc.holders or "holder unknown"
                if stuck:
                    raise LockTimeout(
                        f"the lock on {self.files[pool].path} is still held, as it was for"
                        f" {self.lock_timeout:g}s by the change before; {exc.holders}. Not"
                        " waiting again until it has been released once",
                        self.files[pool].path, exc.holders) from None
                raise  # nothing was changed: memory stays valid
            except BaseException:
                before.signature = None  # the file may be half-changed: reload next time
                raise
            changes = diff(before, reloaded, pool, Origin.OTHER_PROGRAM) if reloaded else []
            # Memory changes only here, on the trio thread, never while a reader iterates,
            # and by the very plan the worker carried out on the file.
            with self.memory_lock:
                state = (reloaded or before).apply(change)
                state.signature = signature
            done = not isinstance(change, writeplan.Unchanged)
            if done:
                state.mtime_ns = time.time_ns()
                kind = ChangeKind.SET if isinstance(edit, writeplan.Upsert) \
                    else ChangeKind.DELETE
                changes.append(Change(kind, pool, edit.key, origin))
            if state is not before:
                self._install(pool, state)
            self._holders[pool] = ""
        finally:
            self._locks[pool].release()
        await self._notify(changes)
        return done or isinstance(edit, writeplan.Upsert)

    def _locked_change(self, pool: int, state: PoolRecords, edit: writeplan.Edit,
                       deadline: float) -> tuple[PoolRecords | None, writeplan.Plan, Signature]:
        """Worker thread: lock, reload if someone else wrote, plan the edit and carry it out.

        Reads `state` but never modifies it (the trio thread owns it); returns the reloaded
        records (or None), the plan that was carried out, and the file's new signature.
        """
        pf = self.files[pool]
        with pf.locked(deadline=deadline):
            reloaded = None
            # locked() reopens a deleted or replaced file: its signature then differs.
            if pf.fstat_signature() != state.signature:
                reloaded = state = pf.read()
            change = writeplan.plan(state.records, edit, state.slots.get(edit.key, []))
            pf.apply(change, state.records)
            return reloaded, change, pf.fstat_signature()

    # ------------------------------------------------------------------ watching
    async def check_external_changes(self) -> None:
        """Reload every pool whose file changed behind our back."""
        signatures = await trio.to_thread.run_sync(
            lambda: [stat_signature(pf.path) for pf in self.files]
        )
        for pool, signature in enumerate(signatures):
            if signature == self.states[pool].signature:
                continue
            async with self._locks[pool]:
                before = self.states[pool]
                try:
                    # A short wait: requests queue behind this one, and it comes back soon.
                    state = await self._workers[pool].run(
                        self._reload, pool, before.signature,
                        min(self.lock_timeout, self.poll_interval))
                except LockTimeout as exc:
                    # Said once the lock has stayed busy for a lock timeout, as a request
                    # would: other programs hold it briefly all the time.
                    busy_since = self._reload_busy_since[pool]
                    if busy_since is None:
                        self._reload_busy_since[pool] = time.monotonic()
                    elif time.monotonic() - busy_since >= self.lock_timeout:
                        self._quiet.say(
                            ("reload", pool), logging.WARNING,
                            "pool %d changed on disk but has stayed locked for %gs or more"
                            " (%s); will retry", pool, self.lock_timeout,
                            exc.holders or "holder unknown")
                    continue
                except PoolFileError as exc:
                    self._quiet.say(("reload", pool), logging.WARNING,
                                    "cannot reload pool %d: %s", pool, exc)
                    continue
                self._reload_busy_since[pool] = None
                self._quiet.clear(("reload", pool), "pool %d can be read again", pool)
                self._holders[pool] = ""  # it was locked: not stuck any more
                if state is None:
                    continue  # it was our own write, finishing while we looked
                if signature is None or state.records != before.records:
                    state.mtime_ns = time.time_ns()
                else:
                    state.mtime_ns = before.mtime_ns
                self._install(pool, state)
                changes = diff(before, state, pool, Origin.OTHER_PROGRAM)
            if changes:
                log.info("pool %d changed on disk: %d key(s) affected", pool, len(changes))
                await self._notify(changes)

    def _reload(self, pool: int, known: Signature | None, timeout: float) -> PoolRecords | None:
        """Worker thread: the pool as on disk now, or None if it is still `known`."""
        pf = self.files[pool]
        with pf.locked(timeout):
            if known is not None and pf.fstat_signature() == known:
                return None
            return pf.read()

    async def watch(self) -> None:
        while True:
            try:
                await self.check_external_changes()
            except OSError as exc:
                log.warning("checking pool files for changes failed: %s", exc)
            await trio.sleep(self.poll_interval)

    async def _notify(self, changes: list[Change]) -> None:
        if not changes:
            return
        for listener in self._listeners:
            await listener(changes)


def _check_writable(pool: int) -> None:
    if pool == Pool.AUTO:
        raise ValueError("pool 2 (auto) is computed, not stored")
    if not 0 <= pool < POOL_COUNT:
        raise ValueError(f"no pool {pool}: pools are 0..{POOL_COUNT - 1}")


def default_pool_dir(simulate: bool) -> Path:
    if not simulate:
        return SYSTEM_POOL_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "kvpfs" / "simulated-pools"
