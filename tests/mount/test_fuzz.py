"""Bad input, fuzzed: device messages, pool files, and names and values through the mount.

Device messages go through a real DeviceServer + SimulatedHost + Store in-process (trio),
as raw bytes with `host.transact()`. Every message is judged by an oracle written here from
the message layout (kvpfs/wire/protocol.py) and the documented contract (docs/host.md):
a well-formed SET/DELETE changes the model, anything malformed is answered E_FAIL and changes
nothing, unknown operations NOT_SUPPORTED, a message of the wrong size is a device error after
which kvpfs registers again. Checked after every message: kvpfs answered (7432 bytes, a status
the oracle allows, the right key/value for GET and ENUMERATE) and the server task still runs;
every batch: the pool files are byte for byte the zero-padded records of the model.

Pool files with truncated records, garbage after NULs, invalid UTF-8, unterminated fields,
duplicates, zero length, 20,000 records, and replaced by a directory or a symlink, at start
and while running: kvpfs serves what is valid, logs what it skips, and writes nothing but
clean records (untouched records stay byte-identical).

Through a real mount: keys and values at and around every limit, from the host and from
the shell, with the documented errno for each refusal and the pool file unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import shutil
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpfs.host.device import Channel
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.host.intrinsic import FqdnCache, Intrinsics, OsInfo
from kvpfs.host.server import DeviceServer
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.store import Store
from kvpfs.wire import kernelside, protocol
from tests.support.safety import (
    KEY_FIELD,
    RECORD,
    VALUE_FIELD,
    pool_file,
    record_figures,
    seeded_random,
    slot,
    slot_pair,
    split_slots,
)

# --------------------------------------------------------------------------- the wire, per spec

SIZE = 7432
S_OK, E_FAIL, S_CONT, NOT_SUPPORTED = 0, 0x80004005, 0x80070103, 0x80070032
GET, SET, DELETE, ENUMERATE, GET_IP_INFO, SET_IP_INFO, REGISTER1 = 0, 1, 2, 3, 4, 5, 100
# offsets in struct hv_kvp_msg (pinned in tests/bytes/test_protocol.py)
SET_KEY_SIZE, SET_VALUE_SIZE, SET_KEY, SET_VALUE = 8, 12, 16, 528
ENUM_INDEX, ENUM_KEY, ENUM_VALUE = 4, 20, 532
DEL_KEY_SIZE, DEL_KEY = 4, 8
IP_TEXT_FIELDS = ((4, 256), (262, 2048), (2310, 2048), (4358, 1024), (5382, 2048))
SIZE_FIELDS = (4, 8, 12, 16)
STORED = (0, 1, 3, 4)
U32 = struct.Struct("<I")

Effect = tuple  # ("set", pool, key, value) or ("delete", pool, key)


@dataclass
class Expect:
    statuses: frozenset[int]
    effect: Effect | None = None
    device_error: bool = False
    reply: tuple[bytes | None, bytes | None] | None = None  # (key, value) to see on S_OK


def _cstr(msg: bytes, offset: int, width: int) -> bytes | None:
    end = msg.find(b"\0", offset, offset + width)
    return None if end < 0 else msg[offset:end]


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _key(msg: bytes, size_at: int, at: int) -> bytes | None:
    """The key if the field is well-formed: NUL-terminated, non-empty, UTF-8, size = strlen+1."""
    size = U32.unpack_from(msg, size_at)[0]
    key = _cstr(msg, at, KEY_FIELD)
    if key is None or not key or size != len(key) + 1 or not _utf8(key):
        return None
    return key


def _value(msg: bytes, size_at: int, at: int) -> bytes | None:
    size = U32.unpack_from(msg, size_at)[0]
    value = _cstr(msg, at, VALUE_FIELD)
    if value is None or not _utf8(value):
        return None
    if size != len(value) + 1 and not (size == 0 and value == b""):
        return None
    return value


class Model:
    """The pools as the valid messages left them: records in file order."""

    def __init__(self) -> None:
        self.pools: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in STORED}

    def get(self, pool: int, key: bytes) -> bytes | None:
        found = [v for k, v in self.pools[pool] if k == key]
        return found[-1] if found else None

    def apply(self, effect: Effect) -> None:
        records = self.pools[effect[1]]
        if effect[0] == "set":
            _, _, key, value = effect
            slots = [i for i, (k, _) in enumerate(records) if k == key]
            if slots:
                records[slots[-1]] = (key, value)
            else:
                records.append((key, value))
        else:
            records[:] = [r for r in records if r[0] != effect[2]]

    def expect(self, raw: bytes) -> Expect:
        """What kvpfs must answer to `raw` and what it must change."""
        if len(raw) < SIZE:
            return Expect(frozenset({E_FAIL}), device_error=True)
        msg = raw[:SIZE]  # a longer packet is cut to one message by the read
        op, pool = msg[0], msg[1]
        if op in (GET, SET, DELETE, ENUMERATE):
            if pool > 4:
                return Expect(frozenset({E_FAIL}))
            if op == ENUMERATE:
                index = U32.unpack_from(msg, ENUM_INDEX)[0]
                if pool == 2:
                    if index < len(INTRINSIC_KEYS):
                        return Expect(frozenset({S_OK}),
                                      reply=(INTRINSIC_KEYS[index].encode(), None))
                    return Expect(frozenset({S_CONT}))
                if index < len(self.pools[pool]):
                    return Expect(frozenset({S_OK}), reply=self.pools[pool][index])
                return Expect(frozenset({S_CONT}))
            size_at, at = (DEL_KEY_SIZE, DEL_KEY) if op == DELETE else (SET_KEY_SIZE, SET_KEY)
            key = _key(msg, size_at, at)
            if key is None:
                return Expect(frozenset({E_FAIL}))
            if op == GET:
                if pool == 2:
                    known = key.decode() in INTRINSIC_KEYS
                    return Expect(frozenset({S_OK if known else S_CONT}))
                value = self.get(pool, key)
                if value is None:
                    return Expect(frozenset({S_CONT}))
                return Expect(frozenset({S_OK}), reply=(None, value))
            if op == SET:
                value = _value(msg, SET_VALUE_SIZE, SET_VALUE)
                if value is None:
                    return Expect(frozenset({E_FAIL}))
                if pool == 2:
                    return Expect(frozenset({NOT_SUPPORTED}))
                return Expect(frozenset({S_OK}), effect=("set", pool, key, value))
            if pool == 2:
                return Expect(frozenset({NOT_SUPPORTED}))
            present = self.get(pool, key) is not None
            return Expect(frozenset({S_OK if present else S_CONT}),
                          effect=("delete", pool, key) if present else None)
        if op in (GET_IP_INFO, SET_IP_INFO):
            well_formed = all(_cstr(msg, at, width) is not None and _utf8(
                _cstr(msg, at, width) or b"") for at, width in IP_TEXT_FIELDS)
            return Expect(frozenset({NOT_SUPPORTED} if well_formed else {E_FAIL}))
        return Expect(frozenset({NOT_SUPPORTED}))  # unknown, REGISTER1 outside a handshake

    def file_bytes(self, pool: int) -> bytes:
        return b"".join(slot(k, v) for k, v in self.pools[pool])


# --------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    host: SimulatedHost
    server: DeviceServer
    store: Store
    pool_dir: Path
    nursery: trio.Nursery
    server_running: bool = False
    figures: dict[str, int] = field(default_factory=lambda: {
        "messages": 0, "device_errors": 0, "valid_changes": 0, "refused": 0})

    async def run_server(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.server_running = True
        try:
            await self.server.run(task_status=task_status)
        finally:
            self.server_running = False

    async def send(self, raw: bytes, model: Model) -> bytes:
        """One message, judged by the model; returns the reply."""
        expect = model.expect(raw)
        registrations = self.host.registrations
        reply = await self.host.transact(raw)
        self.figures["messages"] += 1
        assert len(reply) == SIZE, f"reply of {len(reply)} bytes to {describe(raw)}"
        status = U32.unpack_from(reply, 0)[0]
        assert status in expect.statuses, (
            f"status 0x{status:08X} to {describe(raw)}; expected "
            + " or ".join(f"0x{s:08X}" for s in sorted(expect.statuses)))
        if expect.reply is not None and status == S_OK:
            key, value = expect.reply
            if key is not None:
                assert _cstr(reply, ENUM_KEY, KEY_FIELD) == key, describe(raw)
            if value is not None:
                assert _cstr(reply, ENUM_VALUE, VALUE_FIELD) == value, describe(raw)
        if expect.effect is not None:
            model.apply(expect.effect)
            self.figures["valid_changes"] += 1
        elif status == E_FAIL:
            self.figures["refused"] += 1
        if expect.device_error:
            self.figures["device_errors"] += 1
            with trio.fail_after(5):  # kvpfs must reopen the device and register again
                while self.host.registrations <= registrations:
                    await trio.sleep(0.001)
        assert self.server_running, f"the server task ended after {describe(raw)}"
        return reply

    def check_files(self, model: Model) -> int:
        """Pool files == model, byte for byte; returns the records checked."""
        checked = 0
        for pool in range(5):
            data = pool_file(self.pool_dir, pool).read_bytes()
            expected = model.file_bytes(pool) if pool in STORED else b""
            if data != expected:
                got = [slot_pair(s) for s in split_slots(data)]
                want = model.pools.get(pool, [])
                raise AssertionError(f"pool {pool} differs from the model:\n got  {got[:8]}\n"
                                     f" want {want[:8]}")
            checked += len(data) // RECORD
        return checked


def describe(raw: bytes) -> str:
    head = raw[:2].hex() if raw else ""
    return f"message of {len(raw)} bytes (op/pool {head}, bytes 4..24 {raw[4:24].hex()})"


@contextlib.asynccontextmanager
async def serving(pool_dir: Path, *, watch: bool = False) -> AsyncIterator[Rig]:
    store = Store(pool_dir, lock_timeout=1.0, poll_interval=0.05)
    await store.open()
    host = SimulatedHost(timeout=10.0, initial_pool3=())
    intrinsics = Intrinsics(FqdnCache(resolver=lambda name: name), os_info=OsInfo("F", "1", ""))
    server = DeviceServer(host, store, intrinsics, reopen_delay=0.002, max_reopen_delay=0.05)
    try:
        async with trio.open_nursery() as nursery:
            rig = Rig(host, server, store, pool_dir, nursery)
            await nursery.start(host.run)
            await nursery.start(rig.run_server)
            if watch:
                nursery.start_soon(store.watch)
            yield rig
            assert rig.server_running
            nursery.cancel_scope.cancel()
    finally:
        store.close()


# --------------------------------------------------------------------------- message building

KEYS = [b"k", b"key", b"K\xc3\xa9y", "😀".encode(), b"a/b", b"..", b"x" * 511, b"x" * 510,
        b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]
VALUES = [b"", b"v", b"value", "€".encode() * 5, b"x" * 2047, b"y" * 2046, b"\xff\xfe",
          b"ok\xe2\x82"]
INTERESTING_U32 = [0, 1, 2, 3, 4, 5, 6, 510, 511, 512, 513, 1023, 1024, 2046, 2047, 2048, 2049,
                   4096, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
BAD_UTF8 = [b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90"]
LENGTHS = [0, 1, 2, 4, 100, 2572, 7430, 7431, 7433, 7500, 8000]


def build(op: int, pool: int, key: bytes, value: bytes, index: int = 0) -> bytearray:
    """A message laid out for `op`, with size fields = strlen+1 (mutations may lie later)."""
    msg = bytearray(SIZE)
    msg[0], msg[1] = op, pool

    def put(at: int, width: int, data: bytes, size_at: int | None) -> None:
        data = data[:width]
        msg[at : at + len(data)] = data
        if size_at is not None:
            U32.pack_into(msg, size_at, len(data) + 1)

    if op in (GET, SET):
        put(SET_KEY, KEY_FIELD, key, SET_KEY_SIZE)
        if op == SET:
            put(SET_VALUE, VALUE_FIELD, value, SET_VALUE_SIZE)
    elif op == DELETE:
        put(DEL_KEY, KEY_FIELD, key, DEL_KEY_SIZE)
    elif op == ENUMERATE:
        U32.pack_into(msg, ENUM_INDEX, index)
    else:  # IP info, REGISTER1 (version text at 4), anything else
        put(4, 256, key, None)
        put(262, 2048, value, None)
    return msg


def mutate(msg: bytearray, kind: str, a: int, b: int, rng: random.Random | None = None
           ) -> bytearray:
    """One mutation: `a`/`b` parameterise it (offsets, values)."""
    if len(msg) < SIZE and kind != "length":
        return msg  # already a device error; nothing else about it matters
    if kind == "u32":
        U32.pack_into(msg, SIZE_FIELDS[a % len(SIZE_FIELDS)] if b % 3 else (a % (SIZE - 4)),
                      INTERESTING_U32[b % len(INTERESTING_U32)] if b % 5 else (a * 7919 + b)
                      & 0xFFFFFFFF)
    elif kind == "byte":
        if msg:
            msg[a % len(msg)] = b & 0xFF
    elif kind == "unterminate":  # fill a text field to its end: no NUL left
        at, width = [(SET_KEY, KEY_FIELD), (SET_VALUE, VALUE_FIELD), (DEL_KEY, KEY_FIELD),
                     (ENUM_KEY, KEY_FIELD), (4, 256)][a % 5]
        msg[at : at + width] = bytes([0x41 + b % 26]) * width
    elif kind == "bad_utf8":
        at = [SET_KEY, SET_VALUE, DEL_KEY, 4, 262][a % 5]
        bad = BAD_UTF8[b % len(BAD_UTF8)]
        msg[at : at + len(bad)] = bad
    elif kind == "length":
        length = LENGTHS[a % len(LENGTHS)] if b % 4 else a % 9000
        if length < len(msg):
            del msg[length:]
        else:
            msg.extend(bytes([b & 0xFF]) * (length - len(msg)))
    elif kind == "op":
        msg[0] = [GET, SET, DELETE, ENUMERATE, GET_IP_INFO, SET_IP_INFO, REGISTER1, 6, 7, 99,
                  101, 255][a % 12] if b % 2 else a & 0xFF
    elif kind == "pool":
        msg[1] = b & 0xFF if a % 2 else (a % 7)
    return msg


MUTATIONS = ("u32", "byte", "unterminate", "bad_utf8", "length", "op", "pool")


@st.composite
def fuzzed_messages(draw) -> bytes:
    op = draw(st.sampled_from([GET, SET, DELETE, ENUMERATE, GET_IP_INFO, SET_IP_INFO,
                               REGISTER1]) | st.integers(0, 255))
    pool = draw(st.sampled_from([0, 1, 2, 3, 4]) | st.integers(0, 255))
    key = draw(st.sampled_from(KEYS) | st.binary(max_size=520)
               | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
    value = draw(st.sampled_from(VALUES) | st.binary(max_size=2100)
                 | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
    index = draw(st.sampled_from([0, 1, 2, 9, 10, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1))
    msg = build(op, pool, key, value, index)
    for kind, a, b in draw(st.lists(st.tuples(st.sampled_from(MUTATIONS),
                                              st.integers(0, 2**16), st.integers(0, 2**16)),
                                    max_size=4)):
        msg = mutate(msg, kind, a, b)
    return bytes(msg)


# --------------------------------------------------------------------------- device fuzzing


def test_device_messages_hypothesis(tmp_path_factory, request) -> None:
    """Batches of generated and mutated messages, each batch against a fresh server."""
    examples = 3000 if request.config.getoption("--soak") else 300
    totals = {"messages": 0, "device_errors": 0, "valid_changes": 0, "refused": 0,
              "records_checked": 0, "batches": 0}

    async def batch(messages: list[bytes], pool_dir: Path) -> None:
        model = Model()
        async with serving(pool_dir) as rig:
            for raw in messages:
                await rig.send(raw, model)
            # still serving: a plain SET and GET work
            await rig.send(bytes(build(SET, 4, b"alive", b"yes")), model)
            await rig.send(bytes(build(GET, 4, b"alive", b"")), model)
            totals["records_checked"] += rig.check_files(model)
            for name in ("messages", "device_errors", "valid_changes", "refused"):
                totals[name] += rig.figures[name]
        totals["batches"] += 1

    _rng, seed = seeded_random("test_device_messages_hypothesis")

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(fuzzed_messages(), min_size=4, max_size=25))
    def run(messages: list[bytes]) -> None:
        pool_dir = tmp_path_factory.mktemp("pools")
        try:
            trio.run(batch, messages, pool_dir)
        finally:
            shutil.rmtree(pool_dir, ignore_errors=True)

    run()
    record_figures("fuzz: device messages (hypothesis)", seed=seed, **totals)


async def test_device_messages_mutation(tmp_path: Path, request) -> None:
    """Thousands of valid messages with random mutations against one long-running server."""
    rng, seed = seeded_random("test_device_messages_mutation")
    count = 100000 if request.config.getoption("--soak") else 10000
    model = Model()
    records_checked = 0
    async with serving(tmp_path / "pools") as rig:
        keys = [b"alpha", b"beta", "gämma".encode(), "🔑".encode(), b"x" * 511]
        for i in range(count):
            op = rng.choice([GET, SET, SET, SET, DELETE, ENUMERATE, GET_IP_INFO, SET_IP_INFO,
                             REGISTER1, rng.randrange(256)])
            pool = rng.choice([0, 1, 2, 3, 4, 4, 5, 255])
            key = rng.choice(keys)
            value = rng.choice([b"", b"v%d" % i, "ünïcödé".encode() * rng.randrange(1, 200),
                                b"z" * rng.randrange(2049)])
            msg = build(op, pool, key, value, rng.choice([0, 1, 3, 50, 0xFFFFFFFF]))
            if op == REGISTER1:
                msg = bytearray(kernelside.encode_register_reply(REGISTER1, "3.1"))
            if rng.random() < 0.6:
                for _ in range(rng.randint(1, 3)):
                    msg = mutate(msg, rng.choice(MUTATIONS), rng.randrange(2**16),
                                 rng.randrange(2**16))
            await rig.send(bytes(msg), model)
            if i % 500 == 499:
                records_checked += rig.check_files(model)
        records_checked += rig.check_files(model)
        figures = dict(rig.figures)
        assert rig.server.registrations == 1 + figures["device_errors"]
    record_figures("fuzz: device messages (mutation)", seed=seed, **figures,
                   records_checked=records_checked)


class ScriptedDevice:
    """A device whose kernel side the test drives by hand, handshake included."""

    name = "scripted hv_kvp"

    def __init__(self) -> None:
        self.kernel: trio.socket.SocketType | None = None
        self.opens = 0
        self.opened = trio.Event()

    async def open(self) -> Channel:
        import socket

        guest, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.kernel is not None:
            self.kernel.close()
        self.kernel = trio.socket.from_stdlib_socket(kernel)
        self.opens += 1
        self.opened.set()
        return Channel(guest.detach(), self.name)

    async def wait_open(self, count: int) -> trio.socket.SocketType:
        with trio.fail_after(5):
            while self.opens < count:
                self.opened = trio.Event()
                await self.opened.wait()
        assert self.kernel is not None
        return self.kernel


async def _handshake_with_junk(device: ScriptedDevice, opens: int, rng: random.Random
                               ) -> tuple[trio.socket.SocketType, int, int]:
    """Expect REGISTER1 and answer junk first: each junk message must make kvpfs close the
    device and register again on a fresh open (the kernel took its REGISTER1 as a host
    request's reply); then a proper echo. Returns the socket, junk sent and opens seen."""
    junk = [
        bytes(build(SET, 0, b"early", b"x")),  # a request before the reply
        bytes(build(ENUMERATE, 1, b"", b"")),
        bytes(build(GET_IP_INFO, 0, b"", b"")),  # op 4: the legacy echo's op, never ours
        bytes(kernelside.encode_register_reply(REGISTER1, "3.1")[:4] + b"L" * 512
              + bytes(SIZE - 516)),  # version without NUL in its 512-byte field
        bytes(mutate(bytearray(kernelside.encode_register_reply(REGISTER1, "3.1")),
                     "bad_utf8", 3, rng.randrange(99))),  # version not UTF-8
        # an unknown op; never REGISTER1, which with a NUL-terminated version is a real reply
        bytes(build(rng.choice([op for op in range(6, 256) if op != REGISTER1]),
                    rng.randrange(256), b"?", b"?")),
    ]
    rng.shuffle(junk)
    junk = junk[:rng.randint(1, len(junk))]
    for message in [*junk, None]:
        sock = await device.wait_open(opens)
        with trio.fail_after(5):
            hello = await sock.recv(SIZE + 1)
        assert len(hello) == SIZE and hello[0] == REGISTER1
        if message is None:
            await sock.send(kernelside.encode_register_reply(REGISTER1, "3.1"))
            return sock, len(junk), opens
        await sock.send(message)
        opens += 1
    raise AssertionError("unreachable")


async def _request(sock: trio.socket.SocketType, raw: bytes) -> int:
    await sock.send(raw)
    with trio.fail_after(5):
        reply = await sock.recv(SIZE + 1)
    assert len(reply) == SIZE
    return U32.unpack_from(reply, 0)[0]


async def test_handshake_out_of_order(tmp_path: Path, caplog) -> None:
    """Anything but the echo after REGISTER1 makes kvpfs reopen and register again, and
    never becomes its version; a register message outside the handshake is just an
    unknown op; a short read mid-service makes kvpfs reopen and register again."""
    rng, seed = seeded_random("test_handshake_out_of_order")
    caplog.set_level(logging.WARNING)
    store = Store(tmp_path / "pools", lock_timeout=1.0)
    await store.open()
    device = ScriptedDevice()
    server = DeviceServer(device, store, Intrinsics(FqdnCache(resolver=lambda n: n)),
                          reopen_delay=0.002, max_reopen_delay=0.05)
    junk_total = 0
    opens = 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run)
        for round_ in range(1, 6):
            sock, junk, opens = await _handshake_with_junk(device, opens, rng)
            junk_total += junk
            with trio.fail_after(5):
                while server.registrations < round_:
                    await trio.sleep(0.001)
            assert server.version == "3.1"
            assert await _request(sock, bytes(build(SET, 0, b"k%d" % round_, b"v"))) == S_OK
            # outside the handshake: op 100 (with a version) and the legacy op 4 are requests
            assert await _request(sock, kernelside.encode_register_reply(REGISTER1, "9.9")) \
                == NOT_SUPPORTED
            assert await _request(sock, protocol.encode_register(REGISTER1)) == NOT_SUPPORTED
            assert await _request(sock, kernelside.encode_register_reply(4, "3.1")) in (
                E_FAIL, NOT_SUPPORTED)
            assert server.registrations == round_ and device.opens == opens
            assert server.registration_races == junk_total
            # a short message: a device error, so kvpfs reopens and registers again
            await sock.send(b"\x01\x00" + bytes(rng.randrange(0, SIZE - 2)))
            opens += 1
        nursery.cancel_scope.cancel()
    store.close()
    assert [k for k, _ in (slot_pair(s) for s in split_slots(
        pool_file(tmp_path / "pools", 0).read_bytes()))] == [b"k%d" % r for r in range(1, 6)]
    assert "instead of the registration echo" in caplog.text
    record_figures("fuzz: handshake", seed=seed, handshakes=server.registrations,
                   device_opens=device.opens, junk_messages_reset=junk_total)


