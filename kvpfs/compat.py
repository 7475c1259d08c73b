"""Every difference between the library versions kvpfs runs on, in one place.

kvpfs runs on the newest trio and pyfuse3 from PyPI and on what the distributions
ship: Debian 12 (trio 0.22.0, pyfuse3 3.2.1, Python 3.11), Ubuntu 24.04 (0.24.0,
3.3.0, 3.12), Debian 13 (0.29.0, 3.4.0, 3.13) and Ubuntu 26.04 (0.32.0, 3.4.0, 3.14);
CI tests each of the first three (docs/packaging.md). The rest of the code calls the
helpers here instead of testing versions itself, so that dropping an old release
later means deleting lines in this module only.

What differs:

- trio 0.23 renamed `to_thread.run_sync(cancellable=)` to `abandon_on_cancel=`
  (the old name is deprecated, and will go) and added `thread_name=`;
- before trio 0.23 `nursery.start` wrapped an error its task raised before
  `task_status.started()` in an ExceptionGroup of one (with strict groups);
- pyfuse3 3.5 brought poll support (`Operations.poll`, `PollHandle`); before it (all
  four distributions above), the kernel takes every kvpfs file as always readable,
  so `/.events` cannot be waited on with poll/select: `kvpfs wait` (kvpfs/cli/wait.py)
  then reads it every 0.1 s instead of spinning, and `fuse_can_poll()` tells the tests;
- before trio 0.25 (Debian 12, Ubuntu 24.04) a nursery re-raised a lone child
  exception bare, not wrapped in an ExceptionGroup. kvpfs is written for the new rule
  (`strict_exception_groups`, accepted by `trio.run` since 0.22), so `run` asks for it
  on every version.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

TRIO_VERSION = tuple(int(part) for part in trio.__version__.split(".")[:2])
_RUN_SYNC_KEYWORDS = inspect.signature(trio.to_thread.run_sync).parameters


async def to_thread_run_sync(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False,
                             thread_name: str | None = None) -> T:
    """`trio.to_thread.run_sync` with the keywords of trio >= 0.23 on any version.

    `abandon_on_cancel` was `cancellable` before 0.23. `thread_name` did not exist:
    there the worker thread gets the name (Python's, not the kernel's that `ps -L`
    shows) for the duration of the call.
    """
    keywords: dict[str, Any] = {}
    if abandon_on_cancel:
        name = "abandon_on_cancel" if "abandon_on_cancel" in _RUN_SYNC_KEYWORDS else "cancellable"
        keywords[name] = True
    if thread_name is not None:
        if "thread_name" in _RUN_SYNC_KEYWORDS:
            keywords["thread_name"] = thread_name
        else:
            fn = functools.partial(_named, thread_name, fn)
    return await trio.to_thread.run_sync(fn, *args, **keywords)


def _named(name: str, fn: Callable[..., T], *args: Any) -> T:
    thread = threading.current_thread()
    before, thread.name = thread.name, name
    try:
        return fn(*args)
    finally:
        thread.name = before


async def start(nursery: trio.Nursery, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """`nursery.start(fn, *args)`; a failure before `started()` comes out bare, as since 0.23,
    so that the caller can catch it by its own type."""
    if TRIO_VERSION >= (0, 23):
        return await nursery.start(fn, *args)
    try:
        return await nursery.start(fn, *args)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def fuse_can_poll() -> bool:
    """Whether pyfuse3 passes poll(2) on to the filesystem (3.5 and later)."""
    import pyfuse3  # here: the command line's client side never needs it

    return hasattr(pyfuse3, "PollHandle")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`trio.run` with strict exception groups, the default only since trio 0.25."""
    return trio.run(fn, *args, strict_exception_groups=True)
