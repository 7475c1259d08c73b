"""The change feed, `/.events`: one queue of change lines per open file, and
the rules for readers that wait.

The handlers (operations.py) only delegate to `EventFeed`: open, read, poll,
release; the notification service (notifications.py) calls `publish` for each
batch of store changes. What /proc says about readers is in `procview.py`.

Waiting reads and pyfuse3's handler tasks
-----------------------------------------
pyfuse3 replies to a request when its handler returns, so a blocking read
that waits for the next change holds one of pyfuse3's handler tasks for as
long as it waits; pyfuse3.main() runs at most `max_tasks` of them (99 by
default), and once all are taken nothing else on the mount is served. A
handler task is only a trio task (a few KB), so the mount runs with
HANDLER_TASKS tasks, and the feed admits at most WAITING_MAX waiting reads in
all, of which at most WAITING_OTHERS for files opened by users other than
root, and WAITING_PER_USER for any one such user. FREE_HANDLERS tasks (the
number pyfuse3 serves with by default) therefore always remain for every
other request, whatever local users do, and root's readers keep room that
unprivileged users cannot take. A read beyond a limit fails at once with
EMFILE (the errno the kernel gives for inotify's per-user limit), and the
log says why, at most once a minute per user. Readers that wait with
poll()/epoll on an O_NONBLOCK descriptor (`kvpfs wait`, event loops) hold
nothing while they wait and are not limited. The number of open feeds per
non-root user is capped too (STREAMS_PER_USER), which bounds memory.

Interrupts
----------
The kernel sends FUSE_INTERRUPT when a process blocked in a FUSE request gets
a signal, then keeps it waiting (killable, state D) until the filesystem
answers; after a fatal signal it waits uninterruptibly, so even SIGKILL does
not end the process (fs/fuse/dev.c, request_wait_answer). libfuse records the
interrupt, but pyfuse3 (3.2 to 3.5) gives handlers no way to see it. So, while
reads wait, `watch_interrupts` looks every INTERRUPT_CHECK seconds (longer
with many readers, to stay under a tenth of a CPU) at the threads of the
processes that opened the waiting feeds: a thread in state D
inside request_wait_answer with a signal pending that it does not block has
been interrupted, and the waiting reads of that feed end with EINTR. A fatal
signal shows as SIGKILL pending; stop signals (Ctrl-Z) and SIGCONT do not
count, as ending the read would make the reader fail once continued. When
the opener is not the reader (the descriptor was inherited), the opener's
descendants are looked at too, less often (DESCENDANT_CHECK). A reader that
got the descriptor any other way (over a socket, or from an opener that has
exited) is not found: it ends at the next change, as before. wchan is only
readable with ptrace rights over the reader, which root (kvpfs) has.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyfuse3
import trio

from kvpfs.fuse.procview import ProcView
from kvpfs.storage.store import Change
from kvpfs.storage.worker import Worker
from kvpfs.wire import names
from kvpfs.wire.protocol import Pool

log = logging.getLogger(__name__)

EVENT_QUEUE_MAX = 10_000  # lines kept per reader before it is told it fell behind

FREE_HANDLERS = 99  # pyfuse3's default max_tasks: always left for other requests
WAITING_MAX = 1000  # blocking reads waiting at once, all users together
WAITING_OTHERS = 256  # ... of which for feeds opened by users other than root
WAITING_PER_USER = 32  # ... and for any one such user
HANDLER_TASKS = WAITING_MAX + FREE_HANDLERS  # pyfuse3.main(max_tasks=...)
STREAMS_PER_USER = 128  # open feeds per non-root user (each may queue EVENT_QUEUE_MAX lines)
STREAMS_OTHERS = 1024  # open feeds of all non-root users together

INTERRUPT_CHECK = 0.1  # seconds between looks for interrupted readers, while reads wait (at least)
DESCENDANT_CHECK = 1.0  # seconds between looks at the openers' descendants
REFUSAL_LOG_INTERVAL = 60.0


def event_line(change: Change) -> bytes:
    """`set external cloudstack-vm-userdata`: op, pool, name escaped as listed."""
    return b"%s %s %s\n" % (change.kind.value.encode(), Pool(change.pool).dirname.encode(),
                            names.key_to_name(change.key))


@dataclass(eq=False)
class _Wait:
    """One read waiting for a line."""

    done: trio.Event = field(default_factory=trio.Event)
    interrupted: bool = False


@dataclass(eq=False)
class EventStream:
    """One open of /.events: its own queue of change lines."""

    include_external: bool
    nonblocking: bool
    uid: int = 0  # who opened it: waiting reads count against this user
    opener: int = 0  # the opening thread's id (FUSE passes the caller's tid)
    lines: deque[bytes] = field(default_factory=deque)
    poll_handle: pyfuse3.PollHandle | None = None
    closed: bool = False
    waits: set[_Wait] = field(default_factory=set)
    opener_start: str | None = None  # the opener's start time, against pid reuse

    def push(self, line: bytes) -> None:
        if len(self.lines) >= EVENT_QUEUE_MAX:
            # The reader fell behind: say so once instead of growing without bound.
            self.lines.clear()
            self.lines.append(b"overflow - -\n")
        self.lines.append(line)

    def wake(self, *, interrupted: bool = False) -> None:
        for wait in self.waits:
            wait.interrupted = wait.interrupted or interrupted
            wait.done.set()


class EventFeed:
    """Every open /.events of one mount."""

    def __init__(self, notify_poll: Callable[[pyfuse3.PollHandle], None]) -> None:
        # notify_poll(handle) must not call pyfuse3 from inside a handler: it is
        # Notifications.wake_poller, which queues it to its own task.
        self._notify_poll = notify_poll
        self._streams: dict[int, EventStream] = {}
        self._waiting: Counter[int] = Counter()  # uid -> waiting reads
        self._waiting_others = 0
        self._waiting_total = 0
        self._opened: Counter[int] = Counter()  # uid -> open feeds
        self._refused: dict[int, tuple[float, int]] = {}  # uid -> (last log, refused since)
        self._reads_waiting = trio.Event()
        self.closing = False

    # ------------------------------------------------------------ requests
    def owns(self, fh: int) -> bool:
        return fh in self._streams

    def open(self, fh: int, flags: int, ctx: pyfuse3.RequestContext, *,
             include_external: bool) -> pyfuse3.FileInfo:
        if (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        uid = ctx.uid
        if uid != 0:
            others = sum(n for user, n in self._opened.items() if user != 0)
            if self._opened[uid] >= STREAMS_PER_USER or others >= STREAMS_OTHERS:
                self._log_refusal(uid, f"open of /.events refused (EMFILE): uid {uid} has"
                                  f" {self._opened[uid]} open (limit {STREAMS_PER_USER} per"
                                  f" user, {STREAMS_OTHERS} for all users but root)")
                raise pyfuse3.FUSEError(errno.EMFILE)
        self._opened[uid] += 1
        self._streams[fh] = EventStream(include_external, bool(flags & os.O_NONBLOCK),
                                        uid=uid, opener=ctx.pid)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    async def read(self, fh: int, size: int) -> bytes:
        """Whole lines, as many as fit; blocks (unless O_NONBLOCK) until there is one."""
        stream = self._streams[fh]
        while not stream.lines:
            if stream.closed or self.closing:
                return b""
            if stream.nonblocking:
                raise pyfuse3.FUSEError(errno.EAGAIN)
            await self._wait(stream)
        out = bytearray()
        while stream.lines and len(out) + len(stream.lines[0]) <= size:
            out += stream.lines.popleft()
        if not out:  # a reader with a tiny buffer still gets the front of a line
            line = stream.lines.popleft()
            out += line[:size]
            stream.lines.appendleft(line[size:])
        return bytes(out)

    def poll(self, fh: int, poll_handle: pyfuse3.PollHandle | None) -> int:
        stream = self._streams[fh]
        # Keep the newest handle even when answering "ready": an edge-triggered
        # epoll waiter that drains the queue must still hear of the next line.
        if poll_handle is not None:
            stream.poll_handle = poll_handle
        if stream.lines or self.closing:
            return select.POLLIN | select.POLLRDNORM
        return 0

    def release(self, fh: int) -> bool:
        """Forget a feed; False if `fh` is not one."""
        stream = self._streams.pop(fh, None)
        if stream is None:
            return False
        stream.closed = True
        stream.poll_handle = None
        self._opened[stream.uid] -= 1
        if self._opened[stream.uid] <= 0:
            del self._opened[stream.uid]
        stream.wake()
        return True

    # ------------------------------------------------------------ changes
    async def on_store_change(self, changes: list[Change]) -> None:
        """Store listener: every change becomes a line for every open feed."""
        self.publish(changes)

    def publish(self, changes: Iterable[Change]) -> None:
        if not self._streams:
            return
        lines = [(change.pool, event_line(change)) for change in changes]
        for stream in self._streams.values():
            added = False
            for pool, line in lines:
                if pool != 0 or stream.include_external:
                    stream.push(line)
                    added = True
            if added:
                stream.wake()
                if stream.poll_handle is not None:
                    self._notify_poll(stream.poll_handle)

    def has_readers(self) -> bool:
        return bool(self._streams)

    def shutdown(self) -> None:
        """End every waiting read so that pyfuse3's main loop can return."""
        self.closing = True
        for stream in self._streams.values():
            stream.wake()

    # ------------------------------------------------------------ waiting
    async def _wait(self, stream: EventStream) -> None:
        self._admit(stream.uid)
        wait = _Wait()
        stream.waits.add(wait)
        self._count(stream.uid, +1)
        self._reads_waiting.set()
        try:
            await wait.done.wait()
        finally:
            stream.waits.discard(wait)
            self._count(stream.uid, -1)
        if wait.interrupted:
            raise pyfuse3.FUSEError(errno.EINTR)

    def _count(self, uid: int, delta: int) -> None:
        self._waiting[uid] += delta
        if self._waiting[uid] <= 0:
            del self._waiting[uid]
        self._waiting_total += delta
        if uid != 0:
            self._waiting_others += delta

    def _admit(self, uid: int) -> None:
        if self._waiting_total >= WAITING_MAX:
            why = f"{self._waiting_total} reads already wait (limit {WAITING_MAX})"
        elif uid != 0 and self._waiting_others >= WAITING_OTHERS:
            why = (f"users other than root have {self._waiting_others} reads waiting"
                   f" (limit {WAITING_OTHERS})")
        elif uid != 0 and self._waiting[uid] >= WAITING_PER_USER:
            why = f"uid {uid} has {self._waiting[uid]} reads waiting (limit {WAITING_PER_USER})"
        else:
            return
        self._log_refusal(uid, f"blocking read of /.events refused (EMFILE): {why}; use"
                          " fewer readers, or poll() on an O_NONBLOCK descriptor")
        raise pyfuse3.FUSEError(errno.EMFILE)

    def _log_refusal(self, uid: int, message: str) -> None:
        now = time.monotonic()
        last, count = self._refused.get(uid, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last >= REFUSAL_LOG_INTERVAL:
            more = f" ({count} more refused since the last report)" if count else ""
            log.warning("%s%s", message, more)
            self._refused[uid] = (now, 0)
        else:
            self._refused[uid] = (last, count + 1)

    # ------------------------------------------------------------ interrupts
    async def watch_interrupts(self) -> None:
        """End waiting reads whose reader got a signal (see the module docstring)."""
        worker = Worker("kvpfs feed interrupts")
        procs = ProcView()
        next_descendants = 0.0
        try:
            while True:
                waiting = [s for s in self._streams.values() if s.waits]
                if not waiting:
                    self._reads_waiting = trio.Event()
                    await self._reads_waiting.wait()
                    continue
                now = time.monotonic()
                descendants = now >= next_descendants
                if descendants:
                    next_descendants = now + DESCENDANT_CHECK
                openers = {(s.opener, s.opener_start) for s in waiting}
                started = time.monotonic()
                starts, hits = await worker.run(procs.interrupted, openers, descendants)
                took = time.monotonic() - started
                for stream in waiting:
                    if stream.opener_start is None:
                        stream.opener_start = starts.get(stream.opener)
                    if (stream.opener, stream.opener_start) in hits:
                        stream.wake(interrupted=True)
                # Many waiting readers make a look longer: keep it under a tenth of a CPU.
                await trio.sleep(max(INTERRUPT_CHECK, 9 * took))
        finally:
            worker.close()