# --------------------------------------------------------------------------- pool file fuzzing


def raw_record(key: bytes, value: bytes, key_tail: bytes = b"", value_tail: bytes = b"") -> bytes:
    """A record as sloppy writers leave it: stale bytes after each NUL (or no NUL at all)."""
    k = key if len(key) >= KEY_FIELD else (key + b"\0" + key_tail)
    v = value if len(value) >= VALUE_FIELD else (value + b"\0" + value_tail)
    return k[:KEY_FIELD].ljust(KEY_FIELD, b"\0") + v[:VALUE_FIELD].ljust(VALUE_FIELD, b"\0")


@dataclass
class Corpus:
    slots: list[bytes]
    partial: bytes
    shown: list[tuple[str, str]]  # what the host must see, in order
    invalid: int  # records that must be skipped with a log line


def corpus(rng: random.Random) -> Corpus:
    """A pool file with every kind of record other writers leave, in random order."""
    kinds: list[tuple[bytes, tuple[str, str] | None]] = [
        (raw_record(b"plain", b"value"), ("plain", "value")),
        (raw_record(b"garbage-after-nul", b"v2", b"\xff\xfeJUNK" * 20, b"st-long-value\xff"),
         ("garbage-after-nul", "v2")),
        (raw_record("ünïcode-κλειδί".encode(), "värde ✓".encode()), ("ünïcode-κλειδί", "värde ✓")),
        (raw_record(b"dup", b"first"), ("dup", "first")),
        (raw_record(b"bad-value", b"\xff\xfe not utf-8"), None),
        (raw_record(b"\xc3\x28bad-key", b"v"), None),
        (raw_record(b"surrogate-\xed\xa0\x80", b"v"), None),
        (raw_record(b"", b"empty key"), None),
        (raw_record(b"", b"", b"", b""), None),  # an all-zero slot
        (raw_record(b"dup", b"second"), ("dup", "second")),
        (raw_record(b"empty-value", b""), ("empty-value", "")),
        (raw_record(b"max-value", b"m" * 2047), ("max-value", "m" * 1022)),
        # cloud-init's struct.pack("512s") leaves no NUL after a 512-byte key; a value may
        # fill its field too: kept untouched, sent cut to what a message field holds
        (raw_record(b"K" * 512, b"unterminated key"), ("K" * 254, "unterminated key")),
        (raw_record(b"long-value", b"w" * 2048), ("long-value", "w" * 1022)),
    ]
    rng.shuffle(kinds)
    dups = [i for i, (_, shown) in enumerate(kinds) if shown and shown[0] == "dup"]
    if kinds[dups[0]][1] == ("dup", "second"):  # keep "first" before "second" in the file
        kinds[dups[0]], kinds[dups[1]] = kinds[dups[1]], kinds[dups[0]]
    partial = rng.choice([b"", b"trunc" + bytes(rng.randrange(1, RECORD - 5)),
                          bytes(rng.randrange(1, RECORD))])
    return Corpus([s for s, _ in kinds], partial, [s for _, s in kinds if s],
                  sum(1 for _, s in kinds if s is None))


