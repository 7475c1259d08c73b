"""Lifecycle of one kvpfs instance: store, device, filesystem, torn down in reverse.

Order matters. The pool files are opened and the device is registered before
anything is mounted, so a missing or busy device is reported without leaving
a mount behind. Then the filesystem is mounted, readiness is announced (stdout
line, systemd's READY=1), and every task runs until SIGINT/SIGTERM or an
unmount from outside ends pyfuse3's main loop. Then, in reverse: the tasks that
use the mount end, the mount is removed, the services (device, control socket,
simulated host) end, and the store is closed last. Under systemd's watchdog
(WatchdogSec=), kvpfs/watchdog.py pings while every part makes progress.

This is the one place that builds the parts and wires them together: the
filesystem's (`build_filesystem`: handlers, node table, change feed, the
notification service, subscribed to the store) and the services'.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kvpfs import __version__, compat, control, mountinfo
from kvpfs.fuse import events
from kvpfs.fuse.attributes import Attributes
from kvpfs.fuse.contents import Contents
from kvpfs.fuse.durable import DurableMeta
from kvpfs.fuse.echoes import EchoingOperations, EchoRequests
from kvpfs.fuse.events import EventFeed
from kvpfs.fuse.nodes import NodeTable
from kvpfs.fuse.notifications import Notifications
from kvpfs.fuse.operations import Parts, Permissions
from kvpfs.fuse.privatedirs import PrivateDirs
from kvpfs.fuse.unpublished import Unpublished
from kvpfs.fuse.writes import Writes
from kvpfs.host.controlrpc import answer
from kvpfs.host.device import Channel, CharDevice, DeviceUnavailable
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.host.netconfig import IpInfoService, NetSettings
from kvpfs.host.server import DeviceServer, RegistrationRefused
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.errors import PoolFileError
from kvpfs.storage.keymeta import KeyMetaFile
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.storage.store import Store, default_pool_dir
from kvpfs.watchdog import PINGS_PER_PERIOD, Watchdog, sd_notify, watchdog_period
from kvpfs.wire.protocol import Pool

log = logging.getLogger(__name__)


class StartupError(Exception):
    """kvpfs cannot start; the message says why and what to do."""


@dataclass
class MountConfig:
    mountpoint: Path
    device: str = "/dev/vmbus/hv_kvp"
    pool_dir: Path | None = None
    simulate: bool = False
    allow_other: bool = False
    raw: bool = False
    debug_fuse: bool = False
    control_path: Path | None = None
    guest_gid: int | None = None
    external_readable: bool = False
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    extra_fuse_options: list[str] = field(default_factory=list)
    on_ready: Callable[[], None] | None = None

    def resolved_pool_dir(self) -> Path:
        return self.pool_dir or default_pool_dir(self.simulate)


@dataclass(frozen=True)
class Filesystem:
    """The filesystem's parts: what pyfuse3 calls, and the services that run beside it."""

    operations: EchoingOperations
    notifications: Notifications  # run by `serve` (Notifications.run)
    feed: EventFeed  # its interrupt watcher is run by `serve`
    table: NodeTable
    meta: DurableMeta  # its saver is run by `serve`


def build_filesystem(store: Store, intrinsics: Intrinsics, *, raw: bool = False,
                     permissions: Permissions | None = None,
                     control_path: str | None = None) -> Filesystem:
    """Build the handlers and every collaborator, and subscribe them to the store.

    The store's listeners run in order: the change feed first (what readers of
    /.events see), then the notification service (our nodes, the kernel's side).
    """
    perm = permissions or Permissions(uid=os.getuid(), gid=os.getgid())
    started_ns = time.time_ns()
    unpublished = Unpublished()
    table = NodeTable(store, unpublished, started_ns)
    # What users set on guest keys, kept beside the pools (docs/tools.md); read once, here,
    # before anything is served.
    meta = DurableMeta(KeyMetaFile(store.pool_dir), store.states[Pool.GUEST].unique_keys())
    table.on_guest_node = meta.apply
    contents = Contents(store, intrinsics)
    attributes = Attributes(store, table, contents, perm, started_ns)
    guest_lock = store.request_lock(Pool.GUEST)
    writes = Writes(store, table, contents, unpublished, guest_lock, meta, raw=raw)
    notifications = Notifications(store, table)
    feed = EventFeed(notifications.wake_poller)
    handles = itertools.count(1)

    def new_fh() -> int:
        return next(handles)

    echoes = EchoRequests(notifications, table, attributes, perm, new_fh)
    parts = Parts(store=store, table=table, contents=contents, attributes=attributes,
                  writes=writes, feed=feed, notifications=notifications, perm=perm,
                  guest_lock=guest_lock, new_fh=new_fh, dirs=PrivateDirs(table.new_ino),
                  meta=meta, control_path=control_path)
    store.add_listener(feed.on_store_change)
    store.add_listener(notifications.on_store_change)
    return Filesystem(EchoingOperations(parts, echoes), notifications, feed, table, meta)


