"""The IP-info service inside a DeviceServer, through the simulated host's byte protocol.

A Store, the device server and fake network programs that run as real subprocesses (they
sleep, record their arguments, and are killed at shutdown): what the host sees of
GET_IP_INFO and SET_IP_INFO, and that a slow activation never stalls the loop or answers
another request.  The pure parts are tested in tests/bytes/test_ipinfo.py.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import trio

from kvpfs.host import simulator
from kvpfs.host.intrinsic import FqdnCache, Intrinsics, OsInfo
from kvpfs.host.netconfig import IpInfoService
from kvpfs.host.server import Deferred, DeviceServer
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.store import Store
from kvpfs.wire import kernelside, protocol
from kvpfs.wire.protocol import Op, Status
from tests.support.fakenet import GUIDS, FakeSystem, set_request, write


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    system = FakeSystem(tmp_path)
    monkeypatch.setenv("PATH", f"{system.bin}{os.pathsep}{os.environ['PATH']}")
    return system


async def test_service_answers_through_the_simulated_host(fake: FakeSystem, tmp_path: Path,
                                                         ) -> None:
    """GET and SET through the byte protocol; a slow SET does not stall the trio loop."""
    fake.fake_program("nmcli", sleep=0.5)
    store = Store(tmp_path / "pools", lock_timeout=0.5, poll_interval=0.05)
    await store.open()
    host = SimulatedHost(timeout=10, initial_pool3=())
    server = DeviceServer(host, store, Intrinsics(FqdnCache(bound=0.1),
                                                  os_info=OsInfo("T", "1", "")),
                          ip_info=IpInfoService(fake.settings()))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(server.run)
        unknown = await host.ip_get("00:15:5D:99:99:99")
        assert unknown.status == Status.E_FAIL
        assert (await host.ip_get("not a mac")).status == Status.INVALIDARG
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.01)
                ticks += 1

        nursery.start_soon(ticker)
        started = trio.current_time()
        result = await host.ip_set(GUIDS["hv0"], "192.0.2.10", "255.255.255.0", "192.0.2.1",
                                   "192.0.2.53")
        assert result.ok, result.status_name
        assert trio.current_time() - started >= 1.0  # two nmcli runs of 0.5 s each
        assert ticks >= 30  # the loop kept running meanwhile
        bad = await host.ip_set(GUIDS["hv0"], "192.0.2.10", "255.255.0.255")
        assert bad.status == Status.INVALIDARG
        missing = await host.ip_set("{00000000-0000-0000-0000-000000000000}", "192.0.2.10", "24")
        assert missing.status == Status.GUID_NOTFOUND
        assert (await host.set(1, "still", "serving")).ok
        nursery.cancel_scope.cancel()
    store.close()


async def test_slow_activation_never_answers_another_request(fake: FakeSystem,
                                                             tmp_path: Path) -> None:
    """SET_IP_INFO whose nmcli runs outlast the kernel's (shrunk) timeout: the host gets S_OK
    once the keyfile is written, and the requests after it get their own answers."""
    fake.fake_program("nmcli", sleep=0.8)  # load + up: 1.6 s, the kernel gives up at 1 s
    store = Store(tmp_path / "pools", lock_timeout=0.5, poll_interval=0.05)
    await store.open()
    host = SimulatedHost(timeout=1.0, initial_pool3=())
    service = IpInfoService(fake.settings())
    server = DeviceServer(host, store, Intrinsics(FqdnCache(bound=0.1),
                                                  os_info=OsInfo("T", "1", "")),
                          ip_info=service, reply_deadline=0.5, kernel_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await nursery.start(host.run)
        await nursery.start(server.run)
        assert (await host.set(1, "k", "v")).ok
        result = await host.ip_set(GUIDS["hv0"], "192.0.2.10", "255.255.255.0", "192.0.2.1",
                                   "192.0.2.53")
        assert result.ok, result.status_name
        keyfile = fake.out / "etc/NetworkManager/system-connections/hyperv-hv0.nmconnection"
        with trio.fail_after(10):  # put in place once the S_OK has reached the kernel
            while not keyfile.exists():
                await trio.sleep(0.01)
        assert "address1=192.0.2.10/24\ngateway=192.0.2.1\n" in keyfile.read_text()
        assert service.activations_succeeded == 0  # still activating
        assert await host.list(1) == [("k", "v")]
        own = simulator.ip_info_as_host_sees(await trio.to_thread.run_sync(
            service.get_reply, protocol.IpInfoRequest(Op.GET_IP_INFO, 0, "00:15:5D:00:20:01",
                                                      0, 0, "", "", "", "")))
        assert own.ok and own.adapter_id == "00:15:5D:00:20:01"
        assert await host.ip_get("00:15:5D:00:20:01") == own
        with trio.fail_after(10):
            while service.activations_succeeded + service.activations_failed == 0:
                await trio.sleep(0.02)
        assert service.activations_succeeded == 1
        assert [call[:3] for call in fake.recorded()] == [
            ["nmcli", "connection", "load"], ["nmcli", "--wait", "3"]]
        assert (host.timeouts, host.refused_writes, host.registrations) == (0, 0, 1)
        assert (await host.enumerate(1, 0)).key == "k"
        nursery.cancel_scope.cancel()
    store.close()


async def test_activation_is_cancelled_cleanly_at_shutdown(fake: FakeSystem) -> None:
    pid_file = fake.root / "nmcli.pid"
    write(fake.bin / "nmcli", textwrap.dedent(f"""\
        #!/usr/bin/python3
        import os, time
        with open({str(pid_file)!r}, "w") as out:
            out.write(str(os.getpid()))
        time.sleep(60)
        """), 0o755)
    service = IpInfoService(fake.settings(timeout=120))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        reply = await service(set_request(GUIDS["hv0"], "192.0.2.10", "24"))
        assert isinstance(reply, Deferred)  # activation waits until the reply is delivered
        assert kernelside.decode_daemon_message(reply.reply).status == Status.S_OK
        reply.commit()
        with trio.fail_after(10):
            while not pid_file.exists() or not pid_file.read_text():
                await trio.sleep(0.02)
        pid = int(pid_file.read_text())
        nursery.cancel_scope.cancel()
    assert not os.path.exists(f"/proc/{pid}")  # terminated and reaped, not left behind
    assert service.activations_started == 1 and service.activations_succeeded == 0
