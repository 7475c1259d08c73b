"""Fixtures for the real-tool tests: a kvpfs that can be restarted, and each tool's binary."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import REPO, KvpfsProcess, fuse_missing, skip_unless_ci


@pytest.fixture
def kvp(tmp_path):
    """A fresh kvpfs on the simulated host; `kvp.stop(); kvp.start()` restarts it on the same
    pool files (and metadata), as a reboot would."""
    if fuse_missing():
        skip_unless_ci(str(fuse_missing()))
    proc = KvpfsProcess(tmp_path / "kvp").start()
    try:
        yield proc
    finally:
        proc.cleanup()


def tool(name: str, package: str) -> str:
    """The tool's path; skipped without it on a developer's machine, a failure under CI."""
    path = shutil.which(name)
    if path is None:
        skip_unless_ci(f"{name} is missing (Debian package {package}; ./dev.sh setup installs it)")
    assert path is not None
    return path


def salt_call() -> str:
    """salt-call from the venv `./dev.sh setup` makes for Salt (its pins are its own)."""
    path = os.environ.get("KVPFS_SALT_CALL") or str(REPO / ".venv-salt" / "bin" / "salt-call")
    if not os.access(path, os.X_OK):
        skip_unless_ci(f"{path} is missing (./dev.sh setup installs Salt into .venv-salt)")
    return path
