"""When the notification lane works: it folds a busy host's changes and yields to it.

The service is built as mounted (`build_filesystem`) and its lane runs on
trio's virtual clock (`autojump_clock`), so times are exact and the test
takes no wall-clock time. The host is a task that reports a change to the
service every HOST_GAP, as the store does after each SET; the echo helper
process is replaced by a stand-in that records each echo and takes ECHO_COST
(a test cannot make the kernel raise inotify events without a mount; the
echo itself is covered by tests/mount/test_inotify.py).
"""

from __future__ import annotations

import itertools
import os

import pytest
import trio

from kvpfs.fuse.echo_helper import EchoKind
from kvpfs.fuse.fsnotify_echo import EchoHelper, EchoOp
from kvpfs.fuse.notifications import BUSY_WAIT, HOST_POLL, REST_RATIO, SETTLE, SLICE
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.mount import build_filesystem
from kvpfs.storage.store import Change, ChangeKind, Origin, Store
from kvpfs.wire.protocol import Pool
from tests.support.handlers import EXTERNAL_DIR, Ctx

HOST_GAP = 0.0003  # a host sending SETs back to back: one every 0.3 ms
ECHO_COST = 0.0007  # what one echo takes (open, write, close through the mount)
KEYS = [f"key{i}".encode() for i in range(10)]


class RecordingEcho(EchoHelper):
    """Stands in for the helper process: records (time, kind, key) and takes ECHO_COST."""

    def __init__(self, mountpoint) -> None:
        super().__init__(mountpoint)
        self.echoes: list[tuple[float, EchoKind, bytes]] = []

    async def run(self, op: EchoOp, pool_dir: bytes) -> int:
        self.echoes.append((trio.current_time(), op.kind, op.key))
        await trio.sleep(ECHO_COST)
        return 0

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def store(tmp_path):
    store = Store(tmp_path / "pools", lock_timeout=0.5)
    await store.open()
    for key in KEYS:
        await store.set(Pool.EXTERNAL, key, b"first", Origin.HOST)
    yield store
    store.close()


class Device:
    """Stands in for the device's server: whether a host request is being served."""

    def __init__(self) -> None:
        self.serving = False

    def busy(self) -> bool:
        return self.serving


@pytest.fixture
def device():
    return Device()


@pytest.fixture
async def lane(store, tmp_path, device):
    """The service with its lane running; yields (service, recorded echoes)."""
    fs = build_filesystem(store, Intrinsics(FqdnCache()), host_busy=device.busy)
    echo = RecordingEcho(tmp_path / "mnt")
    fs.notifications.echo = echo
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.notifications.run)  # no mount point: keeps the stand-in
        await trio.sleep(0)
        yield fs.notifications, echo.echoes
        nursery.cancel_scope.cancel()


def host_set(service, key: bytes) -> None:
    service.apply([Change(ChangeKind.SET, Pool.EXTERNAL, key, Origin.HOST)])


async def busy_host(service, keys: list[bytes], seconds: float) -> dict[bytes, float]:
    """SETs back to back for `seconds`, the keys in turn; when each key last changed."""
    end = trio.current_time() + seconds
    last: dict[bytes, float] = {}
    i = 0
    while trio.current_time() < end:
        key = keys[i % len(keys)]
        host_set(service, key)
        last[key] = trio.current_time()
        i += 1
        await trio.sleep(HOST_GAP)
    return last


async def test_a_quiet_hosts_change_is_echoed_once_it_is_over(lane, autojump_clock):
    service, echoes = lane
    changed = trio.current_time()
    host_set(service, b"key0")
    await trio.sleep(1.0)
    assert [(kind, key) for _, kind, key in echoes] == [(EchoKind.MODIFY, b"key0")]
    # Once SETTLE has passed without another change: within the 5 ms the issue allows.
    assert echoes[0][0] - changed == pytest.approx(SETTLE)
    assert SETTLE < 0.005


