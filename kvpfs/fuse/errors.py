"""The one way out of a pyfuse3 handler: FUSEError.

Any other exception would end pyfuse3's main loop and leave a dead mount, so
`handler` turns it into an errno and a log line.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from kvpfs.quietlog import RateLog
from kvpfs.storage.errors import LockTimeout, PoolFileError

log = logging.getLogger(__name__)

# Refusals any local user can provoke at will (bad values, full bounds, read-only pools):
# each is logged, up to a few lines per window, so that a storm of them cannot fill the
# log; the rest are counted.
refusals = RateLog(logging.getLogger("kvpfs.fuse.refusals"), lines=20, window=10.0)

P = ParamSpec("P")
R = TypeVar("R")


def handler(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let only FUSEError out of a handler; anything else is logged and becomes EIO
    (EBUSY for a pool file that stayed locked, ENOSPC/EDQUOT for a full disk)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except LockTimeout as exc:
            log.warning("%s: pool file stayed locked: %s (held by %s)",
                        method.__name__, exc, exc.holders or "unknown")
            raise pyfuse3.FUSEError(errno.EBUSY) from None
        except PoolFileError as exc:
            log.error("%s: %s", method.__name__, exc)
            code = exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s; answered EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper
