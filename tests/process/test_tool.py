"""`kvpfs get/set/rm/ls/status/dump` as scripts meet them: the real command in a subprocess,
real pool files (including the reference daemon's), real locks held by other processes, and a
real kvpfs mount that must notice what the command wrote."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from kvpfs import __version__
from kvpfs.cli.formats import export_name
from kvpfs.cli.status import boot_time
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import (
    KEY_FIELD,
    RECORD_SIZE,
    VALUE_FIELD,
    encode_record,
    parse_pool,
)
from kvpfs.wire import limits
from tests.conftest import REPO, KvpfsProcess
from tests.support.waiting import wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference-daemon"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="reference fixtures missing")


def kvpfs_cmd(*args: str | bytes | Path, input: bytes | None = None, env: dict | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m kvpfs ARGS` and capture bytes (values are compared exactly)."""
    return subprocess.run([sys.executable, "-m", "kvpfs", *map(os.fsencode, args)],
                          input=input, capture_output=True, timeout=timeout, cwd=REPO,
                          env=env)


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def expected_pools() -> dict[int, list[tuple[str, str]]]:
    data = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
    return {int(n): [(k, v) for k, v in items] for n, items in data.items()}


@pytest.fixture
def pools(tmp_path: Path) -> Path:
    """A writable copy of the reference daemon's pool files (the originals are read-only)."""
    directory = tmp_path / "pools"
    directory.mkdir(mode=0o700)
    if FIXTURES.is_dir():
        for n in range(5):
            shutil.copyfile(pool_path(FIXTURES, n), pool_path(directory, n))
            os.chmod(pool_path(directory, n), 0o600)
    return directory


def write_pool(directory: Path, pool: int, slots: list[bytes]) -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    path = pool_path(directory, pool)
    path.write_bytes(b"".join(slots))
    return path


def raw_slot(key: bytes, value: bytes) -> bytes:
    """A slot with arbitrary bytes (even invalid UTF-8), NUL terminated."""
    return key.ljust(KEY_FIELD, b"\0") + value.ljust(VALUE_FIELD, b"\0")


def records(directory: Path, pool: int) -> list[tuple[bytes, bytes]]:
    parsed, _ = parse_pool(pool_path(directory, pool).read_bytes())
    return [(r.key, r.value) for r in parsed]


# --------------------------------------------------------------------------- limits


def test_limits_are_the_hosts() -> None:
    """One set of limits for the mount, the store and the tool (kvpfs.wire.limits)."""
    assert (limits.KEY_MAX_UNITS, limits.VALUE_MAX_UNITS) == (254, 1022)
    assert (limits.KEY_MAX_BYTES, limits.VALUE_MAX_BYTES) == (511, 2047)


# --------------------------------------------------------------------------- get


@needs_fixtures
def test_get_every_reference_key(pools: Path) -> None:
    names = ("external", "guest", "auto", "auto_external", "auto_internal")
    for pool, items in expected_pools().items():
        for i, (key, value) in enumerate(dict(items).items()):
            # Alternate pool numbers and names, with and without the newline.
            if i % 2:
                assert ok(kvpfs_cmd("get", "--pool-dir", pools, str(pool), key)) == (
                    value.encode() + b"\n")
            else:
                assert ok(kvpfs_cmd("get", "--pool-dir", pools, "--raw", names[pool], key)) == (
                    value.encode())
    # The later of two PROVISIONING_REPORT records wins.
    assert ok(kvpfs_cmd("get", "--pool-dir", pools, "guest", "PROVISIONING_REPORT")).startswith(
        b"result=success")


@needs_fixtures
def test_get_missing_key_is_exit_1_with_nothing_on_stdout(pools: Path, tmp_path: Path) -> None:
    for args in (("guest", "NoSuchKey"), ("auto_external", "hostname"),  # case matters
                 ("auto_external", "HostName\n")):
        result = kvpfs_cmd("get", "--pool-dir", pools, *args)
        assert (result.returncode, result.stdout) == (1, b"")
    result = kvpfs_cmd("get", "--pool-dir", tmp_path / "nowhere", "guest", "Status")
    assert (result.returncode, result.stdout) == (1, b"")
    assert b"does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists()  # reading never creates anything
    result = kvpfs_cmd("get", "--pool-dir", pools, "auto", "OSName")
    assert result.returncode == 1 and b"computed" in result.stderr


def test_bad_pool_is_a_usage_error(tmp_path: Path) -> None:
    for pool in ("5", "guests", "-1"):
        result = kvpfs_cmd("get", "--pool-dir", tmp_path, pool, "k")
        assert result.returncode == 2 and result.stdout == b""


def test_output_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    write_pool(tmp_path, 3, [encode_record(b"Note", "café ☃ 日本".encode())])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    assert ok(kvpfs_cmd("get", "--pool-dir", tmp_path, "3", "Note", env=env)) == (
        "café ☃ 日本\n".encode())
    assert json.loads(ok(kvpfs_cmd("ls", "--json", "--pool-dir", tmp_path, "3", env=env))) == {
        "Note": "café ☃ 日本"}


# --------------------------------------------------------------------------- ls


@needs_fixtures
def test_ls_json_is_last_wins_and_all_records_is_the_file(pools: Path) -> None:
    for pool, items in expected_pools().items():
        last_wins = json.loads(ok(kvpfs_cmd("ls", "--json", "--pool-dir", pools, str(pool))))
        assert last_wins == dict(items)
        everything = json.loads(ok(kvpfs_cmd("ls", "--json", "--all-records", "--pool-dir",
                                             pools, str(pool))))
        assert everything == [list(item) for item in items]


@needs_fixtures
def test_ls_text(pools: Path) -> None:
    text = ok(kvpfs_cmd("ls", "--pool-dir", pools, "guest")).decode()
    lines = text.splitlines()
    assert len(lines) == 3  # PROVISIONING_REPORT once, with its last value
    assert "Status\tBooting" in lines
    assert [line.split("\t")[0] for line in lines].count("PROVISIONING_REPORT") == 1
    assert "PROVISIONING_REPORT\tresult=success" in text
    every = ok(kvpfs_cmd("ls", "--all-records", "--pool-dir", pools, "guest")).decode()
    slots = [line.split("\t") for line in every.splitlines()]
    assert [s[0] for s in slots] == ["0", "1", "2", "3"]
    assert [s[1] for s in slots].count("PROVISIONING_REPORT") == 2
    assert all(len(s) == 3 for s in slots)


def test_ls_text_keeps_one_record_per_line(tmp_path: Path) -> None:
    write_pool(tmp_path, 1, [encode_record(b"multi\nline", b"a\tb\\c\nd\x01")])
    text = ok(kvpfs_cmd("ls", "--pool-dir", tmp_path, "guest")).decode()
    assert text == "multi\\nline\ta\\tb\\\\c\\nd\\x01\n"


def test_ls_of_a_missing_pool_is_empty(tmp_path: Path) -> None:
    result = kvpfs_cmd("ls", "--json", "--pool-dir", tmp_path / "none", "guest")
    assert result.returncode == 0 and json.loads(result.stdout) == {}
    assert b"does not exist" in result.stderr


