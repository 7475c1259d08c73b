"""The write path against careless and hostile local users, on a real mount.

Every case runs real programs (bash, dash, tee, a Python probe) as `nobody`
through setpriv, with the mount's --guest-group as its only supplementary
group, as a guest writer would:

* parallel `>>` appends from several shells all arrive (issue 13, item 5);
* `echo >>` keeps line separators, and a value reads back as written, its
  trailing newline included, while the host sees it without (13.6, 11.2);
* a redirection that cannot be stored (full pool filesystem, pool lock held by
  another program) makes the shell command fail (13.7);
* sizes and offsets beyond a value are refused with EFBIG before anything is
  allocated, scratch files included; scratch files and unpublished bytes are
  bounded (13.8, 13.10);
* the mount root refuses changes with EACCES (13.10).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from kvpfs.storage import room
from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import parse_pool
from kvpfs.wire import limits
from tests.conftest import KvpfsProcess, requires_fuse, skip_unless_ci
from tests.support.lockholder import start_locker, stop_locker
from tests.support.waiting import wait_for

pytestmark = requires_fuse

NOBODY = 65534
GROUP = 4243  # the mount's --guest-group; nobody gets it as its only supplementary group


def as_member(argv: list[str], *, stdin: str | None = None, timeout: float = 60
              ) -> subprocess.CompletedProcess:
    """Run argv as nobody, a member of the guest group only."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GROUP}", "--",
         *argv], capture_output=True, text=True, timeout=timeout, cwd="/", input=stdin)


def system_python() -> str:
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python, "the probes need the system python3 (the venv may be out of nobody's reach)"
    return python


def shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_unless_ci(f"{name} is not installed")
    return path


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def host_items(kvpfs: KvpfsProcess) -> dict[str, str]:
    return dict(kvpfs.host("list", "guest")["items"])


def pool_keys(kvpfs: KvpfsProcess) -> list[bytes]:
    records, _ = parse_pool(pool_path(kvpfs.pools, 1).read_bytes())
    return [r.key for r in records]


@pytest.fixture
def public_base():
    """A base directory nobody can traverse (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="kvpfs-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    if os.path.ismount(base / "pools"):
        subprocess.run(["umount", "-l", str(base / "pools")], check=False)
    shutil.rmtree(base, ignore_errors=True)


def start(base: Path, *extra: str) -> KvpfsProcess:
    return KvpfsProcess(base, "--allow-other", "--guest-group", str(GROUP), *extra).start()


@pytest.fixture
def mount(public_base):
    proc = start(public_base)
    try:
        yield proc
    finally:
        proc.cleanup()


# ---------------------------------------------------------------- appends


def test_parallel_shell_appends_keep_every_item(mount):
    path = mount.path("guest", unique("list"))
    script = 'for i in $(seq 25); do printf "%s," "$0-$i" >> "$1"; done'
    procs = [subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={GROUP}", "--",
         shell("bash"), "-c", script, f"w{n}", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    expected = sorted(f"w{n}-{i}" for n in range(4) for i in range(1, 26))
    items = path.read_text().split(",")
    assert items[-1] == ""
    assert sorted(items[:-1]) == expected
    assert sorted(host_items(mount)[path.name].split(",")[:-1]) == expected


def test_echo_appends_keep_line_separators(mount):
    path = mount.path("guest", unique("lines"))
    done = as_member([shell("bash"), "-c", 'echo a >> "$1"; echo b >> "$1"; echo c >> "$1"',
                      "sh", str(path)])
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == b"a\nb\nc\n"
    assert path.stat().st_size == 6
    assert host_items(mount)[path.name] == "a\nb\nc"  # the host: one trailing newline dropped


def test_a_refused_append_stores_nothing_and_keeps_earlier_appends(mount):
    new = mount.path("guest", unique("new"))
    done = as_member([shell("bash"), "-c", 'printf "%02000d" 0 >> "$1"', "sh", str(new)])
    assert done.returncode != 0 and "File too large" in done.stderr
    # The kernel sends RELEASE, which drops the refused new name, after close(2) returned.
    wait_for(lambda: not new.exists(), what="the refused new key to vanish")
    assert new.name not in host_items(mount)
    log = mount.path("guest", unique("log"))
    done = as_member([system_python(), "-c", """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, b"one\\n")