def _shown(raw: bytes) -> bool:
    key, value = slot_pair(raw)
    return bool(key) and _utf8(key) and _utf8(value)


async def test_pool_files_with_bad_records(tmp_path: Path, caplog) -> None:
    """kvpfs serves the valid records, logs the skipped ones, and after SET/DELETE every
    untouched record is byte-identical and every written record clean."""
    rng, seed = seeded_random("test_pool_files_with_bad_records")
    caplog.set_level(logging.INFO)
    pools = tmp_path / "pools"
    pools.mkdir(mode=0o700)
    corpora = {pool: corpus(rng) for pool in STORED}
    for pool, c in corpora.items():
        pool_file(pools, pool).write_bytes(b"".join(c.slots) + c.partial)
    checked = untouched_compared = 0
    async with serving(pools) as rig:
        for pool, c in corpora.items():
            assert await rig.host.list(pool) == c.shown, f"pool {pool}"
        logged = caplog.text
        # one line per pool with skipped records, counting them (not one line per record)
        skipped = {pool: sum(not _shown(s) for s in c.slots) for pool, c in corpora.items()}
        assert logged.count("not valid UTF-8") == sum(1 for n in skipped.values() if n), logged
        for pool, count in skipped.items():
            if count:
                assert f"): {count} record(s) not valid UTF-8" in logged, (pool, logged)
        if any(c.partial for c in corpora.values()):
            assert "partial record" in logged

        for pool, c in corpora.items():
            before = pool_file(pools, pool).read_bytes()
            # modify a valid record in place
            assert (await rig.host.set(pool, "plain", "changed")).ok
            after = pool_file(pools, pool).read_bytes()
            index = c.slots.index(raw_record(b"plain", b"value"))
            assert after[: len(before)][: index * RECORD] == before[: index * RECORD]
            assert after[index * RECORD : (index + 1) * RECORD] == slot(b"plain", b"changed")
            assert after[(index + 1) * RECORD : len(before)] == before[(index + 1) * RECORD :]
            # modify the last of two duplicates
            assert (await rig.host.set(pool, "dup", "third")).ok
            # append a new key: it replaces a trailing partial record
            assert (await rig.host.set(pool, "new-key", "new")).ok
            after = pool_file(pools, pool).read_bytes()
            whole = len(c.slots) * RECORD
            assert len(after) == whole + RECORD
            assert after[whole:] == slot(b"new-key", b"new")
            slots_now = split_slots(after)
            for i, raw in enumerate(c.slots):
                key, _ = slot_pair(raw)
                if key not in (b"plain", b"dup"):
                    assert slots_now[i] == raw, f"pool {pool}: untouched record {i} changed"
                    untouched_compared += 1
            dup_slots = [i for i, s in enumerate(slots_now) if slot_pair(s)[0] == b"dup"]
            assert slots_now[dup_slots[0]] == raw_record(b"dup", b"first")
            assert slots_now[dup_slots[1]] == slot(b"dup", b"third")
            # delete a valid key near the start: later records shift up, each either
            # byte-identical or its own clean zero-padded form
            victim = next(k for k, _ in map(slot_pair, c.slots) if k and len(k) < 100
                          and k.decode("utf-8", "replace") in dict(c.shown))
            assert (await rig.host.delete(pool, victim.decode())).ok
            final = split_slots(pool_file(pools, pool).read_bytes())
            kept = [s for s in slots_now if slot_pair(s)[0] != victim]
            assert len(final) == len(kept)
            for old, new in zip(kept, final, strict=True):
                assert new == old or new == slot(*slot_pair(old)), (
                    f"pool {pool}: a shifted record was altered: {old[:40]!r} -> {new[:40]!r}")
            checked += len(split_slots(pool_file(pools, pool).read_bytes()))
    record_figures("fuzz: bad pool records", seed=seed, pools=len(STORED),
                   bad_records_skipped=sum(c.invalid for c in corpora.values()),
                   records_checked=checked, untouched_records_compared=untouched_compared)


