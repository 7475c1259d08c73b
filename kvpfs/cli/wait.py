"""`kvpfs wait`: block until a key exists (or changes) instead of `sleep 90`.

The key is named as POOL KEY or as a path to its file in a kvpfs mount
(`kvpfs wait /run/kvp/external/Ready`), which `resolve_path` turns into the
mount (from /proc/self/mountinfo), the pool (the directory's name) and the
key (the file's `user.kvp.key` when it exists, else its name unescaped).

With a kvpfs mount, it reads the mount's change feed (`/.events`) and wakes
on the change itself. Without one (initramfs, hv_kvp_daemon still in charge)
it watches the pool file's signature and re-reads the file only when that
changes.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import sys
import time
from pathlib import Path

from kvpfs import mountinfo
from kvpfs.cli.parser import parse_pool
from kvpfs.cli.results import EXIT_OK, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.poolrecords import stat_signature
from kvpfs.storage.readonly import read_pool
from kvpfs.wire import names
from kvpfs.wire.pools import SYSTEM_POOL_DIR
from kvpfs.wire.protocol import Pool

XATTR_KEY = "user.kvp.key"
XATTR_POOL = "user.kvp.pool"


class NotAKvpfsPath(ValueError):
    """The path does not name a key file in a kvpfs mount; the message says why."""


def resolve_path(path: Path) -> tuple[Path, int, bytes]:
    """(mount point, pool, key) of a key file's path, which need not exist yet."""
    path = Path(os.path.abspath(path))
    if path.name in ("", ".", ".."):
        raise NotAKvpfsPath(f"{path} is not a key's file (POOLDIR/NAME in a kvpfs mount)")
    mounts = mountinfo.kvpfs_mounts()
    # The pool directory's real path: `0`..`4` are links to the pools' directories.
    try:
        parent = Path(os.path.realpath(path.parent, strict=True))
    except OSError as exc:
        raise NotAKvpfsPath(f"{path.parent}: {exc.strerror}") from None
    mount = parent.parent
    if mount not in mounts:
        where = ", ".join(map(str, mounts)) or "none is mounted"
        raise NotAKvpfsPath(f"{path} is not a key's file in a pool directory of a kvpfs mount"
                            f" (kvpfs mounts: {where})")
    pools = {pool.dirname: pool for pool in Pool}
    if parent.name not in pools:
        raise NotAKvpfsPath(f"{parent} is not a pool directory ({', '.join(pools)})")
    pool = pools[parent.name]
    target = parent / path.name
    try:  # the exact key, also for a name shortened past 255 bytes
        key = os.getxattr(target, XATTR_KEY)
        if int(os.getxattr(target, XATTR_POOL)) == pool:
            return mount, pool, key
    except OSError:
        pass  # not there yet (or not readable): the name says it
    try:
        key = names.name_to_key(os.fsencode(path.name))
    except names.InvalidName as exc:
        raise NotAKvpfsPath(f"{path.name!r} is not a file name kvpfs gives a key: {exc}"
                            ) from None
    if names.is_shortened(os.fsencode(path.name)):
        raise NotAKvpfsPath(f"{path.name!r} is a shortened name and no such file exists;"
                            " give POOL KEY instead")
    return mount, pool, key

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
    path = mount / Pool(pool).dirname / os.fsdecode(name)
    wanted = (Pool(pool).dirname.encode(), name)
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
                    # Readable to poll(2) with nothing to read: a kvpfs whose pyfuse3 cannot
                    # poll (before 3.5, kvpfs/compat.py) is always "ready"; do not spin.
                    time.sleep(POLL_INTERVAL if remaining is None
                               else min(POLL_INTERVAL, remaining))
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


def run_wait(args: argparse.Namespace) -> int:
    if args.key is None:  # a path to a key's file in a kvpfs mount
        if args.pool_dir is not None or args.mount is not None:
            print("kvpfs wait: PATH names its mount; --mount and --pool-dir go with POOL KEY",
                  file=sys.stderr)
            return EXIT_USAGE
        try:
            args.mount, args.pool, key = resolve_path(Path(args.pool))
        except NotAKvpfsPath as exc:
            print(f"kvpfs wait: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        try:
            args.pool = parse_pool(args.pool)
        except argparse.ArgumentTypeError as exc:
            print(f"kvpfs wait: {exc}", file=sys.stderr)
            return EXIT_USAGE
        key = os.fsencode(args.key)  # the bytes given on the command line
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        print("kvpfs wait: the key is not valid UTF-8, so no KVP key can match it",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        mounts = [args.mount] if args.mount else mountinfo.kvpfs_mounts()
        if args.pool_dir is None and len(mounts) > 1:
            print("kvpfs wait: several kvpfs mounts are running; choose one with --mount",
                  file=sys.stderr)
            return EXIT_USAGE
        if args.pool_dir is None and mounts:
            value = wait_on_mount(mounts[0], args.pool, key, timeout=args.timeout,
                                       changed=args.changed)
        else:
            value = wait_on_files(args.pool_dir or SYSTEM_POOL_DIR, args.pool, key,
                                       timeout=args.timeout, changed=args.changed)
    except OSError as exc:
        print(f"kvpfs wait: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    if value is None:
        print(f"kvpfs wait: timed out after {args.timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if not args.quiet:
        sys.stdout.buffer.write(value + b"\n")
    return EXIT_OK