async def test_a_busy_hosts_changes_to_one_key_fold_into_few_echoes(lane, autojump_clock):
    service, echoes = lane
    started = trio.current_time()
    last = (await busy_host(service, [b"key0"], 0.100))[b"key0"]  # some 330 SETs
    await trio.sleep(1.0)
    during = [t for t, _, _ in echoes if t <= last]
    # Watchers of a busy host still hear of its changes, every BUSY_WAIT...
    assert during and during[0] - started <= BUSY_WAIT + 1e-9
    assert all(b - a >= BUSY_WAIT - 1e-9 for a, b in itertools.pairwise(during))
    assert len(during) <= 0.100 / BUSY_WAIT + 1
    # ...and once it stops, of its last change: once the lane's rest is over.
    assert SETTLE <= echoes[-1][0] - last <= BUSY_WAIT
    assert len(echoes) == len(during) + 1


async def test_the_lane_takes_a_bounded_share_of_a_busy_hosts_time(lane, autojump_clock):
    service, echoes = lane
    started = trio.current_time()
    changed = await busy_host(service, KEYS, 0.200)  # ten keys in turn
    last = max(changed.values())
    busy = last - started
    during = [t for t, _, _ in echoes if t <= last]
    worked = len(during) * ECHO_COST
    assert worked <= busy / (1 + REST_RATIO) + SLICE + ECHO_COST
    await trio.sleep(1.0)
    # Every key is shown in its last state: echoed after its last change.
    for key, at in changed.items():
        assert max(t for t, _, echoed in echoes if echoed == key) > at


async def test_a_quiet_host_is_not_kept_waiting_by_the_rest(lane, autojump_clock):
    """The lane rests only when the host changed something while it worked."""
    service, echoes = lane
    for key in KEYS[:3]:  # one change, its echo, the next change: inotify_latency's pattern
        changed = trio.current_time()
        host_set(service, key)
        await trio.sleep(0.05)
        assert echoes[-1][2] == key
        assert echoes[-1][0] - changed == pytest.approx(SETTLE)


async def test_no_work_starts_while_a_host_request_is_being_served(lane, device,
                                                                    autojump_clock):
    service, echoes = lane
    changed = trio.current_time()
    host_set(service, b"key0")
    device.serving = True  # the host's next request, e.g. a GET, is being answered
    await trio.sleep(SETTLE * 3)
    assert echoes == []
    device.serving = False
    await trio.sleep(SETTLE)
    assert [key for _, _, key in echoes] == [b"key0"]
    assert echoes[0][0] - changed <= SETTLE * 3 + HOST_POLL + 1e-9
    # A request that takes long delays the lane BUSY_WAIT at most.
    changed = trio.current_time()
    host_set(service, b"key1")
    device.serving = True
    await trio.sleep(BUSY_WAIT * 2)
    assert echoes[-1][2] == b"key1"
    assert echoes[-1][0] - changed == pytest.approx(BUSY_WAIT)
    device.serving = False


async def test_many_changes_queue_one_echo_and_one_page_drop(store, tmp_path):
    """With the lane not running (a busy host), 100 SETs of an open key leave one echo
    and one page drop to do."""
    fs = build_filesystem(store, Intrinsics(FqdnCache()))
    fs.notifications.echo = RecordingEcho(tmp_path / "mnt")
    ops = fs.operations
    attr = await ops.lookup(EXTERNAL_DIR, b"key0", Ctx())
    held = await ops.open(attr.st_ino, os.O_RDONLY, Ctx())
    before = fs.notifications.queued()
    for i in range(100):
        await store.set(Pool.EXTERNAL, b"key0", f"value {i}".encode(), Origin.HOST)
    assert fs.notifications.queued() == before + 2  # one EchoDue, one page drop
    assert len(fs.notifications.echo_queue) == 1
    await ops.release(held.fh)