def test_invalid_records_are_never_shown_as_values(tmp_path: Path) -> None:
    bad_value = raw_slot(b"Broken", b"caf\xe9")  # latin-1, not UTF-8
    bad_key = raw_slot(b"K\xff", b"secret-ish")
    empty_key = raw_slot(b"", b"orphan")
    slots = [encode_record(b"a", b"1"), bad_value, bad_key, encode_record(b"b", b"2"),
             empty_key, encode_record(b"Broken", b"older? no: valid and later")]
    path = write_pool(tmp_path, 1, slots)
    with open(path, "ab") as f:
        f.write(b"partial record")  # a writer died mid-append
    before = path.read_bytes()

    result = kvpfs_cmd("ls", "--json", "--pool-dir", tmp_path, "guest")
    assert json.loads(ok(result)) == {"a": "1", "b": "2", "Broken": "older? no: valid and later"}
    assert b"3 record(s) not shown" in result.stderr and b"slot 1, 2, 4" in result.stderr

    everything = json.loads(ok(kvpfs_cmd("ls", "--json", "--all-records", "--pool-dir",
                                         tmp_path, "guest")))
    assert everything[0] == ["a", "1"] and everything[3] == ["b", "2"]
    assert everything[1] == {"invalid": True, "slot": 1, "reason": "value is not valid UTF-8",
                             "key_hex": b"Broken".hex(), "value_bytes": 4}
    assert everything[2]["key_hex"] == "4bff" and everything[2]["reason"].startswith("key")
    assert everything[4]["reason"] == "empty key"
    assert len(everything) == 6
    text = ok(kvpfs_cmd("ls", "--all-records", "--pool-dir", tmp_path, "guest")).decode()
    assert "secret-ish" not in text and "caf" not in text
    assert text.splitlines()[2] == "2\t(invalid record: key is not valid UTF-8; key_hex 4bff)"

    exported = kvpfs_cmd("ls", "--export", "--pool-dir", tmp_path, "guest")
    assert b"secret-ish" not in exported.stdout and b"not shown" in exported.stderr

    # The only valid record of a key wins over an invalid one; a key found only in invalid
    # records is missing (and says why).
    write_pool(tmp_path / "two", 1, [bad_value])
    result = kvpfs_cmd("get", "--pool-dir", tmp_path / "two", "guest", "Broken")
    assert (result.returncode, result.stdout) == (1, b"")
    assert b"not valid UTF-8" in result.stderr

    status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", tmp_path)))
    guest = status["pools"][1]
    assert (guest["records"], guest["invalid"], guest["invalid_slots"]) == (6, 3, [1, 2, 4])
    assert (guest["unique_keys"], guest["duplicates"]) == (3, 0)
    assert guest["trailing_bytes"] == len(b"partial record")
    assert path.read_bytes() == before  # readers never touch the file


# --------------------------------------------------------------------------- --export

EVAL_AND_PRINT = r"""
set -eu
eval "$1"
shift
for name in "$@"; do printf '%s\0' "${!name}"; done
"""


