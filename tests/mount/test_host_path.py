"""The host's path never waits on the kernel's cache (issue 10.5).

The simulated host's SET and DELETE go through the real byte protocol to the device
server and the store, whose listeners are the filesystem's (`build_filesystem`). Its
notification service never runs: every kernel invalidation stays stuck in the queue.
trio's clock is frozen (pytest-trio's mock_clock), so a wait "bounded to 1 s" would
never end either; the test's only bound is a real-time timer far above what the answer
takes.
"""

from __future__ import annotations

import errno
import os
import threading

import pyfuse3
import pytest
import trio

from kvpfs.fuse.operations import DIR_INODES
from kvpfs.host.intrinsic import FqdnCache, Intrinsics
from kvpfs.mount import build_filesystem
from kvpfs.wire.protocol import Status
from tests.store.test_server import start_rig

REAL_SECONDS = 20.0


class Ctx:
    uid = gid = 0
    pid = os.getpid()
    umask = 0o022


async def within_real_time(fn, *args):
    """fn(*args), or None once REAL_SECONDS of wall-clock time have passed."""
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        timer = threading.Timer(REAL_SECONDS, token.run_sync_soon, (scope.cancel,))
        timer.start()
        try:
            return await fn(*args)
        finally:
            timer.cancel()
    return None


async def test_host_is_answered_while_invalidations_are_stuck(tmp_path, mock_clock):
    async with trio.open_nursery() as nursery:
        rig = await start_rig(nursery, tmp_path / "pools")
        fs = build_filesystem(rig.store, Intrinsics(FqdnCache()))  # notifications: not running
        ops = fs.operations
        assert (await rig.host.set(0, "Config", "one")).status == Status.S_OK
        # The kernel looks the key up and opens it: it now holds attributes and a file.
        attr = await ops.lookup(DIR_INODES[0], b"Config", Ctx())
        held = await ops.open(attr.st_ino, os.O_RDONLY, Ctx())

        result = await within_real_time(rig.host.set, 0, "Config", "two, longer")
        assert result is not None, "the host's SET waited for the kernel's cache"
        assert result.status == Status.S_OK
        stuck = fs.notifications.queued()
        assert stuck >= 1  # queued, not lost, not waited for
        # The held file keeps the value it opened, with its size (docs/tools.md); the name
        # answers the new value at once, whatever the kernel still caches.
        assert (await ops.getattr(attr.st_ino, Ctx())).st_size == len("one")
        assert await ops.read(held.fh, 0, 100) == b"one"
        attr = await ops.lookup(DIR_INODES[0], b"Config", Ctx())
        assert attr.st_size == len("two, longer")
        fresh = await ops.open(attr.st_ino, os.O_RDONLY, Ctx())
        assert await ops.read(fresh.fh, 0, 100) == b"two, longer"
        assert not fresh.keep_cache  # the kernel drops pages from before the change

        result = await within_real_time(rig.host.delete, 0, "Config")
        assert result is not None, "the host's DELETE waited for the kernel's cache"
        assert result.status == Status.S_OK
        assert fs.notifications.queued() > stuck
        await ops.release(held.fh)
        await ops.release(fresh.fh)
        # The kernel may still hold the deleted key's name: its GETATTR and OPEN get
        # ESTALE, on which the VFS looks the name up again (and gets ENOENT).
        for call in (lambda: ops.getattr(attr.st_ino, Ctx()),
                     lambda: ops.open(attr.st_ino, os.O_RDONLY, Ctx())):
            with pytest.raises(pyfuse3.FUSEError) as error:
                await call()
            assert error.value.errno == errno.ESTALE
        with pytest.raises(pyfuse3.FUSEError) as error:
            await ops.lookup(DIR_INODES[0], b"Config", Ctx())
        assert error.value.errno == errno.ENOENT
        nursery.cancel_scope.cancel()
    rig.store.close()