async def clear_stale_mount(mountpoint: Path, where: Path, *, bound: float = 2.0) -> None:
    """Unmount what a killed kvpfs left on our mount point; refuse a live one.

    A dead mount answers ENOTCONN ("Transport endpoint is not connected"); one whose
    daemon cannot exit (stuck in the kernel) does not answer at all, so it is probed
    in a worker thread with a bound and, if silent, aborted with a forced unmount.
    """
    if where not in await trio.to_thread.run_sync(mountinfo.kvpfs_mounts):
        return
    state = "silent"
    with trio.move_on_after(bound):
        try:
            await compat.to_thread_run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
            state = "live"
        except OSError as exc:
            state = "dead" if exc.errno == errno.ENOTCONN else f"failing ({exc.strerror})"
    if state == "live":
        raise StartupError(
            f"{mountpoint} is already mounted by a running kvpfs; stop it first"
            f" (or unmount it: fusermount3 -u {mountpoint})")
    log.warning("%s holds a %s kvpfs mount left by a previous instance; unmounting it",
                mountpoint, state)

    def unmount() -> None:
        if state != "dead":  # MNT_FORCE aborts the FUSE connection, freeing its waiters
            subprocess.run(["umount", "-f", str(mountpoint)], check=False, timeout=10,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, timeout=10,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    await trio.to_thread.run_sync(unmount)


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"fsname=kvpfs", "subtype=kvpfs", "noatime"}
    if config.allow_other:
        options.add("allow_other")
    if config.debug_fuse:
        options.add("debug")
    options |= set(config.extra_fuse_options)
    return options


class _OpenedEarly:
    """The device, opened once before anything is created, so that a missing or busy
    one refuses the start cleanly; the server's first open takes that channel."""

    def __init__(self, opener: CharDevice, channel: Channel) -> None:
        self.name = opener.name
        self._opener = opener
        self._channel: Channel | None = channel

    async def open(self) -> Channel:
        channel, self._channel = self._channel, None
        return channel if channel is not None else await self._opener.open()

    def close(self) -> None:
        """Close the early channel if the server never took it."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None


async def _refuse_early(config: MountConfig, where: Path, control_path: Path
                        ) -> _OpenedEarly | None:
    """Every refusal that can be known before anything is created (above all the pool
    directory): a live mount point, a live control socket, a missing or busy device."""
    # First, before the device: a previous kvpfs stuck on its way out still holds it.
    await clear_stale_mount(config.mountpoint, where)
    try:
        await trio.to_thread.run_sync(control.check_control_path, control_path)
    except control.ControlSocketInUse as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot use {control_path} for the control socket:"
                           f" {exc.strerror or exc}") from None
    if config.simulate:
        return None
    device = CharDevice(config.device)
    try:
        return _OpenedEarly(device, await device.open())
    except DeviceUnavailable as exc:
        raise StartupError(str(exc)) from None


async def serve(config: MountConfig) -> None:
    """Set up device, store, services, mount and tasks; tear them down in reverse order.

    Each resource is entered into one exit stack as soon as it exists, so a failure at any
    later step unwinds exactly what was set up. The store is opened before the services and
    closed after all of them have ended, because a change queued after its close would
    reopen a pool file. The tasks that use the mount end before it is closed, and on
    SIGINT/SIGTERM the invalidations stop while pyfuse3 still answers (see
    `_terminate_on_signals`).
    """
    mountpoint = config.mountpoint
    pool_dir = config.resolved_pool_dir()
    control_path = config.control_path or control.default_control_path(mountpoint)
    # Never touch the mount point's path from this thread once mounted: until
    # pyfuse3.main() runs, nothing answers, and the kernel waits for us forever.
    where = mountinfo.canonical_mountpoint(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        device = await _refuse_early(config, where, control_path)
        if device is not None:
            stack.callback(device.close)
        store = Store(pool_dir, lock_timeout=config.lock_timeout)
        stack.callback(store.close)
        try:
            await store.open()
        except PoolFileError as exc:
            raise StartupError(str(exc)) from None
        await _serve_store(config, store, pool_dir, control_path, where, device)
    log.info("kvpfs stopped; %s unmounted", mountpoint)


async def _serve_store(config: MountConfig, store: Store, pool_dir: Path, control_path: Path,
                       where: Path, device: _OpenedEarly | None) -> None:
    mountpoint = config.mountpoint
    fqdn = FqdnCache()
    intrinsics = Intrinsics(fqdn)
    host = SimulatedHost() if config.simulate else None
    opener = host if host is not None else device
    assert opener is not None
    # Under --simulate, SET_IP_INFO writes into a sandbox and runs nothing (netconfig).
    ip_info = IpInfoService(NetSettings.from_env(
        simulate=config.simulate, sandbox=pool_dir.parent / "simulated-network"))
    server = DeviceServer(opener, store, intrinsics, ip_info=ip_info)
    fs = build_filesystem(
        store, intrinsics, raw=config.raw, control_path=str(control_path),
        permissions=Permissions(uid=os.getuid(), gid=os.getgid(), guest_gid=config.guest_gid,
                                external_readable=config.external_readable),
    )

    async def handle_control(request: dict[str, Any]) -> dict[str, Any]:
        return await answer(host, server, store, request)

    async with trio.open_nursery() as services:  # everything that does not need the mount
        if host is not None:
            await compat.start(services, host.run)
        services.start_soon(fqdn.run)
        await compat.start(services, ip_info.run)  # SET_IP_INFO activations, after the answer
        try:
            await compat.start(services, server.run)
        except (DeviceUnavailable, RegistrationRefused) as exc:
            raise StartupError(str(exc)) from None
        try:
            await compat.start(services, control.serve, control_path, handle_control)
        except control.ControlSocketInUse as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot create the control socket {control_path}:"
                               f" {exc.strerror or exc}") from None
        try:
            pyfuse3.init(fs.operations, str(mountpoint), fuse_options(config))
        except RuntimeError as exc:
            raise StartupError(
                f"cannot mount on {mountpoint}: {exc} (does it exist, is it an empty directory,"
                " is /dev/fuse available and are you root?)"
            ) from None
        try:
            async with trio.open_nursery() as mounted:  # the tasks that use the mount
                invalidations = _Notifying(fs.notifications, where)
                mounted.start_soon(invalidations.run)
                mounted.start_soon(store.watch)
                mounted.start_soon(fs.feed.watch_interrupts)
                mounted.start_soon(fs.meta.saver)  # guest keys' mtimes and newlines
                # Handlers in place before READY=1: a stop right after it must unmount
                # cleanly, not kill us with SIGTERM's default action and leave a dead mount.
                await compat.start(mounted, _terminate_on_signals, fs.feed, invalidations)
                mounted.start_soon(_end_feed_when_unmounted, fs.feed, mountpoint, where)
                period = watchdog_period()
                if period is not None:
                    dog = Watchdog(period, device_stalled_for=server.stalled_for,
                                   mountpoint=where)
                    mounted.start_soon(dog.run)
                log.info(
                    "kvpfs %s ready: %s mounted on %s, pools in %s, control socket %s%s",
                    __version__, "simulated host" if host else config.device, mountpoint,
                    pool_dir, control_path,
                    f", watchdog pings every {period / PINGS_PER_PERIOD:g} s" if period else "",
                )
                sd_notify("READY=1")
                if config.on_ready:
                    config.on_ready()
                # Blocked reads of /.events hold handler tasks: room for them (events.py).
                await pyfuse3.main(max_tasks=events.HANDLER_TASKS)
                mounted.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
        services.cancel_scope.cancel()
    # Every task has ended here, so no pool-file change is queued: `serve` closes the store.


class _Notifying:
    """The notification service's task, which a stop ends before pyfuse3 stops answering."""

    def __init__(self, notifications: Notifications, where: Path) -> None:
        self.notifications = notifications
        self.where = where  # the mount point, where echoes of host changes are made
        self.scope = trio.CancelScope()
        self.ended = trio.Event()

    async def run(self) -> None:
        try:
            with self.scope:
                await self.notifications.run(self.where)
        finally:
            self.ended.set()

    async def stop(self, bound: float = 5.0) -> None:
        """End the invalidations; one in flight finishes first (it may wait for the kernel,
        which may wait for one of our answers: so pyfuse3 must still be answering)."""
        self.scope.cancel()
        with trio.move_on_after(bound):
            await self.ended.wait()