def eval_exports(exports: bytes, *names: str) -> list[bytes]:
    """What bash gets back after `eval "$(kvpfs ls --export)"`, exactly, per variable."""
    result = subprocess.run(["bash", "-c", EVAL_AND_PRINT, "bash", exports, *names],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(b"\0")[:-1]


TRICKY = {
    "quote": "it's a 'quoted' value",
    "newline": "line one\nline two\n",
    "spaces": "  leading and trailing  ",
    "shell": "$HOME `id` $(id) \\ \" ! * ? ; | & > <",
    "unicode": "café ☃ 日本",
    "empty": "",
    "only-quotes": "''''",
    "dashes-and.dots": "x",
}


def test_export_survives_eval_exactly(tmp_path: Path) -> None:
    for key, value in TRICKY.items():
        ok(kvpfs_cmd("set", "--pool-dir", tmp_path, "guest", key, "-",
                     input=value.encode() + b"\n"))
    result = kvpfs_cmd("ls", "--export", "--pool-dir", tmp_path, "guest")
    exports = ok(result)
    assert result.stderr == b""
    assert b"export KVP_quote='it'\\''s a '\\''quoted'\\'' value'\n" in exports
    names = [export_name(key) for key in TRICKY]
    assert names[-1] == "KVP_dashes_and_dots"
    assert eval_exports(exports, *names) == [v.encode() for v in TRICKY.values()]


@needs_fixtures
def test_export_of_the_reference_pools(pools: Path) -> None:
    for pool, items in expected_pools().items():
        exports = ok(kvpfs_cmd("ls", "--export", "--pool-dir", pools, str(pool)))
        last = dict(items)
        names = [export_name(k) for k in last]
        assert len(exports.splitlines()) == len(last)
        assert eval_exports(exports, *names) == [v.encode() for v in last.values()]


def test_export_names_that_collide_are_reported(tmp_path: Path) -> None:
    write_pool(tmp_path, 1, [encode_record(b"a.b", b"first"), encode_record(b"a-b", b"second"),
                             encode_record(b"\xc3\xa9", b"e-acute")])
    result = kvpfs_cmd("ls", "--export", "--pool-dir", tmp_path, "guest")
    lines = ok(result).decode().splitlines()
    assert lines == ["export KVP_a_b='first'", "export KVP_a_b='second'", "export KVP__='e-acute'"]
    assert b"KVP_a_b" in result.stderr and b"'a.b', 'a-b'" in result.stderr
    assert eval_exports(ok(result), "KVP_a_b") == [b"second"]


def test_export_prefix(tmp_path: Path) -> None:
    write_pool(tmp_path, 3, [encode_record(b"HostName", b"node")])
    exports = ok(kvpfs_cmd("ls", "--export", "--prefix", "HV_", "--pool-dir", tmp_path, "3"))
    assert exports == b"export HV_HostName='node'\n"
    for bad in ("1X", "A-B", ""):
        result = kvpfs_cmd("ls", "--export", f"--prefix={bad}", "--pool-dir", tmp_path, "3")
        assert (result.returncode, result.stdout) == (2, b"")
    result = kvpfs_cmd("ls", "--export", "--all-records", "--pool-dir", tmp_path, "3")
    assert result.returncode == 2
    result = kvpfs_cmd("ls", "--export", "--json", "--pool-dir", tmp_path, "3")
    assert result.returncode == 2


# --------------------------------------------------------------------------- set / rm


@needs_fixtures
def test_set_upserts_like_the_daemon(pools: Path) -> None:
    before = records(pools, 1)
    size = pool_path(pools, 1).stat().st_size
    ok(kvpfs_cmd("set", "--pool-dir", pools, "guest", "PROVISIONING_REPORT", "result=again"))
    after = records(pools, 1)
    # The last duplicate is modified in place; the earlier one and the order stay.
    assert after[:3] == before[:3] and after[3] == (b"PROVISIONING_REPORT", b"result=again")
    assert pool_path(pools, 1).stat().st_size == size
    ok(kvpfs_cmd("set", "--pool-dir", pools, "guest", "Status", "Ready"))
    assert records(pools, 1)[2] == (b"Status", b"Ready")
    ok(kvpfs_cmd("set", "--pool-dir", pools, "guest", "New", "value"))
    assert records(pools, 1)[4] == (b"New", b"value")
    assert ok(kvpfs_cmd("get", "--pool-dir", pools, "guest", "New")) == b"value\n"
    # The modified slot is written whole and zero-padded (the fixture had stray bytes there).
    data = pool_path(pools, 1).read_bytes()
    assert data[2 * RECORD_SIZE : 3 * RECORD_SIZE] == encode_record(b"Status", b"Ready")
    # Setting the same value again writes nothing.
    mtime = pool_path(pools, 1).stat().st_mtime_ns
    time.sleep(0.01)
    ok(kvpfs_cmd("set", "--pool-dir", pools, "1", "New", "value"))
    assert pool_path(pools, 1).stat().st_mtime_ns == mtime


def test_set_creates_a_private_pool(tmp_path: Path) -> None:
    directory = tmp_path / "hyperv"
    ok(kvpfs_cmd("set", "--pool-dir", directory, "guest", "k", "v"))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(pool_path(directory, 1).stat().st_mode) == 0o600
    assert records(directory, 1) == [(b"k", b"v")]
    assert not pool_path(directory, 0).exists()


def test_set_from_stdin(tmp_path: Path) -> None:
    cases = [(b"Ready\n", [], b"Ready"), (b"two\n\n", [], b"two\n"), (b"none", [], b"none"),
             (b"kept\n", ["--raw"], b"kept\n"), (b"", [], b""), (b"\n", [], b"")]
    for data, flags, stored in cases:
        ok(kvpfs_cmd("set", "--pool-dir", tmp_path, *flags, "guest", "k", "-", input=data))
        assert ok(kvpfs_cmd("get", "--raw", "--pool-dir", tmp_path, "guest", "k")) == stored
    # Values from the command line are taken as they are; `--` lets one start with a dash.
    ok(kvpfs_cmd("set", "--pool-dir", tmp_path, "guest", "k", "--", "-x\n"))
    assert records(tmp_path, 1) == [(b"k", b"-x\n")]


def test_writes_to_host_pools_are_refused(tmp_path: Path) -> None:
    write_pool(tmp_path, 0, [encode_record(b"user-data", b"from the host")])
    before = {n: pool_path(tmp_path, n).read_bytes() if pool_path(tmp_path, n).exists() else None
              for n in range(5)}
    for pool in ("external", "0", "auto_external", "auto_internal", "auto"):
        for args in (("set", pool, "user-data", "x"), ("rm", pool, "user-data")):
            result = kvpfs_cmd(args[0], "--pool-dir", tmp_path, *args[1:])
            assert result.returncode == 2, (pool, args)
            assert b"guest" in result.stderr
    after = {n: pool_path(tmp_path, n).read_bytes() if pool_path(tmp_path, n).exists() else None
             for n in range(5)}
    assert after == before
    # --force-pool writes a host pool file (tests, repairs), but never the computed pool 2.
    ok(kvpfs_cmd("set", "--force-pool", "--pool-dir", tmp_path, "external", "user-data", "x"))
    assert records(tmp_path, 0) == [(b"user-data", b"x")]
    ok(kvpfs_cmd("rm", "--force-pool", "--pool-dir", tmp_path, "external", "user-data"))
    assert records(tmp_path, 0) == []
    assert kvpfs_cmd("set", "--force-pool", "--pool-dir", tmp_path, "auto", "k", "v"
                     ).returncode == 2
    assert not pool_path(tmp_path, 2).exists()


LIMIT_CASES_OK = [
    ("k" * 254, "v"),  # 254 UTF-16 units
    ("😀" * 127, "v"),  # 254 units, 508 bytes
    ("k", "v" * 1022),
    ("k", "é" * 1022),  # 1022 units, 2044 bytes
]
LIMIT_CASES_REFUSED = [
    ("k" * 255, "v", b"255 UTF-16 units"),
    ("😀" * 128, "v", b"256 UTF-16 units"),
    ("日" * 171, "v", b"513 bytes"),  # 171 units but 513 bytes: no room in the key field
    ("k", "v" * 1023, b"1023 UTF-16 units"),
    ("k", "😀" * 512, b"1024 UTF-16 units"),
    ("k", "日" * 700, b"2100 bytes"),  # 700 units but more than the value field
]


def test_limits(tmp_path: Path) -> None:
    for key, value in LIMIT_CASES_OK:
        ok(kvpfs_cmd("set", "--pool-dir", tmp_path, "guest", key, "-", input=value.encode()))
        assert ok(kvpfs_cmd("get", "--raw", "--pool-dir", tmp_path, "guest", key)) == (
            value.encode())
    before = pool_path(tmp_path, 1).read_bytes()
    refused = [(key.encode(), value.encode(), why) for key, value, why in LIMIT_CASES_REFUSED]
    refused += [
        (b"", b"v", b"empty"),
        (b"caf\xe9", b"v", b"not valid UTF-8"),  # a latin-1 key from argv
        (b"k", b"caf\xe9", b"not valid UTF-8"),
        (b"k", b"a\0b", b"NUL"),
    ]
    for key, value, why in refused:
        if b"\0" in value:  # argv cannot carry NUL
            result = kvpfs_cmd("set", "--pool-dir", tmp_path, "guest", key, "-", input=value)
        else:
            result = kvpfs_cmd("set", "--pool-dir", tmp_path, "guest", key, "--", value)
        assert result.returncode == 2, (key, value, result.stderr)
        assert why in result.stderr, result.stderr
        assert result.stdout == b""
    # stdin is read no further than a valid value could go.
    result = kvpfs_cmd("set", "--pool-dir", tmp_path, "guest", "k", "-", input=b"x" * 10**7)
    assert result.returncode == 2 and b"longer than 2047 bytes" in result.stderr
    assert pool_path(tmp_path, 1).read_bytes() == before  # nothing written


def test_rm_removes_every_record_of_the_key(tmp_path: Path) -> None:
    write_pool(tmp_path, 1, [encode_record(b"dup", b"1"), encode_record(b"keep", b"x"),
                             encode_record(b"dup", b"2"), encode_record(b"after", b"y"),
                             encode_record(b"dup", b"3")])
    ok(kvpfs_cmd("rm", "--pool-dir", tmp_path, "guest", "dup"))
    assert records(tmp_path, 1) == [(b"keep", b"x"), (b"after", b"y")]
    result = kvpfs_cmd("rm", "--pool-dir", tmp_path, "guest", "dup")
    assert result.returncode == 1 and b"no key" in result.stderr
    ok(kvpfs_cmd("rm", "--missing-ok", "--pool-dir", tmp_path, "guest", "dup"))
    assert kvpfs_cmd("rm", "--pool-dir", tmp_path / "none", "guest", "k").returncode == 1
    assert not (tmp_path / "none").exists()  # rm never creates a pool


# --------------------------------------------------------------------------- locking

HOLDER = r"""
import fcntl, sys
f = open(sys.argv[1], "r+b")
if sys.argv[2] == "flock":
    fcntl.flock(f, fcntl.LOCK_EX)   # cloud-init, azure-init
else:
    fcntl.lockf(f, fcntl.LOCK_EX)   # hv_kvp_daemon's F_SETLKW
print("ready", flush=True)
sys.stdin.readline()
"""


def hold_lock(path: Path, kind: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)


@pytest.mark.parametrize(("kind", "shown"), [("flock", b"FLOCK"), ("lockf", b"POSIX")])
def test_a_held_lock_times_out_with_exit_4_naming_the_holder(tmp_path: Path, kind: str,
                                                            shown: bytes) -> None:
    path = write_pool(tmp_path, 1, [encode_record(b"k", b"old")])
    holder = hold_lock(path, kind)
    try:
        for args in (("set", "guest", "k", "new"), ("rm", "guest", "k"), ("get", "guest", "k"),
                     ("ls", "guest")):
            started = time.monotonic()
            result = kvpfs_cmd(args[0], "--lock-timeout", "0.5", "--pool-dir", tmp_path,
                               *args[1:])
            elapsed = time.monotonic() - started
            assert result.returncode == 4, (args, result.stderr)
            assert elapsed >= 0.5
            assert f"pid {holder.pid}".encode() in result.stderr and shown in result.stderr
            assert result.stdout == b""
        status = kvpfs_cmd("status", "--json", "--lock-timeout", "0.2", "--pool-dir", tmp_path)
        assert status.returncode == 4
        assert f"pid {holder.pid}".encode() in json.loads(status.stdout)["pools"][1][
            "error"].encode()
    finally:
        release(holder)
    assert records(tmp_path, 1) == [(b"k", b"old")]


def test_set_waits_for_a_lock_released_in_time(tmp_path: Path) -> None:
    path = write_pool(tmp_path, 1, [])
    holder = hold_lock(path, "flock")
    proc = subprocess.Popen([sys.executable, "-m", "kvpfs", "set", "--lock-timeout", "10",
                             "--pool-dir", str(tmp_path), "guest", "k", "v"], cwd=REPO)
    try:
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting
        assert records(tmp_path, 1) == []
    finally:
        release(holder)
    assert proc.wait(timeout=10) == 0
    assert records(tmp_path, 1) == [(b"k", b"v")]


def test_unusable_pool_file_is_exit_4(tmp_path: Path) -> None:
    tmp_path.joinpath("elsewhere").write_bytes(encode_record(b"k", b"v"))
    os.symlink(tmp_path / "elsewhere", pool_path(tmp_path, 1))
    for args in (("get", "guest", "k"), ("set", "guest", "k", "w"), ("ls", "guest")):
        result = kvpfs_cmd(args[0], "--pool-dir", tmp_path, *args[1:])
        assert result.returncode == 4 and b"symlink" in result.stderr
    result = kvpfs_cmd("status", "--pool-dir", tmp_path)
    assert result.returncode == 4 and b"1 guest" in result.stdout and b"symlink" in result.stdout


# --------------------------------------------------------------------------- status


@needs_fixtures
def test_status_counts_and_staleness(pools: Path) -> None:
    boot = boot_time()
    assert boot is not None
    old = boot - 3600
    for n in range(5):
        os.utime(pool_path(pools, n), (old, old))  # as left in a captured image
    status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", pools)))
    assert status["pool_dir"] == str(pools) and status["boot_time"] == boot
    by_pool = {p["pool"]: p for p in status["pools"]}
    guest = by_pool[1]
    assert (guest["records"], guest["unique_keys"], guest["duplicates"]) == (4, 3, 1)
    assert (guest["invalid"], guest["trailing_bytes"]) == (0, 0)
    assert (guest["size"], guest["mode"]) == (4 * RECORD_SIZE, "0600")
    assert by_pool[3]["records"] == 16 and by_pool[2]["size"] == 0
    assert all(p["predates_boot"] is True for p in status["pools"])
    assert any("pool 1 (guest) last changed before this boot" in n for n in status["notes"])

    ok(kvpfs_cmd("set", "--pool-dir", pools, "guest", "Status", "Ready"))
    status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", pools)))
    assert status["pools"][1]["predates_boot"] is False
    assert status["pools"][0]["predates_boot"] is True

    text = ok(kvpfs_cmd("status", "--pool-dir", pools)).decode()
    assert f"pool directory  {pools}" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines()
            if line[:1].isdigit()}
    assert rows["guest"][2:6] == ["4", "3", "1", "0"]
    assert rows["guest"][-1] == "yes" and rows["external"][-1] == "no"

    # `kvpfs set` kept the guest pool's redo journal, empty: nothing unfinished; a journal
    # that still holds a change (a writer killed mid-change) is reported
    journal = pools / ".kvpfs-journal.kvp_pool_1"
    assert journal.stat().st_size == 0
    assert not any(p["interrupted_change"] for p in status["pools"])
    journal.write_bytes(b"kvpfs-redo 2\n(a change cut short)")
    status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", pools)))
    assert [p["interrupted_change"] for p in status["pools"]] == [False, True, False, False, False]
    assert any("a kvpfs change was interrupted" in n for n in status["notes"])


