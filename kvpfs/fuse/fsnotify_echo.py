"""inotify events for host changes: which echoes are due, and the helper that makes them.

The kernel raises inotify events only for operations that pass through the
VFS. A host SET or DELETE, or another program's write to a pool file, changes
kvpfs's memory, not the kernel's view: FUSE's cache notifications raise no
IN_CREATE and no IN_MODIFY, and an entry notification raises IN_DELETE_SELF
on a watched file but no IN_DELETE in the directory (observed on 6.18). So
kvpfs replays each such change through its own mount from a helper process
(`echo_helper.py`): the kernel then emits exactly the events a program
changing a normal file would cause, to every watcher, whether or not anybody
looked the key up before.

`EchoQueue` holds one entry per key with a change not yet shown to watchers
(coalescing: ten host SETs of one key before the echo runs give one), and
what watchers were last shown (`announced`), so that each echo is decided
from the key's state when it runs: a key watchers have not seen is created,
a known one modified, a deleted one unlinked (first, when it came back).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from kvpfs.fuse.echo_helper import ANSWER, REQUEST, EchoKind
from kvpfs.fuse.nodes import Node

log = logging.getLogger(__name__)

ECHO_QUEUE_MAX = 100_000  # keys with an echo due; beyond, changes are not echoed (logged)
ECHO_TIMEOUT = 5.0  # an echo is answered by kvpfs itself: longer means something is wrong
HELPER_START_TIMEOUT = 10.0
HELPER_EXIT_TIMEOUT = 2.0  # to finish the echo it may be in, once told to stop
HELPER_FAILURES_MAX = 3  # consecutive start failures before echoes are given up


@dataclass(eq=False)
class EchoOp:
    """One echo in progress; the handlers answer the helper from it."""

    kind: EchoKind
    pool: int
    key: bytes
    name: bytes
    node: Node | None = None  # DELETE: the deleted key's node, for the helper's lookup
    touched: set[int] = field(default_factory=set)  # inodes given echo-only attributes


class EchoQueue:
    """Keys whose change watchers have not been shown yet, one entry per key."""

    def __init__(self, keys_by_pool: dict[int, Iterable[bytes]]) -> None:
        self.announced: dict[int, set[bytes]] = {
            pool: set(keys) for pool, keys in keys_by_pool.items()}
        self._pending: dict[tuple[int, bytes], Node | None] = {}  # -> the deleted key's node
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def seen_by_kernel(self, pool: int, key: bytes, exists: bool) -> None:
        """A change made through the mount: the kernel raised its events itself, and its
        entry for the name is now current, so an echo still due for the key is moot
        (it would undo the kernel's entry and redo it)."""
        self._pending.pop((pool, key), None)
        keys = self.announced.setdefault(pool, set())
        if exists:
            keys.add(key)
        else:
            keys.discard(key)

    def note(self, pool: int, key: bytes, deleted: Node | None) -> bool | None:
        """Record a change; True if the key is newly due, False if merged, None if the
        queue is full (the change is not echoed)."""
        entry = (pool, key)
        if entry in self._pending:
            if deleted is not None and self._pending[entry] is None:
                self._pending[entry] = deleted
            return False
        if len(self._pending) >= ECHO_QUEUE_MAX:
            if not self.dropped:
                log.warning("more than %d keys changed faster than inotify watchers could be"
                            " told; later changes raise no inotify events", ECHO_QUEUE_MAX)
            self.dropped += 1
            return None
        self._pending[entry] = deleted
        return True

    def next_ops(self, exists: Callable[[int, bytes], bool],
                 name_of: Callable[[bytes], bytes]) -> list[EchoOp]:
        """The echoes for the oldest due key, decided from its state now."""
        if not self._pending:
            return []
        (pool, key), deleted = next(iter(self._pending.items()))
        del self._pending[(pool, key)]
        keys = self.announced.setdefault(pool, set())
        shown = key in keys
        name = name_of(key)
        ops = []
        known = deleted is not None and deleted.lookups > 0
        if deleted is not None and (shown or known):
            ops.append(EchoOp(EchoKind.DELETE, pool, key, name, deleted))
            shown = False
        now = exists(pool, key)
        if now:
            ops.append(EchoOp(EchoKind.MODIFY if shown else EchoKind.CREATE, pool, key, name))
            keys.add(key)
        else:
            keys.discard(key)
        return ops


class EchoHelper:
    """The helper process (`kvpfs.fuse.echo_helper`) and its pipes, started on first use."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.pid: int | None = None
        self._process: trio.Process | None = None
        self._failures = 0
        self.disabled = False

    async def _start(self) -> bool:
        if self.disabled:
            return False
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "kvpfs.fuse.echo_helper", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            self._failed(f"cannot start it: {exc}")
            return False
        self._process, self.pid = process, process.pid
        where = os.fsencode(self.mountpoint)
        assert process.stdin is not None  # opened with stdin=PIPE
        with trio.move_on_after(HELPER_START_TIMEOUT):
            try:
                await process.stdin.send_all(REQUEST.pack(0, len(where)) + where)
                answer = await self._answer()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                answer = None
            if answer == 0:
                self._failures = 0
                return True
            self._failed(f"it could not find the mount: {os.strerror(-answer or errno.EIO)}"
                         if answer is not None else "it exited")
            self.close()
            return False
        self._failed("it did not start in time")
        self.close()
        return False

    def _failed(self, why: str) -> None:
        self._failures += 1
        if self._failures >= HELPER_FAILURES_MAX:
            self.disabled = True
            log.warning("inotify echo helper: %s; host changes will raise no inotify events",
                        why)
        else:
            log.info("inotify echo helper: %s; will retry", why)

    async def _answer(self) -> int | None:
        assert self._process is not None and self._process.stdout is not None
        data = b""
        while len(data) < ANSWER.size:
            chunk = await self._process.stdout.receive_some(ANSWER.size - len(data))
            if not chunk:
                return None
            data += chunk
        answer: int = ANSWER.unpack(data)[0]
        return answer

    async def run(self, op: EchoOp, pool_dir: bytes) -> int:
        """Perform one echo; 0 or the errno the helper met."""
        if self._process is None and not await self._start():
            return errno.ENOTCONN
        assert self._process is not None and self._process.stdin is not None
        target = pool_dir + b"/" + op.name
        answer = None
        with trio.move_on_after(ECHO_TIMEOUT):
            try:
                await self._process.stdin.send_all(REQUEST.pack(op.kind, len(target)) + target)
                answer = await self._answer()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                answer = None
        if answer is None:
            log.info("inotify echo helper did not answer (%s of %r); restarting it",
                     op.kind.name.lower(), op.name)
            self.close()
            return errno.EIO
        return answer

    def owns(self, pid: int) -> bool:
        """A request from the helper (and not from a process that reused its pid)."""
        return pid == self.pid and self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """Kill the helper: only for one that does not answer or did not start."""
        process, self._process, self.pid = self._process, None, None
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()

    async def aclose(self) -> None:
        """End the helper gently: EOF on its stdin, and it exits after the echo it may be in.

        Killed in the middle of an echo, it would withdraw a FUSE request the kernel may
        already have announced: pyfuse3's worker, woken for it, then blocks in read() on
        /dev/fuse, and with it the whole trio loop, until some other request arrives. At
        shutdown none does. So the echo is let to finish, pyfuse3 still answering.
        """
        process, self._process, self.pid = self._process, None, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                with contextlib.suppress(OSError, trio.ClosedResourceError,
                                         trio.BrokenResourceError):
                    await process.stdin.aclose()
            with trio.move_on_after(HELPER_EXIT_TIMEOUT):
                await process.wait()
                return
            log.warning("inotify echo helper did not exit within %g s; killing it",
                        HELPER_EXIT_TIMEOUT)
            with contextlib.suppress(OSError):
                process.kill()
