"""`kvpfs wait`: block until a key exists (or changes) instead of `sleep 90`.

With a kvpfs mount, it reads the mount's change feed (`/.events`) and wakes
on the change itself. Without one (initramfs, hv_kvp_daemon still in charge)
it watches the pool file's signature and re-reads the file only when that
changes.
"""

from __future__ import annotations

import errno
import os
import select
import time
from pathlib import Path

from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.poolrecords import stat_signature
from kvpfs.storage.readonly import read_pool
from kvpfs.wire import names
from kvpfs.wire.pools import POOL_NAMES

POLL_INTERVAL = 0.1


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _read_value(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _satisfied(value: bytes | None, initial: bytes | None, changed: bool) -> bool:
    if value is None:
        return False
    return not changed or value != initial


def wait_on_mount(mount: Path, pool: int, key: bytes, *, timeout: float | None,
                  changed: bool) -> bytes | None:
    """The key's value once present (or changed), None on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    name = names.key_to_name(key)
    path = mount / POOL_NAMES[pool] / os.fsdecode(name)
    wanted = (POOL_NAMES[pool].encode(), name)
    fd = os.open(mount / ".events", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # The feed is open before the first look: no change can slip in between.
        initial = _read_value(path)
        if _satisfied(initial, None, False) and not changed:
            return initial
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pending = b""
        while True:
            remaining = _remaining(deadline)
            if remaining == 0.0:
                return None
            if not poller.poll(None if remaining is None else int(remaining * 1000) + 1):
                continue
            try:
                pending += os.read(fd, 65536)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            *lines, pending = pending.split(b"\n")
            for line in lines:
                op, _, rest = line.partition(b" ")
                line_pool, _, line_name = rest.partition(b" ")
                if op == b"overflow" or (line_pool, line_name) == wanted:
                    value = _read_value(path)
                    if _satisfied(value, initial, changed):
                        return value
    finally:
        os.close(fd)


def wait_on_files(pool_dir: Path, pool: int, key: bytes, *, timeout: float | None,
                  changed: bool) -> bytes | None:
    """The same, watching the pool file itself."""
    deadline = None if timeout is None else time.monotonic() + timeout
    path = pool_path(pool_dir, pool)

    def current() -> bytes | None:
        return read_pool(pool_dir, pool).get(key)

    signature = stat_signature(path)
    initial = current()
    if _satisfied(initial, None, False) and not changed:
        return initial
    while True:
        remaining = _remaining(deadline)
        if remaining == 0.0:
            return None
        time.sleep(POLL_INTERVAL if remaining is None else min(POLL_INTERVAL, remaining))
        now = stat_signature(path)
        if now != signature:
            signature = now
            value = current()
            if _satisfied(value, initial, changed):
                return value