def test_status_of_a_missing_directory(tmp_path: Path) -> None:
    status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", tmp_path / "none")))
    assert status["pool_dir_exists"] is False
    assert [p["exists"] for p in status["pools"]] == [False] * 5
    assert "no file" in ok(kvpfs_cmd("status", "--pool-dir", tmp_path / "none")).decode()


def test_status_finds_hv_kvp_daemon(tmp_path: Path) -> None:
    fake = tmp_path / "hv_kvp_daemon"  # /proc/PID/comm is the executable's name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "30"])
    try:
        status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", tmp_path)))
        assert {"pid": proc.pid, "comm": "hv_kvp_daemon"} in status["hv_kvp_daemon"]
        text = ok(kvpfs_cmd("status", "--pool-dir", tmp_path)).decode()
        assert f"running (pid {proc.pid}, hv_kvp_daemon)" in text
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- dump


@needs_fixtures
def test_dump_to_stdout_is_one_complete_json(pools: Path) -> None:
    result = kvpfs_cmd("dump", "--pool-dir", pools)
    dump = json.loads(ok(result))
    assert b"secrets" in result.stderr  # pool 0's values are in the bundle
    assert dump["format"] == "kvpfs-dump 1" and dump["redacted"] is False
    assert dump["system"]["kvpfs"] == __version__ and dump["system"]["kernel"]
    expected = expected_pools()
    for info in dump["pools"]:
        n = info["pool"]
        assert base64.b64decode(info["raw_base64"]) == pool_path(pools, n).read_bytes()
        assert info["entries"] == [list(item) for item in expected[n]]
        assert info["size"] == pool_path(pools, n).stat().st_size

    redacted = kvpfs_cmd("dump", "--redact", "--pool-dir", pools)
    text = ok(redacted).decode()
    assert b"secrets" not in redacted.stderr
    assert "raw_base64" not in text and "HV-NODE-0042" not in text and "café" not in text
    dump = json.loads(text)
    assert dump["redacted"] is True
    assert dump["pools"][3]["entries"][0] == ["HostName", "<redacted: 12 bytes>"]