async def test_zero_length_and_huge_pool_files(tmp_path: Path) -> None:
    pools = tmp_path / "pools"
    pools.mkdir(mode=0o700)
    pool_file(pools, 0).write_bytes(b"")
    count = 20000
    big = b"".join(slot(b"key-%05d" % i, b"value-%05d" % i) for i in range(count))
    pool_file(pools, 4).write_bytes(big)
    started = trio.current_time()
    async with serving(pools) as rig:
        loaded_in = trio.current_time() - started
        assert (await rig.host.enumerate(4, count - 1)).key == f"key-{count - 1:05d}"
        assert (await rig.host.enumerate(4, count)).status == S_CONT
        assert (await rig.host.get(4, "key-10000")).value == "value-10000"
        assert (await rig.host.set(4, "key-12345", "changed")).ok
        assert (await rig.host.set(4, "appended", "x")).ok
        assert (await rig.host.set(0, "first", "x")).ok
        assert (await rig.host.list(0)) == [("first", "x")]
        data = pool_file(pools, 4).read_bytes()
        assert len(data) == (count + 1) * RECORD
        assert data[: 12345 * RECORD] == big[: 12345 * RECORD]
        assert data[12345 * RECORD : 12346 * RECORD] == slot(b"key-12345", b"changed")
        assert data[12346 * RECORD : count * RECORD] == big[12346 * RECORD :]
        assert data[count * RECORD :] == slot(b"appended", b"x")
    record_figures("fuzz: huge and empty pool files", records=count,
                   load_seconds=round(loaded_in, 2), records_checked=count + 2)


