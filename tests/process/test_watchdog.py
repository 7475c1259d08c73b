"""The systemd watchdog (kvpfs/watchdog.py): WATCHDOG=1 while every part makes progress.

* a real kvpfs under $NOTIFY_SOCKET and $WATCHDOG_USEC pings while idle, and not at all
  when $WATCHDOG_PID names another process;
* the device thread: a host request stuck behind another program's pool lock (a real
  simulated host, device thread and store) stops the pings; they resume once it is answered;
* the FUSE loop: a probe of a mount that does not answer (a real FUSE connection nobody
  reads) stops the pings; they resume once the connection is aborted.

The systemd side (the watchdog firing, the restart) is in tests/test_contrib.py.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.host.server import DeviceServer
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.store import Store
from kvpfs.watchdog import Watchdog, watchdog_period
from tests.conftest import KvpfsProcess, requires_fuse
from tests.support.fusewedge import silent_fuse_mount
from tests.support.lockholder import start_locker, stop_locker

from .test_contrib import KVPFS

PERIOD = 0.4  # pings every 0.1 s
LIMIT = 0.5  # stall limit for the in-process tests


class Pings:
    """The notify socket a test's watchdog sends to."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    async def next(self, timeout: float) -> bytes | None:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self.sock)
            return self.sock.recv(100)
        return None

    async def drain(self) -> None:
        try:
            while True:
                self.sock.recv(100)
        except BlockingIOError:
            pass

    async def none_for(self, seconds: float) -> bool:
        """No ping for `seconds` (several ping intervals)."""
        await self.drain()
        return await self.next(seconds) is None


@pytest.fixture
async def pings(tmp_path, monkeypatch):
    p = Pings(tmp_path / "notify.sock", monkeypatch)
    yield p
    p.sock.close()


def test_watchdog_period_is_ours_only(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "15000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_period() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_period() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_period() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_period() is None


@pytest.mark.log_errors('the device thread has not answered a host request')
async def test_a_stuck_host_request_stops_the_pings(tmp_path, pings):
    pool_dir = tmp_path / "pools"
    store = Store(pool_dir, lock_timeout=30)
    await store.open()
    host = SimulatedHost(timeout=60)
    server = DeviceServer(host, store, Intrinsics(FqdnCache(bound=0.5)))
    dog = Watchdog(PERIOD, device_stalled_for=server.stalled_for, mountpoint=tmp_path,
                   device_limit=LIMIT)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            await nursery.start(server.run)
            nursery.start_soon(dog.run)
            for _ in range(5):  # an idle device thread (in poll) pings
                assert await pings.next(5) == b"WATCHDOG=1"
            locker = await trio.to_thread.run_sync(start_locker, pool_dir / ".kvp_pool_0")
            try:
                results = []

                async def host_set() -> None:
                    results.append(await host.set(0, "k", "v"))

                nursery.start_soon(host_set)
                while server.stalled_for(time.monotonic()) <= LIMIT:
                    await trio.sleep(0.02)
                assert await pings.none_for(5 * dog.interval)
                assert dog.stalled(time.monotonic()).startswith("the device thread has not")
            finally:
                await trio.to_thread.run_sync(stop_locker, locker)
            assert await pings.next(10) == b"WATCHDOG=1"  # answered: pinging again
            while not results:
                await trio.sleep(0.02)
            assert results[0].status == 0
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@requires_fuse
@pytest.mark.log_errors('the mount has not answered a statfs')
async def test_a_mount_that_does_not_answer_stops_the_pings(tmp_path, pings):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = silent_fuse_mount(mnt)
    closed = False
    try:
        dog = Watchdog(PERIOD, device_stalled_for=lambda now: 0.0, mountpoint=mnt,
                       fuse_limit=LIMIT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dog.run)
            while dog.probe.stalled_for(time.monotonic()) <= LIMIT:
                await trio.sleep(0.02)
            assert await pings.none_for(5 * dog.interval)
            assert dog.probe.probes == 0
            assert dog.stalled(time.monotonic()).startswith("the mount has not answered")
            os.close(fd)  # the last reference: the kernel aborts the connection
            closed = True
            assert await pings.next(10) == b"WATCHDOG=1"  # the probe got its (error) answer
            assert dog.probe.probes >= 1
            nursery.cancel_scope.cancel()
    finally:
        if not closed:
            os.close(fd)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def start_kvpfs(tmp_path: Path, address: Path, **env: str) -> KvpfsProcess:
    kvpfs = KvpfsProcess(tmp_path)
    kvpfs.mnt.mkdir(parents=True)
    with open(kvpfs.log, "wb") as log:
        kvpfs.proc = subprocess.Popen(
            [str(KVPFS), "mount", str(kvpfs.mnt), "--simulate", "--pool-dir", str(kvpfs.pools),
             "--control", str(kvpfs.control)],
            env={**os.environ, "NOTIFY_SOCKET": str(address), **env},
            stdout=subprocess.DEVNULL, stderr=log)
    return kvpfs


@requires_fuse
@pytest.mark.parametrize("ours", [True, False])
def test_kvpfs_pings_while_idle(tmp_path, ours):
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(address))
        notify.settimeout(20)
        env = {"WATCHDOG_USEC": "1000000"}
        if not ours:
            env["WATCHDOG_PID"] = "1"
        kvpfs = start_kvpfs(tmp_path, address, **env)
        try:
            assert notify.recv(100) == b"READY=1"
            if ours:
                times = []
                for _ in range(10):
                    assert notify.recv(100) == b"WATCHDOG=1"
                    times.append(time.monotonic())
                gaps = [b - a for a, b in itertools.pairwise(times)]
                print(f"pings every {sum(gaps) / len(gaps):.3f} s, longest gap {max(gaps):.3f} s"
                      " (WatchdogSec=1)")
            else:
                notify.settimeout(2)  # 8 ping intervals
                with pytest.raises(TimeoutError):
                    notify.recv(100)
            assert kvpfs.stop() == 0
            assert ("watchdog pings every 0.25 s" in kvpfs.output()) == ours
        finally:
            kvpfs.cleanup()
