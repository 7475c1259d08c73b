"""Who may do what in a kvpfs mount, tried as a real unprivileged user.

The kernel enforces kvpfs's modes (default_permissions). Each case runs a
small probe as `nobody` (uid/gid 65534) through setpriv, with or without a
supplementary group, against a real mount:

* without --allow-other, nobody is refused the whole mount;
* with --allow-other: auto_external readable, external (secrets) not, guest
  read-only;
* --guest-group GID lets that group's members write guest/, and the host sees
  what they wrote;
* --external-readable opens external/ for reading, never for writing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import KvpfsProcess, requires_fuse

pytestmark = requires_fuse

NOBODY = 65534
GUEST_GID = 4242  # a group nobody is not a member of (no name needed: kvpfs takes a gid)

# Runs as the unprivileged user with the system Python (the venv may sit in a
# directory nobody cannot enter). Each operation reports "ok" or its errno name.
PROBE = r"""
import errno, json, os, sys
results = []
for op, path, *data in json.loads(sys.argv[1]):
    try:
        if op == "read":
            with open(path, "rb") as f:
                f.read()
        elif op == "write":
            with open(path, "wb") as f:
                f.write(data[0].encode())
        elif op == "list":
            os.listdir(path)
        elif op == "stat":
            os.stat(path)
        elif op == "unlink":
            os.unlink(path)
        results.append("ok")
    except OSError as exc:
        results.append(errno.errorcode.get(exc.errno, str(exc.errno)))
print(json.dumps(results))
"""


def probe(ops: list[tuple[str, ...]], *, groups: list[int] | None = None) -> list[str]:
    """Run `ops` as nobody (with only `groups` as supplementary groups)."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python, "the probe needs the system python3"
    group_args = ([f"--groups={','.join(map(str, groups))}"] if groups
                  else ["--clear-groups"])
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *group_args, "--",
         python, "-c", PROBE, json.dumps([[str(part) for part in op] for op in ops])],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def public_base():
    """A base directory nobody can traverse (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="kvpfs-perm-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def start(public_base):
    """Start a kvpfs with the given options in `public_base`; stop it afterwards."""
    started: list[KvpfsProcess] = []

    def run(*extra: str) -> KvpfsProcess:
        proc = KvpfsProcess(public_base, *extra).start()
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.cleanup()


def secret(kvpfs: KvpfsProcess) -> str:
    key = f"secret-{uuid.uuid4().hex[:8]}"
    assert kvpfs.host("set", "external", key, "hunter2")["status"] == 0
    return key


def test_without_allow_other_nobody_is_refused_the_mount(start):
    kvpfs = start()
    results = probe([("stat", kvpfs.mnt), ("list", kvpfs.mnt),
                     ("read", kvpfs.path("auto_external", "VirtualMachineId"))])
    assert results == ["EACCES", "EACCES", "EACCES"]
    # ...while root, the owner, still gets in.
    assert kvpfs.path("auto_external", "VirtualMachineId").read_text()


def test_allow_other_default_modes(start):
    kvpfs = start("--allow-other")
    key = secret(kvpfs)
    status = kvpfs.path("guest", "Status")
    status.write_text("Ready\n")
    results = probe([
        ("read", kvpfs.path("auto_external", "VirtualMachineId")),
        ("list", kvpfs.path("auto_external")),
        ("list", kvpfs.path("auto")),
        ("read", kvpfs.path("external", key)),
        ("list", kvpfs.path("external")),
        ("read", status),
        ("write", status, "hijacked"),
        ("write", kvpfs.path("guest", "NewKey"), "x"),
        ("unlink", status),
    ])
    assert results == ["ok", "ok", "ok", "EACCES", "EACCES", "ok", "EACCES", "EACCES", "EACCES"]
    assert dict(kvpfs.host("list", "guest")["items"]) == {"Status": "Ready"}


def test_guest_group_members_write_guest(start):
    kvpfs = start("--allow-other", "--guest-group", str(GUEST_GID))
    key = secret(kvpfs)
    ops = [("write", kvpfs.path("guest", "FromGroup"), "hello\n"),
           ("read", kvpfs.path("guest", "FromGroup")),
           ("read", kvpfs.path("external", key))]
    assert probe(ops, groups=[GUEST_GID]) == ["ok", "ok", "EACCES"]
    assert dict(kvpfs.host("list", "guest")["items"])["FromGroup"] == "hello"
    # The member who made the key owns it, as on any filesystem (docs/tools.md); out of the
    # group, nobody may write guest/ or a key somebody else made.
    assert kvpfs.path("guest", "FromGroup").stat().st_uid == NOBODY
    kvpfs.path("guest", "FromRoot").write_text("root's\n")
    assert probe([("write", kvpfs.path("guest", "FromRoot"), "no"),
                  ("write", kvpfs.path("guest", "Other"), "no")]) == ["EACCES", "EACCES"]
    assert probe([("unlink", kvpfs.path("guest", "FromGroup"))], groups=[GUEST_GID]) == ["ok"]
    assert "FromGroup" not in dict(kvpfs.host("list", "guest")["items"])


def test_external_readable(start):
    kvpfs = start("--allow-other", "--external-readable")
    key = secret(kvpfs)
    assert probe([("list", kvpfs.path("external")), ("read", kvpfs.path("external", key)),
                  ("write", kvpfs.path("external", key), "x")]) == ["ok", "ok", "EACCES"]