@needs_fixtures
@pytest.mark.parametrize("name", ["bundle.tar.gz", "bundle.tar", "bundle.tgz", "bundle-dir"])
def test_dump_to_an_archive_or_directory(pools: Path, tmp_path: Path, name: str) -> None:
    output = tmp_path / name
    ok(kvpfs_cmd("dump", "--output", output, "--pool-dir", pools))
    assert stat.S_IMODE(output.stat().st_mode) == (0o700 if output.is_dir() else 0o600)
    if output.is_dir():
        root = output
    else:
        root = tmp_path / "unpacked"
        with tarfile.open(output) as tar:
            names = tar.getnames()
            assert "kvpfs-dump/dump.json" in names
            assert all(m.mode & 0o077 == 0 for m in tar.getmembers())
            # filter= came with Python 3.11.4 (Debian 12 has 3.11.2); the archive is ours.
            tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                    else {}))
        root = root / "kvpfs-dump"
    dump = json.loads((root / "dump.json").read_bytes())
    assert "raw_base64" not in dump["pools"][0]
    for info in dump["pools"]:
        assert (root / info["raw_file"]).read_bytes() == pool_path(pools, info["pool"]
                                                                   ).read_bytes()
    # The bundle's pool directory is a pool directory: support can run the tools on it.
    assert json.loads(ok(kvpfs_cmd("ls", "--json", "--pool-dir", root / "pools", "3")))[
        "HostName"] == "HV-NODE-0042"
    again = kvpfs_cmd("dump", "--output", output, "--pool-dir", pools)
    assert again.returncode == 2 and b"exists" in again.stderr