async def _terminate_on_signals(
    feed: EventFeed, invalidations: _Notifying, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            feed.shutdown()
            await invalidations.stop()
            pyfuse3.terminate()
            return


async def _end_feed_when_unmounted(
    feed: EventFeed, mountpoint: Path, where: Path
) -> None:
    """After an unmount from outside, release readers blocked on /.events.

    pyfuse3's main loop only returns once every handler has; a read of the
    change feed may wait forever for the next change. Our mount is found in
    mountinfo (the topmost kvpfs on `where`, the canonical mount point), never
    through the mount itself, which may not be served yet or any more.
    """
    mounts = await trio.to_thread.run_sync(mountinfo.kvpfs_mount_table)
    ours = [device for device, point in mounts if point == where][-1:]
    if not ours:
        log.warning("cannot find our mount of %s in mountinfo; an unmount from outside will"
                    " not end blocked reads of .events", mountpoint)
        return
    while True:
        await trio.sleep(1.0)
        if not feed.has_readers():
            continue
        mounts = await trio.to_thread.run_sync(mountinfo.kvpfs_mount_table)
        if ours[0] not in (device for device, _ in mounts):
            log.info("%s was unmounted from outside; ending the change feed", mountpoint)
            feed.shutdown()
            return


def _one_malloc_arena() -> None:
    """One glibc malloc arena: worker threads that parse pool files would otherwise
    each keep an arena of freed memory (measured: 62 MB resident instead of 37 MB
    with 5,000 records in each of three pools)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


def run(config: MountConfig) -> None:
    _one_malloc_arena()
    # A watchdog timeout sends SIGABRT: log where every thread was (stderr, the journal).
    faulthandler.enable()
    try:
        compat.run(serve, config)
    except BaseExceptionGroup as group:
        # A start-up failure inside the nursery arrives wrapped; report it plainly.
        startups, _rest = group.split(StartupError)
        if startups is not None:
            first: BaseException = startups
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise
