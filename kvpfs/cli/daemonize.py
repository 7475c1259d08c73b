"""Go to the background only once the filesystem is mounted (the fstab convention).

mount(8) runs its helper and waits for it to exit: the helper must return once
the mount is live, report a failure with a non-zero status and its message on
the caller's stderr, and leave the filesystem served by a detached process.

So we fork *before* trio, pyfuse3 or any thread exists (forking a running
event loop or FUSE session is unsafe). The child starts its own session, runs
kvpfs, and at readiness (`MountConfig.on_ready`, called after `pyfuse3.init`
mounted the filesystem) points its stdio at /dev/null, moves logging to
syslog, and writes one byte to a pipe. The parent waits for that byte, or for
the pipe to close without it (the child failed; its error already went to the
shared stderr), and exits 0 or with the child's status.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable

READY = b"R"

log = logging.getLogger(__name__)

# `run` receives the function to call once the mount is live; it returns an exit status.
Runner = Callable[[Callable[[], None]], int]


def run_in_background(run: Runner) -> int:
    """Run `run(ready)` in a detached child; return the exit status for the caller.

    0 once the child called `ready()`; otherwise the child's own exit status
    (or 128 + signal number if it was killed before it got ready).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        os._exit(_child(run, write_fd))
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            signal_byte = pipe.read(1)
    except KeyboardInterrupt:
        # Interrupted while waiting: do not leave a mount behind that the caller gave up on.
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        return 130
    if signal_byte == READY:
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        print(f"kvpfs: the mount process was killed by {signal.Signals(-code).name}"
              " before the filesystem was ready", file=sys.stderr)
        return 128 - code
    return code or 1  # exited "successfully" without ever being ready: still a failure


def _child(run: Runner, ready_fd: int) -> int:
    """The background process: new session, cwd /, serve until unmounted."""
    os.setsid()  # no controlling terminal: the caller's Ctrl-C and hang-up no longer reach us
    os.chdir("/")  # never keep the caller's working directory busy
    _redirect(0, os.O_RDONLY)
    _redirect(1, os.O_WRONLY)  # stdout chatter is meaningless for a mount helper
    done = False

    def ready() -> None:
        nonlocal done
        if done:
            return
        done = True
        _log_to_syslog()
        _redirect(2, os.O_WRONLY)
        os.write(ready_fd, READY)
        os.close(ready_fd)

    try:
        return run(ready)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger("kvpfs").exception("kvpfs failed")
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _redirect(fd: int, flags: int) -> None:
    null = os.open(os.devnull, flags)
    os.dup2(null, fd)
    os.close(null)


def _log_to_syslog() -> None:
    """Keep logging after stderr is gone: to syslog (the journal) if /dev/log is there."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler):
            root.removeHandler(handler)
    try:
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError:
        return  # no syslog daemon: a detached mount helper has nowhere else to write
    handler.ident = f"kvpfs[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