def test_dump_tar_holds_no_pools_when_redacted(tmp_path: Path) -> None:
    write_pool(tmp_path / "p", 0, [encode_record(b"secret", b"hunter2")])
    ok(kvpfs_cmd("dump", "--redact", "--output", tmp_path / "b.tar", "--pool-dir", tmp_path / "p"))
    data = (tmp_path / "b.tar").read_bytes()
    assert b"hunter2" not in data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["kvpfs-dump", "kvpfs-dump/dump.json"]


# --------------------------------------------------------------------------- with kvpfs running


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def test_a_running_kvpfs_sees_what_the_command_writes(kvpfs: KvpfsProcess) -> None:
    key = f"Tool-{uuid.uuid4().hex[:8]}"
    ok(kvpfs_cmd("set", "--pool-dir", kvpfs.pools, "guest", key, "from the command line"))
    started = time.monotonic()
    wait_for(lambda: read_or_none(kvpfs.path("guest", key)) == "from the command line", 1.0)
    wait_for(lambda: dict(kvpfs.host("list", "guest")["items"]).get(key)
             == "from the command line", 1.0)
    assert time.monotonic() - started < 1.5

    ok(kvpfs_cmd("set", "--pool-dir", kvpfs.pools, "guest", key, "changed"))
    wait_for(lambda: read_or_none(kvpfs.path("guest", key)) == "changed", 1.0)

    # ...and the command sees what is written through the mount at once.
    kvpfs.path("guest", "FromMount").write_text("mounted\n")
    assert ok(kvpfs_cmd("get", "--pool-dir", kvpfs.pools, "guest", "FromMount")) == b"mounted\n"
    # ...and what the host sets.
    kvpfs.host("set", "external", "pushed", "by the host")
    wait_for(lambda: kvpfs_cmd("get", "--pool-dir", kvpfs.pools, "external", "pushed"
                               ).stdout == b"by the host\n", 2.0)

    ok(kvpfs_cmd("rm", "--pool-dir", kvpfs.pools, "guest", key))
    wait_for(lambda: not kvpfs.path("guest", key).exists(), 1.0)
    wait_for(lambda: key not in dict(kvpfs.host("list", "guest")["items"]), 1.0)

    status = json.loads(ok(kvpfs_cmd("status", "--json", "--pool-dir", kvpfs.pools)))
    mine = [m for m in status["kvpfs_mounts"] if m["mountpoint"] == str(kvpfs.mnt)]
    assert mine and mine[0]["same_pool_dir"] is True and mine[0]["simulated"] is True
