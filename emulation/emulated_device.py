"""A stand-in for the kernel's ``/dev/vmbus/hv_kvp``, served by pyfuse3 as a one-file FUSE mount.

Run as its own process::

    python -m emulation.emulated_device MOUNTDIR CONTROL_SOCKET [--timeout 30] [--debug]

``MOUNTDIR/hv_kvp`` then behaves like the Linux char device (``drivers/hv/hv_utils_transport.c``
plus the KVP state machine of ``drivers/hv/hv_kvp.c``), and a scripted host drives it through
``CONTROL_SOCKET`` (wire format in :mod:`emulation.emuwire`, client in
:mod:`emulation.kvphost`).  Why FUSE rather than a socket pair: a daemon under test -- ours or
the real Debian ``hv_kvp_daemon`` -- opens a *path* and uses plain open/read/write/poll/close,
so only a file system can reproduce EBUSY on a second open, EINVAL on a short read,
poll readiness and "close resets the device" without patching the daemon.

Modelled faithfully (on hv_utils_transport.c and hv_kvp.c; docs/design.md, "The kernel model"):

* one opener (EBUSY otherwise); release -> transport INIT, queued message dropped, a pending
  transaction answered E_FAIL, KVP state DEVICE_INIT (the next opener must handshake);
* the first write after open must be a >= 7432-byte op 100 or op 4 message (else EINVAL); the
  register reply (op echo + "3.1") is queued and reading it completes the handshake; a second
  register write before that read fails with EFAULT (the transport's "previous message
  wasn't received");
* read blocks until a message is queued (O_NONBLOCK ignored), EINVAL for size < 7432 with the
  message kept; poll gives POLLIN|POLLRDNORM only while a message is queued, POLLERR|POLLHUP
  after an "unload";
* each write >= 7432 bytes is one reply; EINVAL when no request is outstanding; the reply is
  not matched against the request (a late reply can complete the next transaction, exactly
  as in the kernel);
* one transaction at a time, FIFO host queue that waits while no daemon is registered,
  per-request timeout (HV_UTIL_TIMEOUT, 30 s by default) answering E_FAIL while the request
  stays queued for the daemon, and immediate E_FAIL when the previous request is still unread.

Differences forced by FUSE (documented so nobody relies on them): a 0-byte read returns 0 at
once (the kernel never calls us); a read blocked here can only be cut short by the opener's
death (checked every 0.2 s) or by an unload, not by a catchable signal, because pyfuse3 does
not handle FUSE interrupts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import select
import signal
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from emulation import emuwire
from kvpfs.wire.kernelmodel import KERNEL_TIMEOUT, HostRequest, KvpKernel, Mode, Source
from kvpfs.wire.protocol import MESSAGE_SIZE, Status

log = logging.getLogger("kvpemu")

DEVICE_NAME = b"hv_kvp"
DEVICE_INODE = pyfuse3.ROOT_INODE + 1
DEFAULT_TIMEOUT = KERNEL_TIMEOUT
CONTROL_XATTR = b"user.kvpemu.control"
# How often a blocked read checks whether its opener is dying (see _process_dying).
_READER_CHECK_INTERVAL = 0.2
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(eq=False)
class OpenFile:
    """Per-fh state; ``generation`` ties the fh to one device "instance" (module load)."""

    generation: int
    tgid: int | None


@dataclass
class Faults:
    """Injected failures, consumed one per read/write handler call."""

    reads: deque[int] = field(default_factory=deque)
    writes: deque[int] = field(default_factory=deque)


def _tgid_of(tid: int) -> int | None:
    """FUSE gives us the caller's thread id; the process is what dies, so find its tgid."""
    try:
        with open(f"/proc/{tid}/status") as fh:
            for line in fh:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _process_dying(tgid: int) -> bool:
    """True once ``tgid`` is gone, a zombie, or has SIGKILL pending (a fatal signal).

    The kernel's read sleeps interruptibly, so a dying daemon leaves it at once.  A FUSE
    request cannot be interrupted through pyfuse3, so without this check a daemon killed while
    blocked in read() would stay in D state until the host sent something.
    """
    try:
        with open(f"/proc/{tgid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return True
        for tid in os.listdir(f"/proc/{tgid}/task"):
            with open(f"/proc/{tgid}/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith(("SigPnd:", "ShdPnd:")) and (
                        int(line.split()[1], 16) & _SIGKILL_BIT
                    ):
                        return True
    except (OSError, IndexError, ValueError):
        return True
    return False


class KvpDevice:
    """The kernel side: `kvpfs.wire.kernelmodel.KvpKernel` behind FUSE file handles.

    Every kernel rule is the model's; this class adds what FUSE needs: file handles
    tied to one module load (`generation`), a read that waits on trio, poll
    handles to notify, injected faults, and the device name appearing and
    vanishing. All methods run on the one trio thread, and the synchronous ones
    never await, so each is atomic like the kernel code under ``hvt->lock``.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, *, register_errors: bool = True
                 ) -> None:
        self.register_errors = register_errors
        self._timeout = timeout
        self._timer_scope: trio.CancelScope | None = None
        self._changed = trio.Event()
        self.faults = Faults()
        self.files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._poll_handles: list[pyfuse3.PollHandle] = []
        self.present = True  # is the name hv_kvp visible
        self._unlink_on_release = False
        self._earlier: dict[str, int] = {}
        self.hold_until_open = False  # host requests wait to arrive at the next open
        self.held: list[HostRequest] = []
        self.generation = 0
        self.opener: int | None = None
        self.kernel = self._new_instance()

    # ------------------------------------------------------------------ instance state

    def _new_instance(self) -> KvpKernel:
        """A freshly loaded module: transport INIT, state DEVICE_INIT, nothing queued."""
        self.generation += 1
        self.opener = None
        self.kernel = KvpKernel(trio.current_time, timeout=self._timeout,
                                register_errors=self.register_errors,
                                on_change=self._bump)
        return self.kernel

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        """For transactions started from now on (HV_UTIL_TIMEOUT is a constant)."""
        self._timeout = seconds
        self.kernel.timeout = seconds

    def _bump(self) -> None:
        """Wake everybody waiting for a state change (readers, the timer, waiters)."""
        self._changed.set()
        self._changed = trio.Event()
        if self.kernel.outmsg is not None or self.kernel.mode == Mode.DESTROY:
            self._notify_pollers()
        scope = self._timer_scope
        deadline = self.kernel.timer_deadline
        if scope is not None and deadline is not None:
            scope.deadline = min(scope.deadline, deadline)

    async def wait_changed(self, timeout: float | None = None) -> None:
        """Sleep until the next state change (or ``timeout``)."""
        event = self._changed
        if timeout is None:
            await event.wait()
        else:
            with trio.move_on_after(timeout):
                await event.wait()

    def _notify_pollers(self) -> None:
        handles, self._poll_handles = self._poll_handles, []
        for handle in handles:
            try:
                handle.notify()
            except Exception as exc:  # a stale handle must not take the emulator down
                log.debug("poll notify failed: %s", exc)

    def _current(self, fh: int) -> OpenFile:
        """The fh, if it belongs to this module load (EBADF otherwise)."""
        f = self.files.get(fh)
        if f is None or f.generation != self.generation:
            raise pyfuse3.FUSEError(errno.EBADF)
        return f

    @property
    def registered(self) -> bool:
        return self.opener is not None and self.kernel.registered

    @staticmethod
    def _call(operation: Callable[[], T]) -> T:
        try:
            return operation()
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    # ------------------------------------------------------------------ transport: fops

    def open(self, tid: int) -> int:
        """``hvt_op_open``: INIT -> CHARDEV, otherwise EBUSY (or EBADF once unloaded)."""
        self._call(self.kernel.open)
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = OpenFile(self.generation, _tgid_of(tid))
        self.opener = fh
        log.info("open fh=%d by tid %d", fh, tid)
        if self.held:
            # Host requests "arrive" right after the open, before the opener can write
            # REGISTER1: the registration race after a hibernation.
            held, self.held = self.held, []
            self.hold_until_open = False
            for request in held:
                self.kernel.submit(request)
        return fh

    async def read(self, fh: int, size: int) -> bytes:
        """``hvt_op_read``: block for a message, EINVAL if ``size`` is too small."""
        f = self._current(fh)
        if self.faults.reads:
            err = self.faults.reads.popleft()
            log.info("injected read failure: %s", errno.errorcode.get(err, err))
            raise pyfuse3.FUSEError(err)
        # wait_event_interruptible(outmsg_len > 0 || mode != CHARDEV)
        kernel = self.kernel
        while kernel is self.kernel and kernel.read_blocks:
            await self.wait_changed(_READER_CHECK_INTERVAL if f.tgid else None)
            if f.tgid and kernel.read_blocks and _process_dying(f.tgid):
                raise pyfuse3.FUSEError(errno.EINTR)
        self._current(fh)
        message = self._call(lambda: kernel.read(size))
        log.debug("daemon read op %d pool %d", message[0], message[1])
        return message

    def write(self, fh: int, buf: bytes) -> int:
        """``hvt_op_write`` -> ``kvp_on_msg``."""
        self._current(fh)
        if self.faults.writes:
            err = self.faults.writes.popleft()
            log.info("injected write failure: %s", errno.errorcode.get(err, err))
            raise pyfuse3.FUSEError(err)
        log.debug("daemon wrote %d bytes, header %s", len(buf), bytes(buf[:4]).hex())
        return self._call(lambda: self.kernel.write(bytes(buf)))

    def poll(self, fh: int, handle: pyfuse3.PollHandle | None) -> int:
        """``hvt_op_poll``: readable only while a message is queued; never writable."""
        f = self.files.get(fh)
        if f is None or f.generation != self.generation:
            return select.POLLERR | select.POLLHUP
        bits = self.kernel.poll()
        if not bits and handle is not None:
            self._poll_handles.append(handle)
        return bits

    def release(self, fh: int) -> None:
        """``hvt_op_release`` + ``kvp_on_reset`` for the opener; dead fhs are just dropped."""
        f = self.files.pop(fh, None)
        if f is None or f.generation != self.generation or self.opener != fh:
            return  # an fh of an earlier, unloaded instance
        self.opener = None
        destroyed = self.kernel.mode == Mode.DESTROY
        self.kernel.release()
        self._poll_handles.clear()
        if destroyed and self._unlink_on_release:
            # Unloaded module: the misc device goes away with the last close.
            self.present = False
            self._unlink_on_release = False
        log.info("release fh=%d: device reset to INIT", fh)
        self._bump()

    # ------------------------------------------------------------------ the timer

    async def timer_loop(self) -> None:
        """``kvp_timeout_work``: one task whose deadline each transaction moves."""
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                deadline = self.kernel.timer_deadline
                if deadline is not None:
                    scope.deadline = deadline
                await trio.sleep_forever()
            self._timer_scope = None
            self.kernel.run_timer()

    # ------------------------------------------------------------------ host side

    def submit(self, request: HostRequest) -> None:
        """A host request lands in the ring (or waits for the next open, if so told)."""
        if self.hold_until_open:
            self.held.append(request)
            self._bump()
            return
        self.kernel.submit(request)

    def abandon(self, request: HostRequest) -> None:
        """The host went away: a queued request is withdrawn, an in-flight one runs on."""
        if request in self.held:
            self.held.remove(request)
        self.kernel.withdraw(request)

    # ------------------------------------------------------------------ faults & control

    def unload(self) -> None:
        """Module unload (``hv_kvp_deinit``): readers get EBADF, pollers ERR|HUP.

        The name stays until the opener closes (the misc device is deregistered after the
        last release), then disappears. An in-flight host request is answered E_FAIL (the
        real host would see the channel close instead).
        """
        self.kernel.destroy()
        if self.opener is None:
            self.present = False
        else:
            self._unlink_on_release = True
        self._bump()

    def hibernate(self) -> None:
        """``hv_kvp_pre_suspend`` then resume: work cancelled, state forced READY.

        No transport reset: an open fd stays usable and a queued message stays queued.
        With no daemon connected, the next REGISTER1 gets EINVAL (state READY is not
        < READY) until the device is closed, which resets the state.
        """
        self.kernel.hibernate()

    def vanish(self, mode: str) -> None:
        """Make ``hv_kvp`` disappear: ``unload`` (module gone) or ``unlink`` (name only)."""
        if mode == "unload":
            self.unload()
        elif mode == "unlink":
            self.present = False
            self._bump()
        else:
            raise ValueError(f"unknown vanish mode {mode!r}")

    def reappear(self) -> None:
        """Undo :meth:`vanish`; after an unload this is a fresh module (new instance)."""
        if self.kernel.mode == Mode.DESTROY:
            for name, value in self.kernel.counters.items():
                self._earlier[name] = self._earlier.get(name, 0) + value
            self._new_instance()
        self._unlink_on_release = False
        self.present = True
        self._bump()

    def snapshot(self) -> dict[str, Any]:
        """Everything a test may want to assert on, JSON-ready."""
        opener = self.files.get(self.opener) if self.opener is not None else None
        counters = {name: self._earlier.get(name, 0) + value
                    for name, value in self.kernel.counters.items()}
        return {
            **self.kernel.snapshot(),
            **counters,
            "registered": self.registered,
            "opened": self.opener is not None,
            "held": len(self.held),
            "present": self.present,
            "generation": self.generation,
            "opener_pid": opener.tgid if opener else None,
            "pending_read_faults": len(self.faults.reads),
            "pending_write_faults": len(self.faults.writes),
        }

    def shutdown(self) -> None:
        """Emulator exit: unload so blocked readers return (EBADF) before we unmount."""
        held, self.held = self.held, []
        for request in held:
            request.answer(Status.E_FAIL, Source.DESTROYED, None)
        self.unload()


def _guard(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Let only FUSEError out of a handler: anything else would kill pyfuse3.main()."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("handler %s failed", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class EmulatorFS(pyfuse3.Operations):
    """FUSE view: a root directory holding the single file ``hv_kvp``."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, device: KvpDevice, control_path: str) -> None:
        super().__init__()
        self.device = device
        self.control_path = control_path
        self._mtime_ns = time.time_ns()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        # Zero timeouts: every open goes through lookup, so vanish/reappear is seen at once.
        attrs.entry_timeout = 0
        attrs.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        else:
            attrs.st_mode = stat.S_IFREG | 0o600
            attrs.st_nlink = 1
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._mtime_ns
        return attrs

    def _check_device(self, inode: int) -> None:
        if inode != DEVICE_INODE or not self.device.present:
            raise pyfuse3.FUSEError(errno.ENOENT)

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if name != DEVICE_NAME or not self.device.present:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(DEVICE_INODE)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            self._check_device(inode)
        return self._attrs(inode)

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # A char device ignores truncate/chmod/utimes; accepting them keeps shells happy.
        return await self.getattr(inode, ctx)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0 and self.device.present:
            pyfuse3.readdir_reply(token, DEVICE_NAME, self._attrs(DEVICE_INODE), 1)

    @_guard
    async def releasedir(self, fh: int) -> None:
        return None

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._check_device(inode)
        fh = self.device.open(ctx.pid)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.device.read(fh, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.device.write(fh, buf)

    @_guard
    async def poll(
        self,
        inode: int,
        fh: int,
        poll_handle: pyfuse3.PollHandle | None,
        ctx: pyfuse3.RequestContext,
    ) -> int:
        return self.device.poll(fh, poll_handle)

    @_guard
    async def release(self, fh: int) -> None:
        self.device.release(fh)

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # Lets helpers find the control socket from the device path alone.
        if name == CONTROL_XATTR:
            return os.fsencode(self.control_path)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [CONTROL_XATTR]

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        data.f_files = 2
        return data


# ---------------------------------------------------------------------- control socket


class _FrameReader:
    """Buffered frame reader that can also watch for EOF while a request is pending."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def fill(self) -> bool:
        """Receive more bytes; False on EOF."""
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    async def read_frame(self) -> bytes | None:
        while len(self.buffer) < 4:
            if not await self.fill():
                return None
        length = emuwire.split_length(bytes(self.buffer[:4]))
        while len(self.buffer) < 4 + length:
            if not await self.fill():
                return None
        payload = bytes(self.buffer[4 : 4 + length])
        del self.buffer[: 4 + length]
        return payload


@dataclass
class _HostConnection:
    waiting: HostRequest | None = None  # the request being answered
    gone: bool = False  # the host closed its side


class ControlServer:
    """Serves the scripted host: requests into the ring, commands onto the device."""

    def __init__(self, device: KvpDevice) -> None:
        self.device = device

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """One host connection: frames are answered in order, one at a time.

        A reader task runs for the whole connection, so a host that goes away
        while its request waits is noticed without a watcher task per request:
        that request is withdrawn, and requests it sent after it are dropped.
        A host that only closes its sending side still gets its answers.
        """
        reader = _FrameReader(stream)
        frames_in, frames = trio.open_memory_channel[bytes](math.inf)
        host = _HostConnection()
        try:
            async with trio.open_nursery() as nursery:

                async def read_frames() -> None:
                    try:
                        while (payload := await reader.read_frame()) is not None:
                            frames_in.send_nowait(payload)
                    except (trio.BrokenResourceError, trio.ClosedResourceError,
                            ValueError) as exc:
                        log.debug("control connection closed: %s", exc)
                    host.gone = True
                    frames_in.close()  # what was asked before is still answered
                    if host.waiting is not None:
                        self.device.abandon(host.waiting)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(read_frames)
                async for payload in frames:
                    if payload[:1] == emuwire.KIND_JSON:
                        reply = emuwire.json_frame(await self._command(payload[1:]))
                    elif host.gone and payload[:1] == emuwire.KIND_REQUEST:
                        continue  # never submitted: the host went away first
                    else:
                        reply = emuwire.frame(await self._answer(payload, host))
                    try:
                        await stream.send_all(reply)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        log.debug("control connection closed: %s", exc)
                        nursery.cancel_scope.cancel()
                        break
        finally:
            await stream.aclose()

    async def _answer(self, payload: bytes, host: _HostConnection) -> bytes:
        kind, message = payload[:1], payload[1:]
        if kind != emuwire.KIND_REQUEST:
            return emuwire.KIND_ERROR + b"unknown kind"
        if len(message) != MESSAGE_SIZE:
            text = f"request is {len(message)} bytes, expected {MESSAGE_SIZE}"
            return emuwire.KIND_ERROR + text.encode()
        done = trio.Event()
        request = HostRequest(message, done.set)
        host.waiting = request
        self.device.submit(request)
        await done.wait()
        host.waiting = None
        assert request.status is not None  # answered: that is what set `done`
        return emuwire.encode_answer(request.status, request.source, request.reply)

    async def _command(self, body: bytes) -> dict[str, Any]:
        try:
            command = json.loads(body)
            return await self._dispatch(command)
        except Exception as exc:  # a bad command must not kill the emulator
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    async def _dispatch(self, command: dict[str, Any]) -> dict[str, Any]:
        device = self.device
        name = command.get("cmd")
        if name == "ping":
            return {"ok": True, "pid": os.getpid()}
        if name == "state":
            return {"ok": True, "state": device.snapshot()}
        if name in ("fail_next_read", "fail_next_write"):
            err = int(command.get("errno", errno.EIO))
            count = int(command.get("count", 1))
            queue = device.faults.reads if name == "fail_next_read" else device.faults.writes
            queue.extend([err] * count)
            return {"ok": True}
        if name == "clear_faults":
            device.faults.reads.clear()
            device.faults.writes.clear()
            return {"ok": True}
        if name == "vanish":
            device.vanish(str(command.get("mode", "unload")))
            return {"ok": True, "state": device.snapshot()}
        if name in ("return", "reappear"):
            device.reappear()
            return {"ok": True, "state": device.snapshot()}
        if name == "hibernate":
            device.hibernate()
            return {"ok": True, "state": device.snapshot()}
        if name == "hold_until_open":
            device.hold_until_open = True
            return {"ok": True}
        if name == "set_timeout":
            device.timeout = float(command["seconds"])
            return {"ok": True}
        if name == "wait":
            return await self._wait(command)
        return {"ok": False, "error": f"unknown command {name!r}"}

    async def _wait(self, command: dict[str, Any]) -> dict[str, Any]:
        """Block until every given condition holds: {"registered": bool, "opened": bool,
        "min_handshakes": n, "min_opens": n, "min_completed": n, "idle": bool}."""

        def satisfied() -> bool:
            snap = self.device.snapshot()
            for key in ("registered", "opened", "message_queued", "present"):
                if key in command and snap[key] != bool(command[key]):
                    return False
            for key, counter in (
                ("min_handshakes", "handshakes"),
                ("min_opens", "opens"),
                ("min_completed", "completed"),
                ("min_resets", "resets"),
                ("min_register_writes", "register_writes"),
                ("min_held", "held"),
            ):
                if key in command and snap[counter] < int(command[key]):
                    return False
            return not (command.get("idle") and (snap["transaction"] or snap["ring"]))

        with trio.move_on_after(float(command.get("timeout", 10.0))):
            while not satisfied():
                await self.device.wait_changed()
            return {"ok": True, "state": self.device.snapshot()}
        return {"ok": False, "error": "timeout", "state": self.device.snapshot()}


async def _open_control_listener(path: str) -> trio.SocketListener:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    return trio.SocketListener(sock)


async def _amain(device: KvpDevice, control_path: str) -> None:
    server = ControlServer(device)
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: shutting down", signum)
                    device.shutdown()
                    pyfuse3.terminate()
                    return

        listener = await _open_control_listener(control_path)
        nursery.start_soon(on_signals)
        nursery.start_soon(device.timer_loop)
        nursery.start_soon(trio.serve_listeners, server.serve_connection, [listener])
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Mount, serve until SIGTERM/SIGINT or an external unmount, then unmount."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountdir")
    parser.add_argument("control_socket")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="per-request timeout in seconds (HV_UTIL_TIMEOUT, default 30)",
    )
    parser.add_argument("--debug", action="store_true", help="log every device event")
    parser.add_argument("--fuse-debug", action="store_true", help="libfuse request tracing")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s.%(msecs)03d kvpemu[%(process)d] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    control_path = os.path.abspath(args.control_socket)
    device = KvpDevice(timeout=args.timeout)
    fs = EmulatorFS(device, control_path)
    options = set(pyfuse3.default_options)
    options |= {"fsname=hv_kvp_emu", "subtype=kvpemu"}
    if args.fuse_debug:
        options.add("debug")
    pyfuse3.init(fs, args.mountdir, options)
    log.info("mounted on %s, control socket %s", args.mountdir, control_path)
    try:
        trio.run(_amain, device, control_path)
    except BaseException:
        log.exception("emulator crashed")
        pyfuse3.close(unmount=True)  # a test helper: better gone than a dead ENOTCONN mount
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(control_path)
    pyfuse3.close(unmount=True)
    log.info("unmounted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
