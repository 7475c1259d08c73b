"""Serving the host: register on the device, then answer one request at a time.

Flow of one host request: `device.Channel` reads 7432 bytes, `protocol`
decodes them into a typed request, the server asks the `Store` (or
`Intrinsics` for pool 2), and the encoded reply goes back the same way.

Requests are read in a dedicated device thread, which answers GET and
ENUMERATE itself from the store's memory: the host's most frequent requests,
a full enumeration being one per record, then cost poll, read and write, as in
any C daemon, and no trip through the trio loop. Everything that changes
something (SET, DELETE, SET_IP_INFO) and anything unusual goes to the trio
thread (`DeviceServer.answer`), which owns every change. Nothing here blocks
the trio loop: pool-file work happens in the store's worker threads.

A failed read or write closes the device, reopens it and registers again, which
is what the kernel needs after hibernation or a timed-out transaction. A refused
registration is retried the same way for a while (`REGISTRATION_WINDOW`): after
a hibernation with no daemon connected the kernel refuses the first one, and
closing the device resets it.

The kernel matches replies to requests by order alone: once its 30 s timer
(`KERNEL_TIMEOUT`) has fired, our next write is taken as the reply to whatever
request is outstanding then. `ReplyClock` (replytiming.py) counts each
request's deadline from the earliest moment the kernel could have armed that
timer, never from our own read; work gets `REPLY_DEADLINE` from then (E_FAIL
if not done), and a reply that is not in time, or that crossed a suspend, is
never written: the device is closed and opened again instead, which resets the
kernel and frees whatever it had queued.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from kvpfs import compat
from kvpfs.host.device import Channel, DeviceUnavailable, Opener
from kvpfs.host.handover import STOP, Handover
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.host.intrinsic import Intrinsics
from kvpfs.host.replyfit import fit_record
from kvpfs.host.replytiming import ReplyClock, Stamp, suspended_seconds
from kvpfs.storage.errors import LockTimeout, PoolFileError
from kvpfs.storage.store import Origin, Store
from kvpfs.wire import protocol
from kvpfs.wire.kernelmodel import KERNEL_TIMEOUT
from kvpfs.wire.protocol import Op, Pool, ProtocolError, Status

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Deferred:
    """A reply whose effect must wait until the reply has reached the kernel in time.

    `commit` runs (on the trio thread) once the reply was written in time, `discard`
    when it was not written: then the guest must not change (SET_IP_INFO).
    """

    reply: bytes
    commit: Callable[[], None]
    discard: Callable[[], None]


IpInfoHandler = Callable[[protocol.IpInfoRequest], Awaitable[bytes | Deferred]]
REPLY_DEADLINE = 20.0
"""Every request is answered within this, with E_FAIL if its work is not done."""
REGISTRATION_WINDOW = 20.0
"""How long a refused first registration is retried (close, reopen, register)."""
REGISTRATION_RACES = 5
"""Registrations in a row the kernel may take as a host request's reply before we back off."""
ECHO_TIMEOUT = 5.0
"""How long to wait for the registration echo before taking the registration as lost."""


KERNEL_TIMEOUT_ENV = "KVPFS_KERNEL_TIMEOUT"
"""Seconds the kernel waits for a reply, for kernels built otherwise and for test rigs
whose emulated kernel waits less (emulation/emulated_device.py --timeout)."""


def kernel_timeout_from_env() -> float:
    text = os.environ.get(KERNEL_TIMEOUT_ENV, "")
    try:
        value = float(text) if text else KERNEL_TIMEOUT
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        log.warning("%s=%r is not a number of seconds in (0, 3600]; using %g s",
                    KERNEL_TIMEOUT_ENV, text, KERNEL_TIMEOUT)
        return KERNEL_TIMEOUT
    return value


class RegistrationRefused(Exception):
    """The kernel rejected our registration (at start: every try for `registration_window`)."""


class RegistrationRaced(Exception):
    """The kernel took REGISTER1 as the reply to a host request (no echo came back)."""


class ReplyWithheld(Exception):
    """A reply was not written because the kernel may no longer wait for it; reopen."""


