"""What a user sets on a guest key survives a kvpfs restart (issue 16.7).

Mode, owner, group, mtime and the written form of the value (its trailing newline) are
kept beside the pool files; after a restart the same stat and the same bytes come back.
A value another program changed meanwhile wins over what was kept about the old value.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import KvpfsProcess, fuse_missing, skip_unless_ci
from tests.support.hostview import read_pool

NOBODY = 65534
GUEST_GID = 4244  # the mount's --guest-group in the owner test


def test_mode_newline_and_mtime_survive_a_restart(kvp):
    guest = kvp.path("guest")
    (guest / "Secret").write_text("s3cret\n")
    (guest / "Secret").chmod(0o600)
    (guest / "Raw").write_bytes(b"no newline")
    (guest / "Dated").write_text("dated\n")
    os.utime(guest / "Dated", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.chown(guest / "Dated", NOBODY, NOBODY)
    kvp.stop()
    kvp.start()
    assert stat.S_IMODE((guest / "Secret").stat().st_mode) == 0o600
    assert (guest / "Secret").read_bytes() == b"s3cret\n"
    assert (guest / "Raw").read_bytes() == b"no newline"
    dated = (guest / "Dated").stat()
    assert dated.st_mtime_ns == 1_600_000_000_000_000_000
    assert (dated.st_uid, dated.st_gid) == (NOBODY, NOBODY)
    assert read_pool(kvp.pools) == {"Secret": "s3cret", "Raw": "no newline", "Dated": "dated"}
    # No file of kvpfs's own among the pools' that the host or hv_kvp_daemon would read.
    assert sorted(p.name for p in kvp.pools.glob(".kvp_pool_*")) == [
        f".kvp_pool_{n}" for n in range(5)]


def test_a_value_changed_while_kvpfs_was_down_wins(kvp):
    guest = kvp.path("guest")
    (guest / "Changed").write_text("before\n")
    (guest / "Changed").chmod(0o600)
    os.utime(guest / "Changed", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    kvp.stop()
    # Another program (here: the CLI, writing the pool file directly) changes the value.
    subprocess.run([sys.executable, "-m", "kvpfs", "set", "--pool-dir", str(kvp.pools),
                    "guest", "Changed", "after"], check=True, capture_output=True)
    kvp.start()
    assert (guest / "Changed").read_bytes() == b"after"  # not "after\n": the newline was
    assert (guest / "Changed").stat().st_mtime_ns != 1_600_000_000_000_000_000  # the old one's
    assert stat.S_IMODE((guest / "Changed").stat().st_mode) == 0o600  # the key's own: kept


def test_a_key_made_by_a_guest_group_member_keeps_its_owner():
    if fuse_missing():
        skip_unless_ci(str(fuse_missing()))
    # A base that nobody may enter (pytest's tmp_path is private to root).
    base = Path(tempfile.mkdtemp(prefix="kvpfs-owner-"))
    base.chmod(0o755)
    kvp = KvpfsProcess(base, "--allow-other", "--guest-group", str(GUEST_GID))
    kvp.start()
    try:
        path = kvp.path("guest", "FromMember")
        write = "import sys; open(sys.argv[1], 'w').write('hello\\n')"
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        f"--groups={GUEST_GID}", "/usr/bin/python3", "-c", write, str(path)],
                       check=True, capture_output=True, timeout=30)
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, GUEST_GID)
        kvp.stop()
        kvp.start()
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, GUEST_GID)
        assert path.read_text() == "hello\n"
        assert json.dumps(read_pool(kvp.pools)) == json.dumps({"FromMember": "hello"})
    finally:
        kvp.cleanup()
        shutil.rmtree(base, ignore_errors=True)