def _pool_dir_with(tmp_path: Path, pool: int, make: Callable[[Path], None]) -> Path:
    pools = tmp_path / "pools"
    pools.mkdir(mode=0o700)
    make(pool_file(pools, pool))
    return pools


@pytest.mark.parametrize("what", ["directory", "symlink", "dangling symlink", "fifo"])
async def test_pool_file_replaced_at_start(tmp_path: Path, what: str) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(slot(b"secret", b"do not touch"))
    makers: dict[str, Callable[[Path], None]] = {
        "directory": lambda p: p.mkdir(),
        "symlink": lambda p: p.symlink_to(outside),
        "dangling symlink": lambda p: p.symlink_to(tmp_path / "nowhere"),
        "fifo": lambda p: os.mkfifo(p),
    }
    pools = _pool_dir_with(tmp_path, 1, makers[what])
    store = Store(pools)
    with pytest.raises(OSError) as info:
        await store.open()
    store.close()
    assert ".kvp_pool_1" in str(info.value)
    assert outside.read_bytes() == slot(b"secret", b"do not touch")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("what", ["directory", "symlink"])
@pytest.mark.log_errors('pool file error, answered E_FAIL: .* is a (directory|symlink)')
async def test_pool_file_replaced_while_running(tmp_path: Path, what: str, caplog) -> None:
    caplog.set_level(logging.WARNING)
    outside = tmp_path / "outside"
    outside.write_bytes(slot(b"secret", b"do not touch"))
    pools = tmp_path / "pools"
    async with serving(pools, watch=True) as rig:
        assert (await rig.host.set(0, "k", "v")).ok
        target = pool_file(pools, 0)
        if what == "directory":
            # The watcher may recreate the missing file between the unlink and the
            # mkdir (it reloads a pool whose file changed): then try again.
            for _ in range(100):
                target.unlink(missing_ok=True)
                try:
                    target.mkdir()
                    break
                except FileExistsError:
                    continue
            assert target.is_dir()
        else:
            link = target.with_name("link-to-outside")
            link.symlink_to(outside)
            link.replace(target)  # one rename: the file is never missing meanwhile
        await trio.sleep(0.2)  # the watcher notices; it must not crash or follow the link
        assert (await rig.host.set(0, "k", "v2")).status == E_FAIL
        assert (await rig.host.set(1, "other-pool", "fine")).ok
        assert outside.read_bytes() == slot(b"secret", b"do not touch")
        assert ".kvp_pool_0" in caplog.text
        if what == "directory":
            target.rmdir()
        else:
            target.unlink()
        assert (await rig.host.set(0, "k", "v3")).ok  # recreated, clean, 0600
        assert target.read_bytes() == slot(b"k", b"v3")
        assert (target.stat().st_mode & 0o777) == 0o600
        assert rig.server_running
    assert outside.read_bytes() == slot(b"secret", b"do not touch")


