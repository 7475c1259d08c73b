"""kvpfs's own work per host request, without any device: `DeviceServer.answer` in process.

The same requests as the host section, encoded as the kernel would hand them
over, go straight to `DeviceServer.answer` of a `Store` opened on the same kind
of pool directory, inside trio in this process (so SET and DELETE still run
their pool-file work in a worker thread). What is left of a host request
beyond this is the device I/O (here: three FUSE round trips to the emulator)
and trio's wait for the device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from bench.common import Stat, key_name, value_text, write_pools
from bench.hostbench import AUTO, EXTERNAL, PASS_REQUESTS, HostConfig
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.host.server import DeviceServer
from kvpfs.storage.store import Store
from kvpfs.wire.kernelside import (
    encode_delete_request,
    encode_enumerate_request,
    encode_get_request,
    encode_set_request,
)
from kvpfs.wire.protocol import Status


def _status(reply: bytes) -> int:
    return int.from_bytes(reply[:4], "little")


async def _timed(server: DeviceServer, messages: Sequence[bytes]) -> list[float]:
    times = []
    for message in messages:
        start = time.perf_counter()
        reply = await server.answer(message)
        times.append(time.perf_counter() - start)
        if _status(reply) not in (Status.S_OK, Status.S_CONT):
            raise RuntimeError(f"in-process request failed with status {_status(reply):#x}")
    return times


async def _measure(pool_dir: Path, size: int, config: HostConfig) -> dict[str, Stat]:
    store = Store(pool_dir)
    await store.open()
    server = DeviceServer(None, store, Intrinsics(FqdnCache()))  # type: ignore[arg-type]
    middle = key_name(size // 2).encode()
    samples: dict[str, list[float]] = {}
    first_counter = 0

    def add(name: str, times: list[float]) -> None:
        samples.setdefault(name, []).append(statistics.median(times))

    try:
        for rep in range(config.repeat):
            new = [f"bench-new-{rep}-{i:04d}".encode() for i in range(config.batch)]
            add("set_new", await _timed(server, [
                encode_set_request(EXTERNAL, k, b"a new value") for k in new]))
            add("set_existing", await _timed(server, [
                encode_set_request(EXTERNAL, middle, f"changed {rep} {i}".encode())
                for i in range(config.batch)]))
            add("get", await _timed(server, [
                encode_get_request(EXTERNAL, middle)] * config.batch))
            add("delete_last", await _timed(server, [
                encode_delete_request(EXTERNAL, k) for k in reversed(new)]))
            times = []
            for _ in range(config.first_batch):
                index = first_counter % size
                first_counter += 1
                key = key_name(index).encode()
                times += await _timed(server, [encode_delete_request(EXTERNAL, key)])
                await server.answer(encode_set_request(EXTERNAL, key, value_text(index).encode()))
            add("delete_first", times)
            if rep < config.pass_repeat:
                times = []
                for _ in range(max(1, PASS_REQUESTS // (size + 1))):
                    times += await _timed(server, [
                        encode_enumerate_request(EXTERNAL, i) for i in range(size + 1)])
                add("enumerate", times)
            intrinsic = [encode_enumerate_request(AUTO, i) for i in range(len(INTRINSIC_KEYS) + 1)]
            means = []
            for _ in range(config.intrinsic_passes):
                times = await _timed(server, intrinsic)
                means.append(sum(times) / len(times))
            add("intrinsic", means)
    finally:
        store.close()
    return {name: Stat.of(values) for name, values in samples.items()}


def run_inprocess(size: int, workdir: Path, config: HostConfig) -> dict[str, Stat]:
    pool_dir = workdir / f"inprocess-{size}" / "pools"
    write_pools(pool_dir, size)
    return trio.run(_measure, pool_dir, size, config)
