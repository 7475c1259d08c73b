"""DeviceServer (kvpfs.host.server) driven by the simulated host over the real byte protocol.

Each test runs a SimulatedHost (the kernel + Hyper-V host), a DeviceServer that opens it like
/dev/vmbus/hv_kvp, and a Store over pool files in tmp_path, all in one trio nursery.  The host
side applies the kernel's UTF-16 conversions, so results are what a Hyper-V host would see;
malformed messages are sent as raw 7432-byte requests with host.transact().
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from kvpfs.host.intrinsic import KEYS, FqdnCache, Intrinsics, OsInfo
from kvpfs.host.server import DeviceServer
from kvpfs.host.simulator import SYNTHETIC_POOL3, SimulatedHost
from kvpfs.storage.store import ChangeKind, Origin, Store
from kvpfs.wire import kernelside, protocol
from kvpfs.wire.protocol import Op, Status
from tests.support.lockholder import start_locker, stop_locker

RECORD = 2560
KEY_FIELD = 512
VALUE_FIELD = 2048
STORED_POOLS = (0, 1, 3, 4)
OS_INFO = OsInfo("Test Linux", "42", "")


# --------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    host: SimulatedHost
    server: DeviceServer
    store: Store
    fqdn: FqdnCache
    pool_dir: Path
    nursery: trio.Nursery

    def path(self, pool: int) -> Path:
        return self.pool_dir / f".kvp_pool_{pool}"

    def snapshot(self) -> dict[int, bytes]:
        return {n: self.path(n).read_bytes() for n in range(5)}

    async def status(self, raw: bytes) -> int:
        return kernelside.decode_daemon_message(await self.host.transact(raw)).status


def failing_resolver(hostname: str) -> str:
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


async def start_rig(
    nursery: trio.Nursery,
    pool_dir: Path,
    *,
    initial_pool3: tuple[tuple[str, str], ...] = (),
    version: str = "3.1",
    host_timeout: float = 5.0,
) -> Rig:
    store = Store(pool_dir, lock_timeout=0.5, poll_interval=0.05)
    await store.open()
    fqdn = FqdnCache(bound=0.5, resolver=failing_resolver)
    host = SimulatedHost(timeout=host_timeout, initial_pool3=initial_pool3, version=version)
    server = DeviceServer(host, store, Intrinsics(fqdn, os_info=OS_INFO), reopen_delay=0.02)
    await nursery.start(host.run)
    await nursery.start(server.run)
    return Rig(host, server, store, fqdn, pool_dir, nursery)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with trio.open_nursery() as nursery:
        r = await start_rig(nursery, tmp_path / "pools")
        yield r
        nursery.cancel_scope.cancel()
    r.store.close()


def file_pairs(path: Path) -> list[tuple[bytes, bytes]]:
    """(key, value) of each 2560-byte slot cut at the first NUL, parsed independently."""
    data = path.read_bytes()
    assert len(data) % RECORD == 0
    out = []
    for i in range(0, len(data), RECORD):
        s = data[i : i + RECORD]
        out.append((s[:KEY_FIELD].split(b"\0", 1)[0], s[KEY_FIELD:].split(b"\0", 1)[0]))
    return out


def raw_slot(key: bytes, value: bytes, key_tail: bytes = b"") -> bytes:
    k = (key + b"\0" + key_tail)[:KEY_FIELD].ljust(KEY_FIELD, b"\0")
    return k + (value + b"\0")[:VALUE_FIELD].ljust(VALUE_FIELD, b"\0")


def external_append(path: Path, slot: bytes) -> None:
    """Append like cloud-init: O_APPEND, flock(LOCK_EX), one whole record."""
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(slot)
        f.flush()


async def wait_for(predicate, timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# --------------------------------------------------------------------------- basic operations


@pytest.mark.parametrize("pool", STORED_POOLS)
async def test_set_get_delete_enumerate(rig: Rig, pool: int) -> None:
    host = rig.host
    assert (await host.set(pool, "alpha", "first-long-value")).status == Status.S_OK
    assert (await host.set(pool, "beta", "b")).status == Status.S_OK
    assert (await host.set(pool, "alpha", "v2")).status == Status.S_OK
    assert await host.list(pool) == [("alpha", "v2"), ("beta", "b")]

    got = await host.get(pool, "alpha")
    assert (got.status, got.value) == (Status.S_OK, "v2")  # the reference daemon sends ""
    assert (await host.get(pool, "missing")).status == Status.S_CONT
    assert (await host.enumerate(pool, 2)).status == Status.S_CONT
    assert (await host.enumerate(pool, 0xFFFFFFFF)).status == Status.S_CONT

    assert (await host.delete(pool, "alpha")).status == Status.S_OK
    assert (await host.delete(pool, "alpha")).status == Status.S_CONT
    assert (await host.delete(pool, "never-there")).status == Status.S_CONT
    assert (await host.get(pool, "alpha")).status == Status.S_CONT
    assert await host.list(pool) == [("beta", "b")]
    assert (await host.enumerate(pool, 1)).status == Status.S_CONT

    # The pool file says the same, and no other pool was touched.
    assert file_pairs(rig.path(pool)) == [(b"beta", b"b")]
    for other in set(range(5)) - {pool}:
        assert rig.path(other).read_bytes() == b""


async def test_pools_are_separate(rig: Rig) -> None:
    for pool in STORED_POOLS:
        assert (await rig.host.set(pool, "shared", f"pool {pool}")).ok
    for pool in STORED_POOLS:
        assert (await rig.host.get(pool, "shared")).value == f"pool {pool}"
    assert (await rig.host.delete(0, "shared")).ok
    assert (await rig.host.get(0, "shared")).status == Status.S_CONT
    assert (await rig.host.get(1, "shared")).value == "pool 1"


async def test_host_set_is_seen_by_store_and_listeners(rig: Rig) -> None:
    seen = []

    async def listener(changes):
        seen.extend(changes)

    rig.store.add_listener(listener)
    assert (await rig.host.set(0, "from-host", "x")).ok
    assert rig.store.get(0, b"from-host") == b"x"
    assert [(c.kind, c.key, c.origin) for c in seen] == [
        (ChangeKind.SET, b"from-host", Origin.HOST)]


async def test_guest_write_is_seen_by_host(rig: Rig) -> None:
    await rig.store.set(1, b"guest-key", b"guest value", Origin.MOUNT)
    assert await rig.host.list(1) == [("guest-key", "guest value")]
    got = await rig.host.get(1, "guest-key")
    assert (got.status, got.value) == (Status.S_OK, "guest value")


async def test_exact_key_match_only(rig: Rig) -> None:
    host = rig.host
    assert (await host.set(0, "gamma", "g-value")).ok
    before = rig.snapshot()

    # key "gamma" in the buffer but key_size 2: the reference daemon would memcmp 2 bytes
    # ("ga") and delete gamma; a key_size that disagrees with the string is refused.
    lying = bytearray(kernelside.encode_delete_request(0, b"gamma"))
    struct.pack_into("<I", lying, 4, 2)
    assert await rig.status(bytes(lying)) == Status.E_FAIL
    # key "g" with key_size 1 (the observed prefix-match case) is refused the same way.
    short = bytearray(kernelside.encode_delete_request(0, b"g"))
    struct.pack_into("<I", short, 4, 1)
    assert await rig.status(bytes(short)) == Status.E_FAIL
    # A consistent key_size of 2 for key "g" is just a key that does not exist.
    assert await rig.status(kernelside.encode_delete_request(0, b"g")) == Status.S_CONT
    assert (await host.delete(0, "gam")).status == Status.S_CONT
    assert (await host.delete(0, "Gamma")).status == Status.S_CONT
    assert (await host.delete(0, "gamma2")).status == Status.S_CONT
    assert (await host.get(0, "gam")).status == Status.S_CONT
    # A SET with a short key_size must not modify gamma either.
    set_short = bytearray(kernelside.encode_set_request(0, b"gamma", b"hijacked"))
    struct.pack_into("<I", set_short, 8, 2)
    assert await rig.status(bytes(set_short)) == Status.E_FAIL

    assert rig.snapshot() == before
    assert await host.list(0) == [("gamma", "g-value")]


async def test_non_ascii_keys_and_values_round_trip(rig: Rig) -> None:
    items = [
        ("ключ", "значение"),
        ("café ☃", "日本語 テキスト"),
        ("emoji-🎉", "value with 🎉 and 𝄞"),
    ]
    for key, value in items:
        assert (await rig.host.set(4, key, value)).ok
    assert await rig.host.list(4) == items
    for key, value in items:
        got = await rig.host.get(4, key)
        assert (got.status, got.value) == (Status.S_OK, value)
        assert rig.store.get(4, key.encode()) == value.encode()
    assert file_pairs(rig.path(4)) == [(k.encode(), v.encode()) for k, v in items]
    assert (await rig.host.delete(4, "café ☃")).ok
    assert [k for k, _ in await rig.host.list(4)] == ["ключ", "emoji-🎉"]


# --------------------------------------------------------------------------- size limits


async def test_host_value_is_capped_at_2047_bytes(rig: Rig) -> None:
    assert (await rig.host.set(0, "big", "v" * 3000)).ok
    assert rig.store.get(0, b"big") == b"v" * 2047
    assert file_pairs(rig.path(0)) == [(b"big", b"v" * 2047)]
    # Coming back, the kernel passes at most 1022 UTF-16 units to the host.
    assert (await rig.host.get(0, "big")).value == "v" * 1022


async def test_host_non_ascii_value_is_capped_on_a_character_boundary(rig: Rig) -> None:
    assert (await rig.host.set(0, "big", "日" * 1000)).ok  # 3000 bytes of UTF-8
    assert rig.store.get(0, b"big") == "日".encode() * 682  # 2046 bytes: no split character


async def test_host_key_is_capped_at_511_bytes(rig: Rig) -> None:
    long_key = "k" * 600
    assert (await rig.host.set(0, long_key, "v")).ok
    assert rig.store.get(0, b"k" * 511) == b"v"
    assert await rig.host.list(0) == [("k" * 254, "v")]  # 254 units on the way back
    assert (await rig.host.get(0, long_key)).value == "v"  # same cap on the way down


async def test_guest_value_reaches_host_truncated_to_1022_units(rig: Rig) -> None:
    await rig.store.set(1, b"report", b"x" * 1500, Origin.MOUNT)
    item = await rig.host.enumerate(1, 0)
    assert (item.status, item.key, item.value) == (Status.S_OK, "report", "x" * 1022)
    assert (await rig.host.get(1, "report")).value == "x" * 1022
    assert rig.store.get(1, b"report") == b"x" * 1500  # the guest copy is whole


async def test_cloud_init_512_byte_key_without_nul_is_served(rig: Rig) -> None:
    # struct.pack("512s") leaves no NUL for a 512-byte key: the record is kept but the
    # message field holds at most 511 bytes, so it is sent cut (the host keeps 254 units).
    key = b"CLOUD_INIT|" + b"k" * (KEY_FIELD - 11)
    external_append(rig.path(1), key + b"ok".ljust(VALUE_FIELD, b"\0"))
    await rig.store.check_external_changes()
    item = await rig.host.enumerate(1, 0)
    assert (item.status, item.key, item.value) == (Status.S_OK, key[:254].decode(), "ok")


async def test_invalid_utf8_record_never_reaches_host(rig: Rig) -> None:
    path = rig.path(1)
    external_append(path, raw_slot(b"before", b"1"))
    external_append(path, raw_slot(b"bad-\xff", b"x"))
    external_append(path, raw_slot(b"bad-value", b"\xc3("))
    external_append(path, raw_slot(b"after", b"2"))
    await rig.store.check_external_changes()
    assert await rig.host.list(1) == [("before", "1"), ("after", "2")]
    assert (await rig.host.enumerate(1, 2)).status == Status.S_CONT
    assert (await rig.host.get(1, "bad-value")).status == Status.S_CONT
    # Deleting around it keeps it on disk, still invisible.
    assert (await rig.host.delete(1, "before")).ok
    assert await rig.host.list(1) == [("after", "2")]
    assert [k for k, _ in file_pairs(path)] == [b"bad-\xff", b"bad-value", b"after"]


# --------------------------------------------------------------------------- pool 2


async def test_pool_2_intrinsic_keys(rig: Rig) -> None:
    await rig.fqdn.refresh_once()  # the resolver fails: the host name is reported
    items = await rig.host.list(2)
    assert [k for k, _ in items] == list(KEYS)
    values = dict(items)
    assert values["IntegrationServicesVersion"] == "3.1"
    assert (await rig.host.enumerate(2, 10)).status == Status.S_CONT
    assert (await rig.host.enumerate(2, 1000)).status == Status.S_CONT

    fqdn = values["FullyQualifiedDomainName"]
    assert fqdn == socket.gethostname()
    assert "getaddrinfo" not in fqdn and "failed" not in fqdn.lower()

    v4 = [a for a in values["NetworkAddressIPv4"].split(";") if a]
    assert "127.0.0.1" not in v4
    assert all(isinstance(ipaddress.ip_address(a), ipaddress.IPv4Address) for a in v4)
    assert all(not ipaddress.ip_address(a).is_loopback for a in v4)
    v6 = [a for a in values["NetworkAddressIPv6"].split(";") if a]
    assert "::1" not in v6
    assert all(isinstance(ipaddress.ip_address(a), ipaddress.IPv6Address) for a in v6)

    uname = os.uname()
    assert values["OSBuildNumber"] == uname.release
    assert values["OSVersion"] == uname.release.split("-", 1)[0]
    assert values["ProcessorArchitecture"] == uname.machine
    assert (values["OSName"], values["OSMajorVersion"], values["OSMinorVersion"]) == (
        "Test Linux",
        "42",
        "",
    )
    got = await rig.host.get(2, "OSName")
    assert (got.status, got.value) == (Status.S_OK, "Test Linux")
    assert (await rig.host.get(2, "NoSuchIntrinsic")).status == Status.S_CONT


async def test_integration_version_comes_from_registration_reply(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await start_rig(nursery, tmp_path / "pools", version="9.7-test")
        assert rig.server.version == "9.7-test"
        item = await rig.host.enumerate(2, 1)
        assert (item.key, item.value) == ("IntegrationServicesVersion", "9.7-test")
        nursery.cancel_scope.cancel()
    rig.store.close()


async def test_pool_2_set_and_delete_not_supported(rig: Rig) -> None:
    assert (await rig.host.set(2, "OSName", "Hacked")).status == Status.ERROR_NOT_SUPPORTED
    assert (await rig.host.delete(2, "OSName")).status == Status.ERROR_NOT_SUPPORTED
    assert rig.path(2).read_bytes() == b""
    assert dict(await rig.host.list(2))["OSName"] == "Test Linux"


async def test_ip_info_and_unknown_ops_not_supported(rig: Rig) -> None:
    get_ip = kernelside.encode_ip_info_request(Op.GET_IP_INFO, "00:15:5D:00:00:01", 1)
    set_ip = kernelside.encode_ip_info_request(
        Op.SET_IP_INFO,
        "{5B0C7C0E-2F4A-4D4B-9B8E-3C1D2E0F4A11}",
        1,
        0,
        "192.0.2.10",
        "255.255.255.0",
        "192.0.2.1",
        "192.0.2.53",
    )
    assert await rig.status(get_ip) == Status.ERROR_NOT_SUPPORTED
    assert await rig.status(set_ip) == Status.ERROR_NOT_SUPPORTED
    assert await rig.status(bytes(kernelside.encode_raw(7, 0))) == Status.ERROR_NOT_SUPPORTED
    assert await rig.status(bytes(kernelside.encode_raw(6, 1))) == Status.ERROR_NOT_SUPPORTED
    # op 100 after the handshake is not a registration.
    assert await rig.status(protocol.encode_register()) == Status.ERROR_NOT_SUPPORTED
    assert rig.host.registrations == 1
    assert (await rig.host.set(0, "still", "serving")).ok


# --------------------------------------------------------------------------- malformed


def malformed_messages() -> dict[str, bytes]:
    msgs: dict[str, bytes] = {}
    msgs["set pool 9"] = kernelside.encode_set_request(9, b"k", b"v")
    msgs["delete pool 9"] = kernelside.encode_delete_request(9, b"k")
    msgs["get pool 9"] = kernelside.encode_get_request(9, b"k")
    msgs["enumerate pool 9"] = kernelside.encode_enumerate_request(9, 0)

    lying = bytearray(kernelside.encode_set_request(1, b"abc", b"v"))
    struct.pack_into("<I", lying, 8, 10)  # key_size 10 for a 3-byte key
    msgs["set lying key_size"] = bytes(lying)
    lying = bytearray(kernelside.encode_set_request(1, b"abc", b"value"))
    struct.pack_into("<I", lying, 12, 3)  # value_size 3 for a 5-byte value
    msgs["set lying value_size"] = bytes(lying)
    lying = bytearray(kernelside.encode_set_request(1, b"abc", b"v"))
    struct.pack_into("<I", lying, 8, 600)  # beyond the 512-byte key field
    msgs["set key_size > 512"] = bytes(lying)
    lying = bytearray(kernelside.encode_delete_request(1, b"abc"))
    struct.pack_into("<I", lying, 4, 0)
    msgs["delete key_size 0"] = bytes(lying)
    empty = bytearray(kernelside.encode_raw(Op.SET, 1))
    struct.pack_into("<I", empty, 8, 1)  # empty key with key_size 1
    struct.pack_into("<I", empty, 12, 2)
    empty[528] = ord("v")
    msgs["set empty key"] = bytes(empty)

    no_nul = bytearray(kernelside.encode_raw(Op.SET, 1))
    no_nul[16:528] = b"k" * KEY_FIELD
    struct.pack_into("<I", no_nul, 8, KEY_FIELD)
    msgs["set key without NUL"] = bytes(no_nul)
    no_nul = bytearray(kernelside.encode_set_request(1, b"k", b""))
    no_nul[528 : 528 + VALUE_FIELD] = b"v" * VALUE_FIELD
    struct.pack_into("<I", no_nul, 12, VALUE_FIELD)
    msgs["set value without NUL"] = bytes(no_nul)
    no_nul = bytearray(kernelside.encode_raw(Op.DELETE, 1))
    no_nul[8:520] = b"k" * KEY_FIELD
    struct.pack_into("<I", no_nul, 4, KEY_FIELD)
    msgs["delete key without NUL"] = bytes(no_nul)

    msgs["set invalid UTF-8 key"] = kernelside.encode_set_request(1, b"k\xff\xfe", b"v")
    msgs["set invalid UTF-8 value"] = kernelside.encode_set_request(1, b"k", b"\xc3(")
    msgs["delete invalid UTF-8 key"] = kernelside.encode_delete_request(1, b"\xed\xa0\x80")
    msgs["get overlong UTF-8 key"] = kernelside.encode_get_request(1, b"\xc0\xaf")
    return msgs


async def test_malformed_messages_fail_and_change_nothing(rig: Rig) -> None:
    assert (await rig.host.set(1, "k", "original")).ok
    assert (await rig.host.set(0, "k", "original")).ok
    before = rig.snapshot()
    for name, message in malformed_messages().items():
        assert await rig.status(message) == Status.E_FAIL, name
        # The server keeps serving after each one.
        assert (await rig.host.get(1, "k")).value == "original", name
    assert rig.snapshot() == before
    assert rig.host.registrations == 1
    assert (await rig.host.set(1, "after", "ok")).ok
    assert await rig.host.list(1) == [("k", "original"), ("after", "ok")]


# --------------------------------------------------------------------------- lifecycle


async def test_initial_pool3_push_lands_in_pool_3(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        rig = await start_rig(nursery, tmp_path / "pools", initial_pool3=SYNTHETIC_POOL3)
        await wait_for(lambda: len(rig.store.states[3].records) == len(SYNTHETIC_POOL3))
        assert await rig.host.list(3) == list(SYNTHETIC_POOL3)
        assert file_pairs(rig.path(3)) == [(k.encode(), v.encode()) for k, v in SYNTHETIC_POOL3]
        for n in (0, 1, 2, 4):
            assert rig.path(n).read_bytes() == b""
        nursery.cancel_scope.cancel()
    rig.store.close()


async def test_disconnect_reopens_and_registers_again(rig: Rig) -> None:
    assert (await rig.host.set(0, "before", "1")).ok
    assert (rig.host.registrations, rig.server.registrations) == (1, 1)
    rig.host.disconnect()
    await wait_for(lambda: rig.host.registrations == 2)
    assert rig.server.registrations == 2
    assert (await rig.host.set(0, "after", "2")).ok
    assert await rig.host.list(0) == [("before", "1"), ("after", "2")]
    # Again, to be sure it was not a one-off.
    rig.host.disconnect()
    assert (await rig.host.get(0, "after")).value == "2"  # waits for the re-registration
    assert rig.host.registrations == 3


async def test_foreign_lock_gives_host_quick_e_fail(rig: Rig) -> None:
    assert (await rig.host.set(1, "existing", "1")).ok
    path = rig.path(1)
    before = path.read_bytes()
    proc = start_locker(path)
    try:
        started = time.monotonic()
        result = await rig.host.set(1, "blocked", "x")
        elapsed = time.monotonic() - started
        assert result.status == Status.E_FAIL
        assert elapsed < 2.0  # the store's lock timeout (0.5 s), far below the kernel's 30 s
        assert (await rig.host.delete(1, "existing")).status == Status.E_FAIL
        # Reads come from memory and keep working meanwhile.
        assert await rig.host.list(1) == [("existing", "1")]
        assert (await rig.host.get(1, "existing")).value == "1"
        assert path.read_bytes() == before
    finally:
        stop_locker(proc)
    assert (await rig.host.set(1, "blocked", "x")).ok
    assert await rig.host.list(1) == [("existing", "1"), ("blocked", "x")]
    assert rig.host.registrations == 1  # no timeout, no re-registration


async def test_external_change_visible_to_host_within_a_second(rig: Rig) -> None:
    rig.nursery.start_soon(rig.store.watch)
    assert (await rig.host.set(0, "a", "1")).ok
    external_append(rig.path(0), raw_slot(b"ignition.config", b'{"ignition":{}}', b"stale"))
    started = time.monotonic()
    with trio.fail_after(1.0):
        while ("ignition.config", '{"ignition":{}}') not in await rig.host.list(0):
            await trio.sleep(0.02)
    assert time.monotonic() - started < 1.0
    assert (await rig.host.get(0, "ignition.config")).value == '{"ignition":{}}'
    # An external delete (the file truncated) is seen as well.
    with open(rig.path(0), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(RECORD)
    with trio.fail_after(1.0):
        while (await rig.host.get(0, "ignition.config")).status != Status.S_CONT:
            await trio.sleep(0.02)
    assert await rig.host.list(0) == [("a", "1")]


async def test_deleted_pool_file_does_not_stop_the_server(rig: Rig) -> None:
    assert (await rig.host.set(0, "a", "1")).ok
    rig.path(0).unlink()
    # The reference daemon exits here; we recreate the file and carry on.
    assert (await rig.host.set(0, "b", "2")).ok
    assert file_pairs(rig.path(0)) == [(b"b", b"2")]
    assert await rig.host.list(0) == [("b", "2")]


async def test_kernel_timeout_makes_server_register_again(tmp_path: Path) -> None:
    # A kernel timeout shorter than the store's lock timeout: the host gets E_FAIL from the
    # kernel, the late reply cannot be delivered, and the server must reopen and register.
    async with trio.open_nursery() as nursery:
        rig = await start_rig(nursery, tmp_path / "pools", host_timeout=0.2)
        assert (await rig.host.set(1, "existing", "1")).ok
        proc = start_locker(rig.path(1))
        try:
            assert (await rig.host.set(1, "blocked", "x")).status == Status.E_FAIL
            assert rig.host.timeouts == 1  # the kernel's own E_FAIL, from its timer
            # The server is still waiting for the lock; once it gives up, its reply cannot
            # be delivered and it registers again.
            with trio.fail_after(2):
                while rig.host.registrations < 2:
                    await trio.sleep(0.01)
        finally:
            stop_locker(proc)
        assert (await rig.host.set(1, "later", "y")).ok
        assert await rig.host.list(1) == [("existing", "1"), ("later", "y")]
        assert rig.server.registrations == 2
        nursery.cancel_scope.cancel()
    rig.store.close()


# --------------------------------------------------------------------------- the device thread


class ThreadKernel:
    """A device whose kernel side a plain thread drives, so it keeps going while the test
    blocks the trio loop on purpose."""

    name = "thread-driven hv_kvp"

    def __init__(self) -> None:
        self.kernel: socket.socket | None = None

    async def open(self):
        from kvpfs.host.device import Channel

        guest, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.kernel = kernel
        return Channel(guest.detach(), self.name)

    def handshake(self) -> None:
        assert self.kernel is not None
        self.kernel.settimeout(5)
        assert self.kernel.recv(protocol.MESSAGE_SIZE + 1)[0] == Op.REGISTER1
        self.kernel.send(kernelside.encode_register_reply(Op.REGISTER1, "3.1"))

    def transact(self, request: bytes) -> tuple[int, bytes, bytes, float]:
        """Status, key and value as the kernel reads them, and when the reply came."""
        assert self.kernel is not None
        self.kernel.send(request)
        reply = self.kernel.recv(protocol.MESSAGE_SIZE + 1)
        answered = time.monotonic()
        assert len(reply) == protocol.MESSAGE_SIZE
        status = kernelside.decode_daemon_message(reply).status
        return (status, *kernelside.reply_key_value(reply), answered)


async def start_thread_kernel(nursery: trio.Nursery, store: Store) -> tuple[ThreadKernel,
                                                                            DeviceServer]:
    kernel = ThreadKernel()
    server = DeviceServer(kernel, store, Intrinsics(FqdnCache(resolver=lambda n: n),
                                                    os_info=OS_INFO))
    nursery.start_soon(server.run)
    with trio.fail_after(5):
        while kernel.kernel is None:
            await trio.sleep(0.001)
    await trio.to_thread.run_sync(kernel.handshake)
    with trio.fail_after(5):  # registered, and serving from the device thread
        while server.registrations < 1 or not any(
            t.name == "kvpfs device" for t in threading.enumerate()
        ):
            await trio.sleep(0.001)
    return kernel, server


async def store_holding(pool_dir: Path, items: list[tuple[bytes, bytes]]) -> Store:
    store = Store(pool_dir)
    await store.open()
    for key, value in items:
        await store.set(0, key, value, Origin.MOUNT)
    return store


async def test_reads_are_answered_while_the_trio_loop_is_busy(tmp_path: Path) -> None:
    """GET and ENUMERATE come from the device thread; a SET waits for the loop."""
    store = await store_holding(tmp_path / "pools", [(b"k%d" % n, b"v%d" % n) for n in range(3)])
    async with trio.open_nursery() as nursery:
        kernel, _ = await start_thread_kernel(nursery, store)
        results: list[tuple[int, bytes, bytes, float]] = []
        blocked = threading.Event()

        def host() -> None:
            blocked.wait(5)
            for n in range(4):
                results.append(kernel.transact(kernelside.encode_enumerate_request(0, n)))
            results.append(kernel.transact(kernelside.encode_get_request(0, b"k1")))
            results.append(kernel.transact(kernelside.encode_get_request(2, b"OSMajorVersion")))
            results.append(kernel.transact(kernelside.encode_set_request(0, b"new", b"n")))

        thread = threading.Thread(target=host)
        thread.start()
        blocked.set()
        time.sleep(1.0)  # the trio loop does nothing for a second: no task runs
        resumed = time.monotonic()
        await trio.to_thread.run_sync(thread.join, 10)
        assert not thread.is_alive()
        nursery.cancel_scope.cancel()
    store.close()
    reads, (set_status, *_, set_answered) = results[:-1], results[-1]
    assert [(status, value) for status, _, value, _ in reads] == [
        (Status.S_OK, b"v0"), (Status.S_OK, b"v1"), (Status.S_OK, b"v2"), (Status.S_CONT, b""),
        (Status.S_OK, b"v1"), (Status.S_OK, b"42"),
    ]
    assert [key for _, key, _, _ in reads[:3]] == [b"k0", b"k1", b"k2"]
    assert all(answered < resumed for *_, answered in reads), "a read waited for the loop"
    assert set_status == Status.S_OK and set_answered >= resumed
    assert store.get(0, b"new") == b"n"


async def test_host_reads_stay_consistent_while_the_loop_changes_the_pool(
    tmp_path: Path,
) -> None:
    """The device thread reads memory the trio thread is changing: every reply is a record
    that existed (value derived from its key) or the end of the pool; none is an error."""
    store = await store_holding(tmp_path / "pools",
                                [(b"base%d" % n, b"=base%d" % n) for n in range(50)])
    async with trio.open_nursery() as nursery:
        kernel, _ = await start_thread_kernel(nursery, store)
        stop = threading.Event()
        seen: list[tuple[int, bytes, bytes]] = []

        def host() -> None:
            index = 0
            while not stop.is_set():
                status, key, value, _ = kernel.transact(
                    kernelside.encode_enumerate_request(0, index))
                seen.append((status, key, value))
                index = 0 if status != Status.S_OK else index + 1

        thread = threading.Thread(target=host)
        thread.start()
        try:
            round_ = 0
            # at least 60 rounds, and on until the host has read a good deal meanwhile
            while round_ < 60 or (len(seen) < 200 and round_ < 5000):
                round_ += 1
                # appends, in-place changes, deletes of the newest and of a middle record
                await store.set(0, b"churn%d" % round_, b"=churn%d" % round_, Origin.MOUNT)
                await store.set(0, b"base%d" % (round_ % 50), b"=base%d" % (round_ % 50),
                                Origin.MOUNT)
                if round_ % 3 == 0:
                    await store.delete(0, b"churn%d" % round_, Origin.MOUNT)
                if round_ % 7 == 0:
                    await store.delete(0, b"churn%d" % (round_ - 1), Origin.MOUNT)
        finally:
            stop.set()
            await trio.to_thread.run_sync(thread.join, 10)
        nursery.cancel_scope.cancel()
    store.close()
    assert len(seen) > 100, "the host thread hardly ran"
    for status, key, value in seen:
        assert status in (Status.S_OK, Status.S_CONT), (status, key, value)
        if status == Status.S_OK:
            assert value == b"=" + key, (key, value)


async def test_cancelling_the_server_stops_the_device_thread(tmp_path: Path) -> None:
    """Cancellation reaches a thread blocked in poll and one whose SET is in the loop; the
    channel is closed only after the thread has let go, so the kernel side sees EOF."""
    store = Store(tmp_path / "pools", lock_timeout=5.0)
    await store.open()
    for case in ("idle", "set in flight"):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                kernel, _ = await start_thread_kernel(nursery, store)
                if case == "set in flight":
                    proc = start_locker(tmp_path / "pools" / ".kvp_pool_0")
                    try:
                        assert kernel.kernel is not None
                        kernel.kernel.send(kernelside.encode_set_request(0, b"k", b"v"))
                        await trio.sleep(0.2)  # handed over, waiting for the lock
                        scope.cancel()
                    finally:
                        stop_locker(proc)
                else:
                    await trio.sleep(0.1)
                    scope.cancel()
        assert scope.cancelled_caught
        assert kernel.kernel is not None
        kernel.kernel.settimeout(5)
        # whatever was in flight is dropped; then EOF, because the guest end is closed
        while kernel.kernel.recv(protocol.MESSAGE_SIZE + 1):
            assert case == "set in flight"
        assert not any(t.name == "kvpfs device" for t in threading.enumerate())
    store.close()
