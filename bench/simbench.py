"""Host requests through the simulated host (the `--simulate` default), in process.

`python -m bench.simbench [RECORDS]`: a `DeviceServer` registered on a
`SimulatedHost` with RECORDS records in pool 0; prints the median wall-clock
time per host request for a full ENUMERATE pass and for SETs of new keys. The
simulated kernel's reads and writes run in the server's device thread under the
kernel model's lock, so this is the cost a developer sees with --simulate.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.host.server import DeviceServer
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.store import Origin, Store


async def _measure(pool_dir: Path, records: int) -> dict[str, float]:
    store = Store(pool_dir)
    await store.open()
    host = SimulatedHost(initial_pool3=())
    server = DeviceServer(host, store, Intrinsics(FqdnCache(resolver=lambda name: name)))
    figures: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await nursery.start(server.run)
        for index in range(records):
            await store.set(0, f"key-{index:05d}".encode(), b"v" * 64, Origin.MOUNT)
        times = []
        for index in range(records + 1):
            start = time.perf_counter()
            await host.enumerate(0, index)
            times.append(time.perf_counter() - start)
        figures["enumerate, median us/request"] = statistics.median(times) * 1e6
        times = []
        for index in range(200):
            start = time.perf_counter()
            result = await host.set(0, f"new-{index}", "x")
            times.append(time.perf_counter() - start)
            assert result.ok
        figures["set, median us/request"] = statistics.median(times) * 1e6
        nursery.cancel_scope.cancel()
    store.close()
    return figures


def main() -> None:
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory() as work:
        figures = trio.run(_measure, Path(work) / "pools", records)
    for name, value in figures.items():
        print(f"simulated host, {records} records: {name}: {value:.0f}")


if __name__ == "__main__":
    main()