try:
    os.write(fd, b"\\xff\\n")
except OSError as exc:
    print(exc.errno)
os.write(fd, b"two\\n")
os.close(fd)
""", str(log)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(errno.EILSEQ)
    assert log.read_bytes() == b"one\ntwo\n"
    assert host_items(mount)[log.name] == "one\ntwo"


def test_read_what_you_wrote_until_the_value_changes(mount):
    """Config management compares what it wrote with what it reads (issue 11, item 2)."""
    path = mount.path("guest", unique("role"))
    done = as_member([shell("bash"), "-c", 'printf "web\\n" > "$1"', "sh", str(path)])
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == b"web\n" and path.stat().st_size == 4
    assert host_items(mount)[path.name] == "web"
    # An editor-style save (a scratch file renamed over the key) reads back the same way.
    scratch = mount.path("guest", f".{path.name}.tmp")
    done = as_member([system_python(), "-c",
                      "import os, sys; open(sys.argv[1], 'w').write('db\\n');"
                      " os.rename(sys.argv[1], sys.argv[2])", str(scratch), str(path)])
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == b"db\n" and host_items(mount)[path.name] == "db"
    # `>>` onto a value written with its newline starts a new line.
    as_member([shell("dash"), "-c", 'echo cache >> "$1"', "sh", str(path)])
    assert path.read_bytes() == b"db\ncache\n"
    # The host changes it: the mount shows the value as it is.
    assert mount.host("set", "guest", path.name, "host value")["status"] == 0
    assert path.read_bytes() == b"host value" and path.stat().st_size == 10


def test_written_form_survives_a_restart(public_base):
    """The written form (its trailing newline) is kept beside the pools (docs/tools.md):
    after a restart reads show the value as written, the host still the stored value."""
    proc = start(public_base)
    try:
        (proc.path("guest", "Role")).write_bytes(b"web\n")
        assert proc.path("guest", "Role").read_bytes() == b"web\n"
        proc.stop()
        proc = start(public_base)
        assert proc.path("guest", "Role").read_bytes() == b"web\n"
        assert host_items(proc)["Role"] == "web"
    finally:
        proc.cleanup()


# ---------------------------------------------------------------- failed stores


def _redirections(path: Path) -> list[tuple[str, list[str]]]:
    return [
        ("bash", [shell("bash"), "-c", 'echo hello > "$1"', "sh", str(path)]),
        ("dash", [shell("dash"), "-c", 'echo hello > "$1"', "sh", str(path)]),
        ("bash >>", [shell("bash"), "-c", 'echo hello >> "$1"', "sh", str(path)]),
        ("tee", [shell("bash"), "-c", 'echo hello | tee "$1" >/dev/null', "sh", str(path)]),
    ]


def _fill(directory: Path) -> Path:
    """Fill the filesystem holding `directory` to the last block."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_pool_filesystem_fails_the_shell_command(public_base):
    pools = public_base / "pools"
    pools.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "kvpfs-test", str(pools)],
                   check=True)
    proc = start(public_base)
    try:
        existing = proc.path("guest", "Existing")
        existing.write_text("old")
        filler = _fill(pools)
        for name, argv in _redirections(proc.path("guest", "NewKey")):
            done = as_member(argv)
            assert done.returncode != 0, f"{name}: exit 0 for a value that was not stored"
            assert "No space left on device" in done.stderr, (name, done.stderr)
            assert "NewKey" not in host_items(proc), name
            assert not proc.path("guest", "NewKey").exists(), name
        assert b"NewKey" not in pool_keys(proc)
        # A key that exists is changed in place and needs no room.
        done = as_member([shell("dash"), "-c", 'echo new > "$1"', "sh", str(existing)])
        assert done.returncode == 0, done.stderr
        assert host_items(proc)["Existing"] == "new"
        filler.unlink()
        done = as_member(_redirections(proc.path("guest", "NewKey"))[0][1])
        assert done.returncode == 0, done.stderr
        assert host_items(proc)["NewKey"] == "hello"
    finally:
        proc.cleanup()


