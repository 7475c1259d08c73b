"""Shared fixtures: a real kvpfs process on the simulated host, mounted for real."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpfs import control

REPO = Path(__file__).resolve().parent.parent


def fuse_missing() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if os.geteuid() != 0:
        return "the FUSE tests mount as root (run as root)"
    return None


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="run the long soak variants")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "log_errors(*patterns): kvpfs may log errors (or tracebacks) matching these "
        "regular expressions in this test; any other error it logs fails the test")


# --------------------------------------------------------------------------- the log check
# As s3ql's suite does: a test passes only if kvpfs logged no error and no traceback that the
# test did not announce. Warnings are kvpfs's normal way of refusing bad input and stay allowed.

class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            text = f"{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info:
                text += " (with a traceback)"
            self.lines.append(text)


_LOG_ERROR = re.compile(r"^kvpfs: (?:ERROR|CRITICAL)\b.*$|^Traceback \(most recent call last\):$",
                        re.MULTILINE)
_processes: list[KvpfsProcess] = []


def unexpected_log_errors(lines: list[str], patterns: tuple[str, ...]) -> list[str]:
    return [line for line in lines if not any(re.search(p, line) for p in patterns)]


@pytest.fixture(autouse=True)
def kvpfs_log_check(request):
    """Fail the test if kvpfs, in this process or in a kvpfs subprocess it started, logged an
    error or a traceback that no `log_errors` marker expects."""
    marker = request.node.get_closest_marker("log_errors")
    patterns = tuple(marker.args) if marker else ()
    handler = _ErrorRecords()
    logger = logging.getLogger("kvpfs")
    logger.addHandler(handler)
    first = len(_processes)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        started = _processes[first:]
        del _processes[first:]
    lines = list(handler.lines)
    for proc in started:
        lines += [f"{proc.log}: {m.group(0)}" for m in _LOG_ERROR.finditer(proc.output())]
    unexpected = unexpected_log_errors(lines, patterns)
    if unexpected:
        pytest.fail("kvpfs logged errors this test did not expect:\n" + "\n".join(unexpected),
                    pytrace=False)


def pytest_sessionstart(session):
    reason = fuse_missing()
    if reason and os.environ.get("CI") == "true":
        pytest.exit(f"FUSE is required under CI=true but {reason}", returncode=3)


def skip_unless_ci(reason: str) -> None:
    """Skip on a developer's machine without the tool; under CI=true a missing tool fails,
    since ./dev.sh installs everything the suite needs."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required under CI=true: {reason}")
    pytest.skip(reason)


requires_fuse = pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))


class KvpfsProcess:
    """One `kvpfs mount --simulate` subprocess with its own mount point and pools."""

    source_args: tuple[str, ...] = ("--simulate",)  # what kvpfs serves

    def __init__(self, base: Path, *extra: str) -> None:
        self.base = base
        self.mnt = base / "mnt"
        self.pools = base / "pools"
        self.control = base / "control.sock"
        self.log = base / "kvpfs.log"
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        _processes.append(self)  # its log is checked when the test ends (kvpfs_log_check)

    def start(self, *, timeout: float = 15.0) -> KvpfsProcess:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)  # its reappearance means "ready"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpfs", "mount", str(self.mnt), *self.source_args,
                 "--pool-dir", str(self.pools), "--control", str(self.control), *self.extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while not (self.control.exists() and os.path.ismount(self.mnt)
                   and not _dead_mount(self.mnt)):
            if self.proc.poll() is not None:
                raise AssertionError(f"kvpfs exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kvpfs did not mount within {timeout} s:\n{self.output()}")
            time.sleep(0.02)
        # The simulated host pushes its identity into pool 3 after registering;
        # tests start from a quiet state, once that is done.
        while self.host("status", 0).get("host_data_pushed") is False:
            if time.monotonic() > deadline:
                raise AssertionError(f"the simulated host's data push did not finish:\n"
                                     f"{self.output()}")
            time.sleep(0.02)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def host(self, op: str, pool: int | str, key: str | None = None, value: str | None = None):
        request: dict = {"op": op, "pool": pool}
        if key is not None:
            request["key"] = key
        if value is not None:
            request["value"] = value
        return control.call(self.control, request)

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if os.path.ismount(self.mnt) or _dead_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False,
                           capture_output=True)


class KvpfsDeviceProcess(KvpfsProcess):
    """`kvpfs mount --device PATH`: kvpfs serving a KVP device (e.g. the emulated one)."""

    def __init__(self, base: Path, device: str | os.PathLike[str], *extra: str) -> None:
        super().__init__(base, *extra)
        self.device = os.fspath(device)
        self.source_args = ("--device", self.device)


def _dead_mount(path: Path) -> bool:
    try:
        os.statvfs(path)  # stat may be answered from the kernel's cache
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN
    return False


@pytest.fixture
def kvpfs(tmp_path):
    """A fresh mounted kvpfs per test."""
    if fuse_missing():
        pytest.skip(fuse_missing())
    proc = KvpfsProcess(tmp_path).start()
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture(scope="module")
def shared_kvpfs(tmp_path_factory):
    """One mounted kvpfs for a whole module of tests that use distinct keys."""
    if fuse_missing():
        pytest.skip(fuse_missing())
    proc = KvpfsProcess(tmp_path_factory.mktemp("kvpfs")).start()
    try:
        yield proc
    finally:
        proc.cleanup()