class DeviceServer:
    def __init__(
        self,
        opener: Opener,
        store: Store,
        intrinsics: Intrinsics,
        *,
        ip_info: IpInfoHandler | None = None,
        reopen_delay: float = 0.1,
        max_reopen_delay: float = 5.0,
        reply_deadline: float | None = None,
        kernel_timeout: float | None = None,
        registration_window: float = REGISTRATION_WINDOW,
        echo_timeout: float = ECHO_TIMEOUT,
        idle_recheck: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        suspended: Callable[[], float] = suspended_seconds,
    ) -> None:
        self.opener = opener
        self.store = store
        self.intrinsics = intrinsics
        self.ip_info = ip_info
        self.reopen_delay = reopen_delay
        self.max_reopen_delay = max_reopen_delay
        if kernel_timeout is None:
            kernel_timeout = kernel_timeout_from_env()
        if reply_deadline is None:
            reply_deadline = kernel_timeout * REPLY_DEADLINE / KERNEL_TIMEOUT
        self.reply_deadline = reply_deadline
        self.kernel_timeout = kernel_timeout
        self.registration_window = registration_window
        self.echo_timeout = echo_timeout
        self.timing = ReplyClock(kernel_timeout, reply_deadline, clock=clock,
                                 suspended=suspended)
        # While idle the device thread looks again this often (real seconds): a request
        # is then read at most this long after the device was last seen empty.
        self.idle_recheck = self.timing.write_limit / 5 if idle_recheck is None \
            else idle_recheck
        if store.lock_timeout >= reply_deadline:
            log.warning("the pool-file lock timeout (%g s) is not below the reply deadline"
                        " (%g s): a host SET or DELETE waits for a lock only until the"
                        " reply deadline", store.lock_timeout, reply_deadline)
        self.registrations = 0
        self.registration_races = 0
        self.requests = 0
        self.late_replies_dropped = 0
        self.deadline_misses = 0
        self.version: str | None = None
        # Monotonic start of the request (or registration) in progress, for the
        # watchdog (kvpfs/watchdog.py): waiting for the host is idle, not stalled.
        self.busy_since: float | None = None

    def stalled_for(self, now: float) -> float:
        """Seconds the request or registration in progress has taken (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else now - since

    # ---------------------------------------------------------------- lifecycle
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled. Reports started once the first registration is done."""
        channel = await self._open_and_register_patiently()
        task_status.started()
        delay = self.reopen_delay
        while True:
            pause = delay
            try:
                await self._serve(channel)
            except ReplyWithheld:
                pause = 0.0  # logged where it happened; the reset is what we want, now
            except OSError as exc:
                log.warning(
                    "device %s failed (%s); closing, reopening and registering again",
                    self.opener.name, exc,
                )
            finally:
                channel.close()
            while True:
                await trio.sleep(pause)
                pause = delay
                try:
                    channel = await self._open_and_register()
                    delay = self.reopen_delay
                    break
                except (OSError, DeviceUnavailable, RegistrationRefused,
                        RegistrationRaced) as exc:
                    delay = min(delay * 2, self.max_reopen_delay)
                    log.warning("reopening %s failed: %s; retrying in %.1f s",
                                self.opener.name, exc, delay)

    async def _open_and_register_patiently(self) -> Channel:
        """The first registration, retried with backoff for `registration_window`.

        The kernel refuses the first REGISTER1 after a hibernation with no daemon
        connected (its state was forced to READY); closing the device resets it.
        """
        give_up_at = trio.current_time() + self.registration_window
        delay = self.reopen_delay
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._open_and_register()
            except (RegistrationRefused, RegistrationRaced) as exc:
                if trio.current_time() + delay > give_up_at:
                    raise RegistrationRefused(
                        f"{exc}; it refused all {attempts} registrations over"
                        f" {self.registration_window:g} s, closing and reopening the device"
                        " between them. The kernel may expect a different KVP daemon"
                        " protocol version (see dmesg for \"KVP: incompatible daemon\")"
                    ) from exc
                log.warning(
                    "%s. After a hibernation with no daemon connected the kernel refuses"
                    " the first registration; the device was closed (which resets it) and"
                    " kvpfs registers again in %.1f s", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_reopen_delay)

    async def _open_and_register(self) -> Channel:
        """Open and register; a registration the kernel took as a reply is done again.

        After a hibernation with no daemon connected the kernel is READY: a host request
        that arrives between our open and our REGISTER1 is passed down, and REGISTER1 is
        taken as its reply. Closing the device resets the kernel (DEVICE_INIT), so we
        close, reopen and register again, up to `REGISTRATION_RACES` times in a row.
        """
        self.busy_since = time.monotonic()
        try:
            for attempt in range(1, REGISTRATION_RACES + 1):
                channel = await self.opener.open()
                try:
                    await self._register(channel)
                except RegistrationRaced as exc:
                    channel.close()
                    self.registration_races += 1
                    if attempt == 1:
                        log.warning("%s; closed the device (which resets the kernel) and"
                                    " registering again", exc)
                    else:
                        log.debug("registration raced again (%d): %s", attempt, exc)
                    if attempt == REGISTRATION_RACES:
                        raise
                    continue
                except BaseException:
                    channel.close()
                    raise
                if attempt > 1:
                    log.info("registered at attempt %d", attempt)
                return channel
        finally:
            self.busy_since = None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _register(self, channel: Channel) -> None:
        """REGISTER1, then its echo and nothing else.

        A message already queued when we open means the kernel is past DEVICE_INIT and
        passes host requests down: REGISTER1 would answer one. Anything but the echo
        read after REGISTER1 (a host request, GET_IP_INFO's op 4 among them) means it
        did. Either way the caller resets the kernel by closing the device.
        """
        if channel.poll_reliable and channel.poll_now() & select.POLLIN:
            raise RegistrationRaced(
                f"{channel.name} had a host request queued before kvpfs registered (the"
                " kernel was left READY by a hibernation); not registering on top of it")
        try:
            await channel.write_message(protocol.encode_register(Op.REGISTER1))
        except OSError as exc:
            raise RegistrationRefused(
                f"the kernel refused registration on {channel.name}"
                f" ({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror or exc})"
            ) from exc
        self.timing.mark()  # the kernel starts serving during the read of the echo
        message: bytes | None = None
        with trio.move_on_after(self.echo_timeout):
            message = await channel.read_message()
        if message is None:
            raise RegistrationRaced(
                f"no registration echo on {channel.name} within {self.echo_timeout:g} s")
        reply = None
        if message[0] == Op.REGISTER1:
            try:
                reply = protocol.decode_request(message, in_handshake=True)
            except ProtocolError:
                reply = None
        if not isinstance(reply, protocol.RegisterReply):
            raise RegistrationRaced(
                f"the kernel took REGISTER1 as the reply to a host request: read op"
                f" {message[0]} (pool {message[1]}) instead of the registration echo")
        self.version = reply.version
        self.intrinsics.integration_version = reply.version
        self.registrations += 1
        log.info("registered with %s (op %d), KVP LIC version %s",
                 channel.name, reply.op, reply.version)

    async def _serve(self, channel: Channel) -> None:
        """Serve requests in the device thread until the device fails (OSError), a reply
        is withheld (ReplyWithheld) or we are cancelled; either way the thread has let go
        of `channel` on return."""
        stop_read, stop_write = os.pipe2(os.O_CLOEXEC)
        handover = Handover(trio.lowlevel.current_trio_token())
        failure: OSError | ReplyWithheld | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._answer_handed_over, channel, handover, stop_write)
                # Not abandoned on cancel: the stop pipe ends the thread, and only then
                # may the caller close the channel.
                failure = await compat.to_thread_run_sync(
                    self._serve_in_thread, channel, stop_read, handover,
                    thread_name="kvpfs device",
                )
                # Stopped without a device error: we were cancelled (raised here), or the
                # trio side of the handover ended, which raises its own error at exit.
                if failure is None:
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
        finally:
            os.close(stop_read)
            os.close(stop_write)
        if failure is not None:
            raise failure
        log.warning("device thread for %s stopped; opening the device again", channel.name)

    def _serve_in_thread(self, channel: Channel, stop_fd: int, handover: Handover
                         ) -> OSError | ReplyWithheld | None:
        """The device thread: poll, read, answer, write, until told to stop.

        Returns the device's error (or the withheld reply) rather than raising it, so
        that it reaches `run` as itself and not inside an exception group.
        """
        readable = channel.waiter(select.POLLIN, stop_fd)
        writable = channel.waiter(select.POLLOUT, stop_fd)
        timing = self.timing
        recheck = self.idle_recheck
        try:
            while True:
                before = timing.clock()
                if not channel.poll_reliable:
                    timing.mark(before)  # no poll: counted from the read (best effort)
                    if readable(None) is False:
                        return None
                elif not channel.poll_now():
                    timing.mark(before)  # empty then: what comes next is armed later
                    ready = readable(recheck)
                    if ready is None:
                        continue
                    if not ready:
                        return None
                message = channel.read_ready_message()
                if message is None:
                    continue
                self.busy_since = time.monotonic()
                stamp = timing.stamp()
                if (why := timing.verdict(stamp)) is not None:
                    return self._withheld(message, why, read=True)
                reply = self._answer_read(message)
                if reply is None:
                    outcome = handover.answer_in_trio((message, stamp))
                    if outcome is STOP:
                        return None
                    if isinstance(outcome, (OSError, ReplyWithheld)):
                        return outcome
                    self.busy_since = None
                    continue
                if (why := timing.verdict(stamp)) is not None:
                    return self._withheld(message, why)
                timing.mark()  # the kernel takes the next request during this write
                while not channel.write_ready_message(reply):
                    if writable(None) is False:
                        return None
                self.busy_since = None
        except OSError as exc:
            return exc
        finally:
            self.busy_since = None

    async def _answer_handed_over(self, channel: Channel, handover: Handover,
                                  stop_fd: int) -> None:
        """The trio side of the device thread: answer what it hands over and write
        the reply here, so only one thread switch sits on the host's path."""
        try:
            async for message, stamp in handover.requests:
                try:
                    reply = await self._answer(message, stamp)
                    deferred = reply if isinstance(reply, Deferred) else None
                    data = deferred.reply if deferred is not None else reply
                    assert isinstance(data, bytes)
                    if (why := self.timing.verdict(stamp)) is not None:
                        if deferred is not None:
                            deferred.discard()
                        handover.outcomes.put(self._withheld(message, why))
                        continue
                    self.timing.mark()
                    try:
                        await channel.write_message(data)
                    except BaseException:
                        if deferred is not None:
                            deferred.discard()
                        raise
                    if deferred is not None:
                        deferred.commit()
                except OSError as exc:
                    handover.outcomes.put(exc)
                else:
                    handover.outcomes.put(None)
        finally:
            os.write(stop_fd, b"x")  # a thread in poll(2) stops
            handover.outcomes.put(STOP)  # a thread waiting for an outcome stops

    def _withheld(self, message: bytes, why: str, *, read: bool = False) -> ReplyWithheld:
        """Count and log a reply not written; the device is reopened for it."""
        self.late_replies_dropped += 1
        what = "request" if read else "reply to"
        text = (f"the {what} op {message[0]} (pool {message[1]}) not answered: {why}."
                " Written now it could answer another request (the kernel has no request"
                " ids); closing and reopening the device instead, which resets the kernel")
        log.error("%s", text)
        return ReplyWithheld(text)

    def _answer_read(self, message: bytes) -> bytes | None:
        """In the device thread: the reply to a GET or ENUMERATE, from memory.

        None for everything else, which `answer` handles on the trio thread.
        """
        if message[0] not in (Op.GET, Op.ENUMERATE):
            return None
        try:
            request = _decode(message)
        except ProtocolError:
            return None  # `answer` logs it and says E_FAIL
        if not isinstance(request, (protocol.GetRequest, protocol.EnumerateRequest)):
            return None  # not reached: the op said GET or ENUMERATE
        self.requests += 1
        log.debug("host request: %r", request)
        try:
            return self.read_reply(request)
        except Exception:
            log.exception("unexpected error answering %r; answered E_FAIL", request)
            return protocol.encode_status(Status.E_FAIL)

    # ---------------------------------------------------------------- requests
    async def answer(self, message: bytes) -> bytes:
        """The reply to one request, for direct callers (tests, the in-process benchmark):
        with no kernel waiting, a deferred effect takes place at once."""
        reply = await self._answer(message, None)
        if isinstance(reply, Deferred):
            reply.commit()
            return reply.reply
        return reply

    async def _answer(self, message: bytes, stamp: Stamp | None) -> bytes | Deferred:
        """The reply to one request; never raises for anything the message says.

        All work ends within `reply_deadline` of `stamp` (of now, without one). A
        pool-file change is not cut short once started (its answer must say whether it
        happened): its lock waits end at that deadline instead.
        """
        self.requests += 1
        try:
            request = _decode(message)
        except ProtocolError as exc:
            log.warning("malformed host message (op %s, pool %s) answered E_FAIL: %s",
                        exc.op, exc.pool, exc)
            return protocol.encode_status(Status.E_FAIL)
        log.debug("host request: %r", request)
        left = self.reply_deadline if stamp is None else self.timing.work_left(stamp)
        changes = isinstance(request, (protocol.SetRequest, protocol.DeleteRequest))
        try:
            if changes:
                with self.store.lock_waits_within(left):
                    return await self._dispatch(request)
            with trio.move_on_after(left):
                return await self._dispatch(request)
            self.deadline_misses += 1
            log.error("%r not done within %g s of its arrival; answered E_FAIL so the"
                      " kernel (which gives up after %g s) never pairs a late reply with"
                      " another request", request, self.reply_deadline, self.kernel_timeout)
        except LockTimeout as exc:
            log.warning("pool file locked too long, answered E_FAIL: %s (held by %s)",
                        exc, exc.holders or "unknown")
        except PoolFileError as exc:
            log.error("pool file error, answered E_FAIL: %s", exc)
            if exc.errno == 28:  # ENOSPC
                return protocol.encode_status(Status.ERROR_DISK_FULL)
        except ValueError as exc:
            log.warning("request %r refused: %s", request, exc)
        except Exception:
            # A bug must cost one E_FAIL, not the daemon: the host keeps being served.
            log.exception("unexpected error answering %r; answered E_FAIL", request)
        return protocol.encode_status(Status.E_FAIL)

    async def _dispatch(self, request: protocol.Request) -> bytes | Deferred:
        # The device thread answers GET and ENUMERATE itself; they come here only from
        # direct callers of `answer` (tests, the in-process benchmark).
        if isinstance(request, (protocol.EnumerateRequest, protocol.GetRequest)):
            if request.pool == Pool.AUTO and self._intrinsic_blocks(request):
                return await trio.to_thread.run_sync(self.read_reply, request)
            return self.read_reply(request)
        if isinstance(request, protocol.SetRequest):
            if request.pool == Pool.AUTO:
                log.warning("host SET on pool 2 (auto, computed by the guest) not supported")
                return protocol.encode_status(Status.ERROR_NOT_SUPPORTED)
            await self.store.set(request.pool, request.key, request.value, Origin.HOST)
            return protocol.encode_status(Status.S_OK)
        if isinstance(request, protocol.DeleteRequest):
            if request.pool == Pool.AUTO:
                log.warning("host DELETE on pool 2 (auto, computed by the guest) not supported")
                return protocol.encode_status(Status.ERROR_NOT_SUPPORTED)
            found = await self.store.delete(request.pool, request.key, Origin.HOST)
            return protocol.encode_status(Status.S_OK if found else Status.S_CONT)
        if isinstance(request, protocol.IpInfoRequest):
            if self.ip_info is not None:
                return await self.ip_info(request)
            log.info("host asked for %s: not supported yet", Op(request.op).name)
            return protocol.encode_status(Status.ERROR_NOT_SUPPORTED)
        log.warning("unknown host operation %d (pool %d) answered NOT_SUPPORTED",
                    request.op, request.pool)
        return protocol.encode_status(Status.ERROR_NOT_SUPPORTED)

    def _intrinsic_blocks(self, request: protocol.EnumerateRequest | protocol.GetRequest) -> bool:
        index = _intrinsic_index(request)
        return index is not None and self.intrinsics.needs_thread(index)

    def read_reply(self, request: protocol.EnumerateRequest | protocol.GetRequest) -> bytes:
        """GET and ENUMERATE, answered from memory; callable from any thread.

        Blocks only for a fresh read of pool 2's address lists.
        """
        if request.pool == Pool.AUTO:
            return self._read_intrinsic(request)
        if isinstance(request, protocol.EnumerateRequest):
            record = self.store.enumerate(request.pool, request.index)
            if record is None:
                return protocol.encode_status(Status.S_CONT)
            return protocol.encode_enumerate_reply(
                *fit_record(record.key, record.value, request.pool))
        value = self.store.get(request.pool, request.key)
        if value is None:
            return protocol.encode_status(Status.S_CONT)
        return protocol.encode_get_reply(*fit_record(request.key, value, request.pool))

    def _read_intrinsic(self, request: protocol.EnumerateRequest | protocol.GetRequest) -> bytes:
        index = _intrinsic_index(request)
        item = None if index is None else self.intrinsics.value(index)
        if item is None:
            return protocol.encode_status(Status.S_CONT)
        key, value = item
        if isinstance(request, protocol.EnumerateRequest):
            return protocol.encode_enumerate_reply(
                *fit_record(key.encode(), value.encode(), "intrinsic")
            )
        return protocol.encode_get_reply(*fit_record(request.key, value.encode(), "auto"))


_INTRINSIC_INDEX = {name.encode(): index for index, name in enumerate(INTRINSIC_KEYS)}


def _decode(message: bytes) -> protocol.Request:
    """A request read outside the registration handshake.

    There op 100 is an unknown op (`decode_request` without `in_handshake`), so a
    registration reply cannot come back; the check says so to the type checker.
    """
    request = protocol.decode_request(message)
    assert not isinstance(request, protocol.RegisterReply)  # only with in_handshake=True
    return request


def _intrinsic_index(request: protocol.EnumerateRequest | protocol.GetRequest) -> int | None:
    """Which pool-2 value a request names: by position, or by exact key for GET."""
    if isinstance(request, protocol.EnumerateRequest):
        return request.index
    return _INTRINSIC_INDEX.get(request.key)