@pytest.mark.parametrize("fallocate", [True, False], ids=["fallocate", "statvfs"])
def test_room_reservation_on_a_full_filesystem(public_base, monkeypatch, fallocate):
    if not fallocate:
        monkeypatch.setattr(room, "_fallocate", None)  # a filesystem without fallocate
    small = public_base / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "kvpfs-room", str(small)],
                   check=True)
    try:
        fd = os.open(small / "pool", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            room.reserve(fd, 0, 4096)  # room now: reserved, size unchanged
            assert os.fstat(fd).st_size == 0
            filler = _fill(small)
            if fallocate:  # the reserved block is still there for the pool
                os.pwrite(fd, b"r" * 4096, 0)
            with pytest.raises(OSError) as info:
                room.reserve(fd, 4096, 2560)
            assert info.value.errno == errno.ENOSPC
            filler.unlink()
            room.reserve(fd, 4096, 2560)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("mode", ["lockf", "flock"])
def test_held_pool_lock_fails_the_shell_command(public_base, mode):
    proc = start(public_base, "--lock-timeout", "0.3")
    locker = None
    try:
        existing = proc.path("guest", "Existing")
        existing.write_text("old")
        locker = start_locker(pool_path(proc.pools, 1), mode)
        for target in ("NewKey", "Existing"):
            for name, argv in _redirections(proc.path("guest", target)):
                done = as_member(argv)
                assert done.returncode != 0, f"{name} on {target}: exit 0, nothing stored"
                assert "Device or resource busy" in done.stderr, (name, done.stderr)
        stop_locker(locker)
        locker = None
        items = host_items(proc)
        assert "NewKey" not in items and items["Existing"] == "old"
        assert "pool file stayed locked" in proc.output()
        done = as_member(_redirections(proc.path("guest", "NewKey"))[1][1])
        assert done.returncode == 0, done.stderr
        assert host_items(proc)["NewKey"] == "hello"
    finally:
        if locker is not None:
            stop_locker(locker)
        proc.cleanup()


def test_a_write_refused_for_the_lock_changes_nothing_and_the_next_one_stores(public_base):
    proc = start(public_base, "--lock-timeout", "0.3")
    locker = None
    try:
        path = proc.path("guest", "Log")
        path.write_bytes(b"first\n")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            locker = start_locker(pool_path(proc.pools, 1), "lockf")
            with pytest.raises(OSError) as info:
                os.write(fd, b"lost\n")
            assert info.value.errno == errno.EBUSY
            stop_locker(locker)
            locker = None
            assert os.write(fd, b"second\n") == 7
        finally:
            os.close(fd)
        assert path.read_bytes() == b"first\nsecond\n"
        assert host_items(proc)["Log"] == "first\nsecond"
    finally:
        if locker is not None:
            stop_locker(locker)
        proc.cleanup()


# ---------------------------------------------------------------- sizes and memory

PROBE = r"""
import errno, json, os, sys
results = []
for op, path, *args in json.loads(sys.argv[1]):
    try:
        if op == "pwrite":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, b"x", int(args[0]))
            finally:
                os.close(fd)
        elif op == "truncate":
            os.truncate(path, int(args[0]))
        elif op == "ftruncate":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, int(args[0]))
            finally:
                os.close(fd)
        elif op == "write":
            with open(path, "wb") as f:
                f.write(args[0].encode())
        results.append("ok")
    except OSError as exc:
        results.append(errno.errorcode.get(exc.errno, str(exc.errno)))
print(json.dumps(results))
"""


def probe(ops: list[tuple]) -> list[str]:
    done = as_member([system_python(), "-c", PROBE, json.dumps([[str(p) for p in op]
                                                                for op in ops])])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def vm_hwm_kib(proc: KvpfsProcess) -> int:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_huge_sizes_and_offsets_are_efbig_before_any_allocation(mount):
    guest = mount.path("guest")
    key = guest / "Sized"
    key.write_text("v")
    before = vm_hwm_kib(mount)
    results = probe([
        ("pwrite", guest / ".scratch", 500_000_000),
        ("pwrite", guest / "Sized", 500_000_000),
        ("pwrite", guest / ".scratch", 2 ** 40),
        ("truncate", guest / ".scratch", 700_000_000),
        ("ftruncate", guest / ".other", 900_000_000),
        ("truncate", guest / "Sized", 600_000_000),
        ("pwrite", guest / ".edge", limits.SCRATCH_FILE_MAX_BYTES - 1),  # the last byte
        ("pwrite", guest / ".edge", limits.SCRATCH_FILE_MAX_BYTES),  # one past it
    ])
    assert results == ["EFBIG"] * 6 + ["ok", "EFBIG"]
    # Nothing was allocated for them: not even 100 MB of the 500 MB asked for.
    assert vm_hwm_kib(mount) - before < 100_000
    assert key.read_text() == "v"
    assert (guest / ".edge").stat().st_size == limits.SCRATCH_FILE_MAX_BYTES
    # A scratch file bigger than a value never becomes one.
    done = as_member([shell("sh"), "-c", 'printf "%03000d" 0 > "$1" && mv "$1" "$2"', "sh",
                      str(guest / ".big"), str(guest / "Edge")])
    assert done.returncode != 0 and "File too large" in done.stderr, done
    assert not (guest / "Edge").exists() and "Edge" not in host_items(mount)
    log = mount.output()
    assert "MemoryError" not in log
    assert "would make the file 500000001 bytes" in log and "truncate to 600000000 bytes" in log


def test_scratch_files_are_bounded(mount):
    guest = mount.path("guest")
    script = r"""
import errno, os, sys
made = 0
for i in range(int(sys.argv[2])):
    try:
        with open(os.path.join(sys.argv[1], ".s%d" % i), "wb") as f:
            f.write(b"x" * 2000)
    except OSError as exc:
        print(made, errno.errorcode[exc.errno])
        break
    made += 1
"""
    done = as_member([system_python(), "-c", script, str(guest),
                      str(limits.SCRATCH_MAX_FILES + 10)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(limits.SCRATCH_MAX_FILES), "ENOSPC"]
    assert "scratch files and unstored new keys exist" in mount.output()
    # Removing them makes room again.
    for i in range(10):
        (guest / f".s{i}").unlink()
    (guest / ".again").write_bytes(b"ok")


def test_unpublished_bytes_are_bounded(mount):
    """Open write buffers count too: many descriptors on one scratch file each holding a
    value's worth of bytes end in ENOSPC, with a log line, at the bound."""
    guest = mount.path("guest")
    (guest / ".big").write_bytes(b"")
    per_fd = limits.FILE_MAX_BYTES
    count = limits.UNPUBLISHED_MAX_BYTES // per_fd + 10
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 100), max(hard, count + 100)))
    fds = []
    refused = None
    try:
        for n in range(count):
            fd = os.open(guest / ".big", os.O_WRONLY)
            fds.append(fd)
            try:
                os.pwrite(fd, b"y" * per_fd, 0)
            except OSError as exc:
                refused = (n, exc.errno)
                break
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert refused is not None, "no bound on unpublished bytes"
    assert refused[1] == errno.ENOSPC
    assert refused[0] <= limits.UNPUBLISHED_MAX_BYTES // per_fd
    assert "unpublished data (open write buffers" in mount.output()
    # Closed again: the room is back.
    with open(guest / ".big", "wb") as f:
        f.write(b"z" * per_fd)