# --------------------------------------------------------------------------- names and values


def escape(key: bytes) -> bytes:
    """docs/filesystem.md's escaping, written out again: `/`, `%`, control bytes, a leading `.`."""
    out = bytearray()
    for i, byte in enumerate(key):
        if byte in b"/%" or byte < 0x20 or byte == 0x7F or (i == 0 and byte == 0x2E):
            out += b"%%%02X" % byte
        else:
            out.append(byte)
    return bytes(out)


def tree(base: Path, skip: Path) -> dict[str, bytes | None]:
    """Every path under `base` except `skip` (the mount), with file contents. The pools'
    redo journals are left out once checked empty: they are kept between changes; so is
    the guest keys' metadata file."""
    found: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(base):
        if Path(root) == skip.parent and skip.name in dirs:
            dirs.remove(skip.name)
        for name in files + dirs:
            path = Path(root) / name
            if name.startswith(".kvpfs-journal.kvp_pool_") and path.parent.name == "pools":
                assert path.read_bytes() == b"", f"{path} holds a change after it ended"
                continue
            if name == ".kvpfs-keymeta" and path.parent.name == "pools":
                continue  # what users set on guest keys (docs/tools.md): changes with them
            found[str(path.relative_to(base))] = (
                path.read_bytes() if path.is_file() and not path.is_symlink() else None)
    return found


