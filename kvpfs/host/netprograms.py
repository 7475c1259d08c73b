"""Running the system's network programs (busctl, nmcli, networkctl, hv_set_ifconfig).

Programs are run with argument lists, never a shell, each bounded by a timeout, with
`LC_ALL=C` so their output can be parsed. `query` asks a running service (only on the
live system); `run` and `run_async` change the system (only when `NetSettings` allows).
The blocking forms are for worker threads; `run_async` is for the trio loop, where a
cancelled call kills the program it runs.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence

import trio

from kvpfs.host.netsettings import NetSettings

log = logging.getLogger(__name__)

_QUERY_TIMEOUT = 3.0


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


def query(settings: NetSettings, argv: Sequence[str]) -> str | None:
    """Output of a read-only query of a running service, or None (not live, missing, failed)."""
    if not settings.live or shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=_QUERY_TIMEOUT, env=_env(), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s failed: %s", shlex.join(argv), exc)
        return None
    if done.returncode != 0:
        log.debug("%s exited %d: %s", shlex.join(argv), done.returncode, done.stderr.strip())
        return None
    return done.stdout


def run(settings: NetSettings, argv: Sequence[str], timeout: float | None = None) -> bool:
    """Run a program that changes the system; True on exit status 0."""
    command = shlex.join(argv)
    if not settings.run_commands:
        log.info("not running (network changes disabled here): %s", command)
        return True
    if shutil.which(argv[0]) is None:
        log.error("cannot run %s: %s is not installed", command, argv[0])
        return False
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout or settings.command_timeout,
                              env=_env(), check=False)
    except subprocess.TimeoutExpired:
        log.error("%s did not finish within %g s", command, timeout or settings.command_timeout)
        return False
    except OSError as exc:
        log.error("cannot run %s: %s", command, exc)
        return False
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        log.error("%s failed (exit status %d): %s", command, done.returncode,
                  " / ".join(detail) or "no output")
        return False
    log.info("ran %s", command)
    return True


async def run_async(settings: NetSettings, argv: Sequence[str], timeout: float) -> bool:
    """`run` as a trio subprocess, so that cancellation (shutdown) terminates it."""
    command = shlex.join(argv)
    if not settings.run_commands:
        log.info("not running (network changes disabled here): %s", command)
        return True
    if await trio.to_thread.run_sync(shutil.which, argv[0]) is None:
        log.error("cannot run %s: %s is not installed", command, argv[0])
        return False
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(list(argv), stdin=subprocess.DEVNULL,
                                          capture_stdout=True, capture_stderr=True,
                                          env=_env(), check=False)
    except trio.TooSlowError:
        log.error("%s did not finish within %g s", command, timeout)
        return False
    except OSError as exc:
        log.error("cannot run %s: %s", command, exc)
        return False
    if done.returncode != 0:
        output = (done.stderr or done.stdout).decode("utf-8", "replace")
        detail = output.strip().splitlines()[-3:]
        log.error("%s failed (exit status %d): %s", command, done.returncode,
                  " / ".join(detail) or "no output")
        return False
    log.info("ran %s", command)
    return True