# ---------------------------------------------------------------- the mount root


def test_root_refuses_changes_with_eacces(mount):
    root = mount.mnt
    cases = [
        (os.open, root / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        (os.unlink, root / ".events"),
        (os.rename, root / "guest", root / "g2"),
        (os.rename, root / ".events", root / "e2"),
        (os.rename, root / "guest", root / "external"),
        (os.mkdir, root / "sub"),
        (os.rmdir, root / "guest"),
        (os.symlink, "guest", root / "link"),
        (os.truncate, root / ".events", 0),
        (os.utime, root / ".events"),
        (os.chmod, root / "guest", 0o777),
    ]
    for func, *args in cases:
        with pytest.raises(OSError) as info:
            func(*args)
        assert info.value.errno == errno.EACCES, (func.__name__, args, info.value)


def test_vim_edits_a_guest_key(mount):
    """An editor keeps its swap file beside the file (vim: 4 KiB blocks): it must work."""
    vim = shutil.which("vim") or shutil.which("vim.tiny")
    if vim is None:
        skip_unless_ci("vim is not installed (Debian package vim-tiny)")
    path = mount.path("guest", unique("edited"))
    path.write_text("before\n")
    done = as_member([vim, "-N", "-u", "NONE", "-i", "NONE", "-es",
                      "-c", "%s/before/after/", "-c", "wq", str(path)])
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert path.read_text() == "after\n"
    assert host_items(mount)[path.name] == "after"
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".swp")]