HOST_KEYS = [
    "a/b", "100%", "..", ".", ".hidden", "ctl\x01\x1f\x7f", "tab\there", "new\nline",
    "x" * 254, "é" * 254, "😀" * 127, "%2F", "a%", "../../escape", "/", "%", "/" * 200,
    "ü" * 100 + "%" * 60, " spaced ", "日本語", "x" * 253 + "é", "😀" * 126 + "ab",
]


def test_host_keys_at_the_limits_are_all_reachable(kvpfs) -> None:
    """Host keys with every awkward byte: escaped names, all reachable, raw key in xattr."""
    before = tree(kvpfs.base, kvpfs.mnt)
    for i, key in enumerate(HOST_KEYS):
        assert kvpfs.host("set", 4, key, f"value {i}")["status"] == S_OK, key
    directory = os.fsencode(kvpfs.mnt / "auto_internal")
    names = os.listdir(directory)
    assert len(names) == len(HOST_KEYS)
    seen: dict[bytes, bytes] = {}
    for name in names:
        path = directory + b"/" + name
        key = os.getxattr(path, "user.kvp.key")
        assert os.getxattr(path, "user.kvp.pool") == b"4"
        with open(path, "rb") as f:
            seen[key] = f.read()
        assert len(name) <= 255 and b"/" not in name and name not in (b".", b"..")
        full = escape(key)
        if len(full) <= 255:
            assert name == full, (key, name)
        else:  # shortened: a readable head, %~ and 16 hex digits
            assert re.fullmatch(rb".*%~[0-9a-f]{16}", name, re.S), name
            assert full.startswith(name[: name.index(b"%~")]), name
    assert seen == {k.encode(): f"value {i}".encode() for i, k in enumerate(HOST_KEYS)}
    after = tree(kvpfs.base, kvpfs.mnt)
    assert set(after) == set(before) | {"pools/.kvp_pool_4"} or set(after) == set(before), (
        "files appeared outside the mount: " + ", ".join(sorted(set(after) - set(before))))
    assert not [p for p in after if "escape" in p]
    record_figures("fuzz: host keys through the mount", keys=len(HOST_KEYS),
                   shortened_names=sum(1 for k in HOST_KEYS if len(escape(k.encode())) > 255),
                   unreachable=0)


GUEST_NAMES: list[tuple[bytes, str | None, bytes | None]] = [
    # (file name, errno name or None for success, the key it stands for)
    (b"x" * 254, None, b"x" * 254),
    (b"x" * 255, "ENAMETOOLONG", None),  # 255 UTF-16 units: the host would cut it
    (b"x" * 256, "ENAMETOOLONG", None),
    ("é".encode() * 127, None, "é".encode() * 127),
    ("😀".encode() * 63 + b"abc", None, "😀".encode() * 63 + b"abc"),  # 255 bytes, 129 units
    # FUSE takes names up to 1024 bytes; the key limit is 254 units and 511 bytes, and a
    # name over 255 bytes is listed shortened
    ("é".encode() * 128, None, "é".encode() * 128),  # 256 bytes
    ("😀".encode() * 127, None, "😀".encode() * 127),  # 254 units in 508 bytes
    ("😀".encode() * 127 + b"x", "ENAMETOOLONG", None),  # 255 units
    (b"x" * 253 + "😀".encode(), "ENAMETOOLONG", None),  # the pair ends at unit 255
    (b"x" * 252 + "😀".encode(), None, b"x" * 252 + "😀".encode()),  # 254 units
    ("€".encode() * 170, None, "€".encode() * 170),  # 510 bytes
    ("€".encode() * 171, "ENAMETOOLONG", None),  # 513 bytes: more than a key field holds
    (b"x" * 1100, "ENAMETOOLONG", None),  # beyond FUSE's own limit
    (b"%2F" * 85, None, b"/" * 85),
    (b"x" * 252 + b"%25", None, b"x" * 252 + b"%"),  # 255 bytes, 253 units
    (b"100%", "EINVAL", None),
    (b"%61", "EINVAL", None),  # needless escape: one name per key
    (b"a%2fb", "EINVAL", None),  # lower-case hex
    (b"a%2Fb", None, b"a/b"),
    (b"%2E.", None, b".."),
    (b"%2E%2E", "EINVAL", None),
    (b"%2E.%2F..%2Fescape", None, b"../../escape"),
    (b"\xff\xfe", "EINVAL", None),  # not UTF-8
    (b"a\x01b", "EINVAL", None),  # a raw control character
    (b"a\nb", "EINVAL", None),
    (b"%0A", None, b"\n"),
    (b"%00", "EINVAL", None),  # NUL
    (b"%~0123456789abcdef", "EINVAL", None),  # a shortened name is not a key
    (b"%", "EINVAL", None),
    (b"%2", "EINVAL", None),
]

GUEST_VALUES: list[tuple[bytes, str | None, bytes | None]] = [
    # (bytes written, errno name or None, the value stored)
    (b"x" * 1022, None, b"x" * 1022),
    (b"x" * 1022 + b"\n", None, b"x" * 1022),  # one trailing newline is dropped
    (b"x" * 1023, "EFBIG", None),
    ("😀".encode() * 511, None, "😀".encode() * 511),  # 1022 units in 2044 bytes
    ("😀".encode() * 511 + b"x", "EFBIG", None),
    (b"x" * 1020 + "😀".encode(), None, b"x" * 1020 + "😀".encode()),
    (b"x" * 1021 + "😀".encode(), "EFBIG", None),  # the pair would straddle unit 1022
    ("€".encode() * 682, None, "€".encode() * 682),  # 2046 bytes
    ("€".encode() * 683, "EFBIG", None),  # 2049 bytes
    ("é".encode() * 1023, "EFBIG", None),
    (b"x" * 5000, "EFBIG", None),
    (b"\xff", "EILSEQ", None),
    (b"ok\xe2\x82", "EILSEQ", None),  # cut multi-byte character at the end
    (b"\xed\xa0\x80", "EILSEQ", None),  # an encoded surrogate
    (b"\xc0\xaf", "EILSEQ", None),  # overlong
    (b"a\0b", "EINVAL", None),
    (b"", None, b""),
]


def _write(path: bytes, data: bytes) -> str | None:
    """Create/truncate and write `data`; the errno name of the first failure, or None."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    failure = None
    try:
        if data:
            os.write(fd, data)
    except OSError as exc:
        failure = errno.errorcode[exc.errno]
    try:
        os.close(fd)
    except OSError as exc:
        failure = failure or errno.errorcode[exc.errno]
    return failure


def test_guest_names_and_values_at_the_limits(kvpfs) -> None:
    """Every refusal has the documented errno and stores nothing; every success stores
    exactly the key and value; nothing appears outside the mount."""
    guest = os.fsencode(kvpfs.mnt / "guest")
    pool = pool_file(kvpfs.pools, 1)
    outside = tree(kvpfs.base, kvpfs.mnt)
    refusals = successes = 0
    expected: dict[bytes, bytes] = {}
    for name, error, key in GUEST_NAMES:
        before = pool.read_bytes()
        got = _write(guest + b"/" + name, b"v")
        assert got == error, f"name {name!r}: {got or 'success'}, expected {error or 'success'}"
        if error:
            refusals += 1
            assert pool.read_bytes() == before, f"name {name!r} refused but the pool changed"
        else:
            successes += 1
            assert key is not None
            expected[key] = b"v"
            assert dict(slot_pairs_of(pool)) == expected
            assert os.getxattr(guest + b"/" + name, "user.kvp.key") == key
    target = guest + b"/value-limits"
    assert _write(target, b"old") is None
    expected[b"value-limits"] = b"old"
    for i, (data, error, stored) in enumerate(GUEST_VALUES):
        for path in (target, guest + b"/fresh-%d" % i):  # an existing key, a new key
            before = pool.read_bytes()
            got = _write(path, data)
            assert got == error, (f"value {data[:20]!r}... ({len(data)} bytes): "
                                  f"{got or 'success'}, expected {error or 'success'}")
            if error:
                refusals += 1
                assert pool.read_bytes() == before, f"value {data[:20]!r}: the pool changed"
                assert path == target or path.rsplit(b"/", 1)[1] not in os.listdir(guest), (
                    "a refused new key was left behind")
            else:
                successes += 1
                expected[path.rsplit(b"/", 1)[1]] = stored
                # an open that only truncated is published at release, just after close
                assert wait_until(lambda: dict(slot_pairs_of(pool)) == expected), (
                    dict(slot_pairs_of(pool)), expected)
                assert os.getxattr(path, "user.kvp.key") == path.rsplit(b"/", 1)[1]
        if not error:
            _write(target, b"old")  # back to the old value for the next refusal check
            expected[b"value-limits"] = b"old"
    for raw in split_slots(pool.read_bytes()):
        assert raw == slot(*slot_pair(raw)), "a record written through the mount is not clean"
    listed = {}
    for name in os.listdir(guest):
        assert len(name) <= 255, name
        listed[os.getxattr(guest + b"/" + name, "user.kvp.key")] = name
    assert set(listed) == set(expected), "guest/ does not list exactly the stored keys"
    host = {k.encode(): v.encode() for k, v in kvpfs.host("list", 1)["items"]}
    assert host == {k: v for k, v in expected.items()}
    after = tree(kvpfs.base, kvpfs.mnt)
    assert set(after) == set(outside), (
        "files appeared outside the mount: " + ", ".join(sorted(set(after) ^ set(outside))))
    changed = sorted(p for p, content in after.items() if content != outside.get(p)
                     and not p.startswith("pools/.kvp_pool_") and p != "kvpfs.log")
    assert not changed, f"files outside the mount changed: {changed}"
    record_figures("fuzz: guest names and values", names=len(GUEST_NAMES),
                   values=len(GUEST_VALUES) * 2, refused_with_documented_errno=refusals,
                   stored_exactly=successes, stored_half=0)


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def slot_pairs_of(path: Path) -> list[tuple[bytes, bytes]]:
    return [slot_pair(raw) for raw in split_slots(path.read_bytes())]


def test_refused_new_key_leaves_no_file_behind(kvpfs) -> None:
    """A new key whose value is refused is not left behind as an empty file."""
    guest = kvpfs.mnt / "guest"
    assert _write(os.fsencode(guest / "too-big"), b"x" * 3000) == "EFBIG"
    assert _write(os.fsencode(guest / "not-utf8"), b"\xff") == "EILSEQ"
    assert kvpfs.host("list", 1)["items"] == []
    assert os.listdir(guest) == []


def test_long_guest_name_is_listed_shortened(kvpfs) -> None:
    """A key created under a name over NAME_MAX is listed under its shortened name."""
    guest = os.fsencode(kvpfs.mnt / "guest")
    name = "é".encode() * 128  # 128 UTF-16 units: a valid key, but a 256-byte name
    assert _write(guest + b"/" + name, b"v") is None
    assert all(len(listed) <= 255 for listed in os.listdir(guest)), "a name over NAME_MAX"
