"""The filesystem as users meet it: a real mount, real shell commands, the simulated host."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kvpfs.storage.poolfile import pool_path
from kvpfs.storage.records import RECORD_SIZE, encode_record, parse_pool
from tests.conftest import KvpfsProcess, requires_fuse
from tests.support.waiting import wait_for

pytestmark = requires_fuse


def sh(command: str, *, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=check)


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def host_items(kvpfs: KvpfsProcess, pool: str) -> dict[str, str]:
    return dict(kvpfs.host("list", pool)["items"])


def pool_records(kvpfs: KvpfsProcess, pool: int) -> list[tuple[bytes, bytes]]:
    records, _ = parse_pool(pool_path(kvpfs.pools, pool).read_bytes())
    return [(r.key, r.value) for r in records]


def expect_errno(code: int, func, *args):
    with pytest.raises(OSError) as info:
        func(*args)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


# ---------------------------------------------------------------- layout


def test_layout_and_modes(shared_kvpfs):
    mnt = shared_kvpfs.mnt
    entries = set(os.listdir(mnt))
    assert {"external", "guest", "auto", "auto_external", "auto_internal"} <= entries
    for number, name in enumerate(["external", "guest", "auto", "auto_external",
                                   "auto_internal"]):
        assert os.readlink(mnt / str(number)) == name
        assert os.path.samefile(mnt / str(number), mnt / name)
    assert stat.S_IMODE(os.stat(mnt / "guest").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(mnt / "external").st_mode) == 0o500
    assert stat.S_IMODE(os.stat(mnt / "auto_external").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(mnt).st_mode) == 0o555
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", str(mnt)], capture_output=True,
                           text=True).stdout.strip()
    assert found == "fuse.kvpfs"


def test_host_identity_arrives_in_auto_external(shared_kvpfs):
    vm_id = shared_kvpfs.path("auto_external", "VirtualMachineId")
    wait_for(vm_id.exists)
    assert vm_id.read_text() == "5B0C7C0E-2F4A-4D4B-9B8E-3C1D2E0F4A11"
    assert stat.S_IMODE(vm_id.stat().st_mode) == 0o444
    assert len(os.listdir(shared_kvpfs.path("auto_external"))) == 16
    # the same bytes are in the pool file, in the reference daemon's format
    assert (b"VirtualMachineId", b"5B0C7C0E-2F4A-4D4B-9B8E-3C1D2E0F4A11") in pool_records(
        shared_kvpfs, 3)


def test_auto_shows_what_the_host_sees(shared_kvpfs):
    auto = shared_kvpfs.path("auto")
    assert sorted(os.listdir(auto)) == sorted(k for k, _ in shared_kvpfs.host("list", 2)["items"])
    assert (auto / "IntegrationServicesVersion").read_text() == "3.1"
    assert (auto / "OSVersion").read_text() == os.uname().release.split("-")[0]
    assert "127.0.0.1" not in (auto / "NetworkAddressIPv4").read_text().split(";")


# ---------------------------------------------------------------- guest writes


def test_echo_publishes_without_newline(shared_kvpfs):
    key = unique("Status")
    path = shared_kvpfs.path("guest", key)
    sh(f"echo Ready > {path}")
    # Read what you wrote: the mount shows the newline, the host and the pool do not.
    assert path.read_bytes() == b"Ready\n"
    assert path.stat().st_size == 6
    assert host_items(shared_kvpfs, "guest")[key] == "Ready"
    assert (key.encode(), b"Ready") in pool_records(shared_kvpfs, 1)


def test_append_offsets_truncate_and_o_trunc(shared_kvpfs):
    path = shared_kvpfs.path("guest", unique())
    sh(f"printf abc > {path}")
    sh(f"echo def >> {path}")
    assert path.read_bytes() == b"abcdef\n"
    assert host_items(shared_kvpfs, "guest")[path.name] == "abcdef"
    with open(path, "r+b") as f:
        f.seek(1)
        f.write(b"X")
    assert path.read_bytes() == b"aXcdef\n"
    os.truncate(path, 2)
    assert path.read_bytes() == b"aX"
    with open(path, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert path.read_bytes() == b"new"
    sh(f": > {path}")
    assert path.read_bytes() == b""
    # An open that only truncates is published at release, a moment after close(2) returns
    # (docs/filesystem.md: a shell's first close after dup2 must not publish an empty value).
    wait_for(lambda: host_items(shared_kvpfs, "guest")[path.name] == "", timeout=2)


def test_host_never_sees_half_a_value(shared_kvpfs):
    path = shared_kvpfs.path("guest", unique())
    with open(path, "wb", buffering=0) as f:
        f.write(b"first half ")
        assert path.name not in host_items(shared_kvpfs, "guest")
        f.write(b"second half")
        assert path.name not in host_items(shared_kvpfs, "guest")
    assert host_items(shared_kvpfs, "guest")[path.name] == "first half second half"


def test_raw_keeps_newline(tmp_path):
    proc = KvpfsProcess(tmp_path, "--raw").start()
    try:
        sh(f"echo Ready > {proc.path('guest', 'Status')}")
        assert proc.path("guest", "Status").read_bytes() == b"Ready\n"
    finally:
        proc.cleanup()


def test_rm_and_mv(shared_kvpfs):
    old, new = unique("old"), unique("new")
    guest = shared_kvpfs.path("guest")
    sh(f"echo one > {guest / old}")
    ino = os.stat(guest / old).st_ino
    sh(f"mv {guest / old} {guest / new}")
    items = host_items(shared_kvpfs, "guest")
    assert old not in items and items[new] == "one"
    assert os.stat(guest / new).st_ino == ino
    sh(f"rm {guest / new}")
    assert new not in host_items(shared_kvpfs, "guest")
    assert not (guest / new).exists()
    assert new.encode() not in [k for k, _ in pool_records(shared_kvpfs, 1)]


def test_editor_style_save_publishes_only_the_final_value(shared_kvpfs):
    guest = shared_kvpfs.path("guest")
    key = unique("cfg")
    sh(f"echo v1 > {guest / key}")
    # what editors and Ansible do: write a dot-file, then rename over the key
    scratch = guest / f".{key}.swp"
    scratch.write_text("v2\n")
    assert f".{key}.swp" not in host_items(shared_kvpfs, "guest")
    assert not any(k.startswith(b".") for k, _ in pool_records(shared_kvpfs, 1))
    os.rename(scratch, guest / key)
    assert (guest / key).read_bytes() == b"v2\n"
    assert host_items(shared_kvpfs, "guest")[key] == "v2"
    # sed -i writes a temporary file next to it and renames it into place
    sh(f"sed -i s/v2/v3/ {guest / key}")
    assert (guest / key).read_bytes() == b"v3\n"
    items = host_items(shared_kvpfs, "guest")
    assert items[key] == "v3"
    assert not [k for k in items if k.startswith("sed")]
    assert sorted(os.listdir(guest)) == sorted(items)


def test_metadata_calls_succeed(shared_kvpfs):
    guest = shared_kvpfs.path("guest")
    key = unique("meta")
    sh(f"cp -p /etc/hostname {guest / key}")
    assert (guest / key).read_bytes() == Path("/etc/hostname").read_bytes()
    assert host_items(shared_kvpfs, "guest")[key] == Path("/etc/hostname").read_text().rstrip("\n")
    sh(f"chmod 600 {guest / key} && chown 0:0 {guest / key} && touch {guest / key}")
    assert stat.S_IMODE(os.stat(guest / key).st_mode) == 0o600
    fd = os.open(guest / key, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"synced")
        os.fsync(fd)  # fsync commits what was written so far
        assert host_items(shared_kvpfs, "guest")[key] == "synced"
    finally:
        os.close(fd)


READ_ONLY_POOLS = ["external", "auto", "auto_external", "auto_internal"]


@pytest.mark.parametrize("pool", READ_ONLY_POOLS)
def test_read_only_pools_refuse_every_change(shared_kvpfs, pool):
    directory = shared_kvpfs.path(pool)
    existing = {"external": None, "auto": "OSName", "auto_external": "HostName",
                "auto_internal": None}[pool]
    if existing is None:
        key = unique()
        index = ["external", "guest", "auto", "auto_external", "auto_internal"].index(pool)
        assert shared_kvpfs.host("set", index, key, "v")["status"] == 0
        existing = key
    wait_for((directory / existing).exists)
    target = directory / existing
    expect_errno(errno.EACCES, os.open, directory / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.EACCES, os.open, target, os.O_WRONLY)
    expect_errno(errno.EACCES, os.open, target, os.O_RDONLY | os.O_TRUNC)
    expect_errno(errno.EACCES, os.truncate, target, 0)
    expect_errno(errno.EACCES, os.unlink, target)
    expect_errno(errno.EACCES, os.rename, target, directory / "renamed")
    expect_errno(errno.EACCES, os.mkdir, directory / "sub")
    assert not stat.S_IMODE(target.stat().st_mode) & 0o222
    assert target.exists()


def test_cross_pool_rename_refused(shared_kvpfs):
    key = unique()
    sh(f"echo x > {shared_kvpfs.path('guest', key)}")
    expect_errno(errno.EACCES, os.rename, shared_kvpfs.path("guest", key),
                 shared_kvpfs.path("external", key))


def test_limits_refuse_with_documented_errno_and_store_nothing(shared_kvpfs):
    guest = shared_kvpfs.path("guest")
    before = pool_path(shared_kvpfs.pools, 1).read_bytes()
    expect_errno(errno.ENAMETOOLONG, os.open, guest / ("k" * 255), os.O_CREAT | os.O_WRONLY)
    key = unique("lim")
    (guest / key).write_text("keep")

    def write(data: bytes) -> None:
        with open(guest / key, "wb") as f:
            f.write(data)

    expect_errno(errno.EFBIG, write, b"x" * 1023)
    expect_errno(errno.EFBIG, write, "é".encode() * 1023)  # 2046 bytes but 1023 units
    expect_errno(errno.EILSEQ, write, b"bad \xff byte")
    expect_errno(errno.EINVAL, write, b"nul\0byte")
    assert (guest / key).read_bytes() == b"keep"
    assert host_items(shared_kvpfs, "guest")[key] == "keep"
    write(b"x" * 1022)  # exactly at the limit is fine
    assert len(host_items(shared_kvpfs, "guest")[key]) == 1022
    after = pool_path(shared_kvpfs.pools, 1).read_bytes()
    assert len(after) == len(before) + RECORD_SIZE  # only the one good key was added
    expect_errno(errno.EINVAL, os.open, guest / "100%", os.O_CREAT | os.O_WRONLY)


def test_host_keys_with_awkward_names_are_all_reachable(shared_kvpfs):
    keys = {
        "a/b": "slash", "100%": "percent", "..": "dotdot", ".hidden": "dot",
        "line\nbreak": "newline", "x" * 300: "long", "café ☃": "unicode",
    }
    for key, value in keys.items():
        assert shared_kvpfs.host("set", "external", key, value)["status"] == 0
    external = shared_kvpfs.path("external")
    listing = os.listdir(external)
    assert "a%2Fb" in listing and "100%25" in listing and "%2E." in listing
    assert "%2Ehidden" in listing and "line%0Abreak" in listing and "café ☃" in listing
    assert all(len(name.encode()) <= 255 for name in listing)
    by_key = {}
    for name in listing:
        raw = os.getxattr(external / name, "user.kvp.key")
        by_key[raw.decode()] = (external / name).read_text()
    for key, value in keys.items():
        assert by_key[key] == value


def test_host_changes_appear_at_once(shared_kvpfs):
    key = unique("host")
    path = shared_kvpfs.path("external", key)
    shared_kvpfs.host("set", "external", key, "short")
    assert path.read_text() == "short"
    assert path.stat().st_size == 5  # now cached by the kernel
    shared_kvpfs.host("set", "external", key, "a much longer value")
    assert path.read_text() == "a much longer value"
    assert path.stat().st_size == len("a much longer value")
    assert key in os.listdir(shared_kvpfs.path("external"))
    shared_kvpfs.host("delete", "external", key)
    assert key not in os.listdir(shared_kvpfs.path("external"))
    assert not path.exists()


def test_changes_by_other_programs_appear_within_a_second(shared_kvpfs):
    key = unique("cloudinit")
    pool1 = pool_path(shared_kvpfs.pools, 1)
    with open(pool1, "ab") as f:  # the way cloud-init appends
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(encode_record(key.encode(), b"appended"))
    path = shared_kvpfs.path("guest", key)
    wait_for(path.exists, timeout=1.5)
    assert path.read_text() == "appended"
    assert host_items(shared_kvpfs, "guest")[key] == "appended"


def test_dot_files_never_reach_the_host(shared_kvpfs):
    guest = shared_kvpfs.path("guest")
    name = f".scratch-{uuid.uuid4().hex[:6]}"
    (guest / name).write_text("draft")
    assert (guest / name).read_text() == "draft"
    assert name in os.listdir(guest)
    assert name not in host_items(shared_kvpfs, "guest")
    os.unlink(guest / name)
    assert name not in os.listdir(guest)


# ---------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path, sig):
    proc = KvpfsProcess(tmp_path).start()
    assert proc.stop(sig) == 0
    assert not os.path.ismount(proc.mnt)
    assert "Traceback" not in proc.output()


def test_external_umount_ends_the_process(tmp_path):
    proc = KvpfsProcess(tmp_path).start()
    # The inotify echoes of the host's start-up push hold a file open for a moment each:
    # an unmount landing on one is refused as busy, as on any filesystem in use.
    wait_for(lambda: subprocess.run(["umount", str(proc.mnt)], capture_output=True,
                                    check=False).returncode == 0, what="a successful umount")
    assert proc.proc.wait(10) == 0
    assert "Traceback" not in proc.output()


def test_restart_after_kill_clears_dead_mount_and_keeps_data(tmp_path):
    proc = KvpfsProcess(tmp_path).start()
    sh(f"echo kept > {proc.path('guest', 'Persist')}")
    proc.proc.kill()
    proc.proc.wait(10)
    with pytest.raises(OSError) as info:
        os.listdir(proc.mnt)
    assert info.value.errno == errno.ENOTCONN
    proc.start()
    try:
        # As written, or (killed within the moment before its trailing newline was saved,
        # docs/tools.md) as stored; the host's value is the same either way.
        assert proc.path("guest", "Persist").read_text() in ("kept\n", "kept")
        assert host_items(proc, "guest")["Persist"] == "kept"
    finally:
        proc.cleanup()


def test_missing_device_says_not_hyperv_and_suggests_simulate(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "kvpfs", "mount", str(tmp_path / "mnt"),
         "--device", str(tmp_path / "no-such-device"), "--pool-dir", str(tmp_path / "pools")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 3
    assert "not look like a Hyper-V guest" in result.stderr
    assert "--simulate" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_second_instance_on_a_live_mount_refuses(tmp_path):
    first = KvpfsProcess(tmp_path).start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kvpfs", "mount", str(first.mnt), "--simulate",
             "--pool-dir", str(tmp_path / "other-pools"), "--control", str(tmp_path / "c2")],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 3
        assert "already mounted by a running kvpfs" in result.stderr
        assert os.listdir(first.path("guest")) == []  # the first one still serves
    finally:
        first.cleanup()


def _inotify_watch(path: Path) -> int:
    """An inotify fd (non-blocking) watching `path` for IN_DELETE_SELF."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    assert libc.inotify_add_watch(fd, os.fsencode(path), 0x400) >= 0  # IN_DELETE_SELF
    return fd


def _inotify_masks(fd: int) -> list[int]:
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return []
    masks, offset = [], 0
    while offset < len(data):
        _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
        masks.append(mask)
        offset += 16 + length
    return masks


def test_host_changes_after_the_kernel_timeouts_are_read_whole(shared_kvpfs):
    """Once the kernel's timeouts (1 s, plus as much again to be sure) have run out and no
    file is open, kvpfs may leave a changed value's attributes alone (the kernel asks again
    anyway); the next reader must still see the value whole, longer or shorter than before,
    and while a file is open too. A delete reaches an inotify watcher of the file.

    Whether an invalidation was sent is not visible through the mount (a GETATTR follows
    either way once the timeout has run out); the notification service's own tests count
    them. The sleeps here are the condition itself: the kernel's timeouts running out."""
    key = unique("expired")
    path = shared_kvpfs.path("external", key)
    shared_kvpfs.host("set", "external", key, "short")
    assert path.stat().st_size == 5  # cached by the kernel for 1 s
    shared_kvpfs.host("set", "external", key, "longer, within the timeouts")
    # Invalidated, not expired: the host's S_OK does not wait for the kernel (issue 10.5),
    # so the new size shows up just after it, well within the 1 s attribute timeout.
    wait_for(lambda: path.stat().st_size == len("longer, within the timeouts"), 0.9,
             what="the new size before the kernel's attribute timeout")
    assert path.read_text() == "longer, within the timeouts"  # page cache filled too
    with open(path):  # while a file is open, host changes are invalidated as always
        time.sleep(2.2)
        shared_kvpfs.host("set", "external", key, "while open")
        assert path.read_text() == "while open"
    time.sleep(2.2)  # the timeouts of the reads above run out; nothing is open
    shared_kvpfs.host("set", "external", key, "a much longer value than before")
    assert path.read_text() == "a much longer value than before"
    assert path.stat().st_size == len("a much longer value than before")
    time.sleep(2.2)
    shared_kvpfs.host("set", "external", key, "tiny")
    assert path.read_text() == "tiny"
    watch = _inotify_watch(path)
    try:
        time.sleep(2.2)
        shared_kvpfs.host("delete", "external", key)
        expect_errno(errno.ENOENT, path.read_text)
        assert key not in os.listdir(path.parent)
        # The host's reply does not wait for the kernel (issue 10.5): the event follows.
        seen: list[int] = []

        def deleted_self() -> bool:
            seen.extend(_inotify_masks(watch))
            return any(mask & 0x400 for mask in seen)

        wait_for(deleted_self, timeout=5, what="IN_DELETE_SELF")
    finally:
        os.close(watch)


def test_names_the_kernel_still_caches_after_a_host_delete(shared_kvpfs):
    """After a host DELETE the kernel may keep the name a moment (1 s TTL): it must act
    as gone, come back when the host sets the key again, and take a new guest value."""
    key = unique("cached")
    path = shared_kvpfs.path("external", key)
    shared_kvpfs.host("set", "external", key, "one")
    assert path.read_text() == "one"
    shared_kvpfs.host("delete", "external", key)
    # The host's reply does not wait for the kernel's caches (issue 10); they follow at once.
    wait_for(lambda: not path.exists(), timeout=2, what="the deleted name to go")
    expect_errno(errno.ENOENT, path.read_text)
    shared_kvpfs.host("set", "external", key, "two")
    assert path.read_text() == "two"

    guest = shared_kvpfs.path("guest", unique("cached"))
    shared_kvpfs.host("set", "guest", guest.name, "from the host")
    assert guest.read_text() == "from the host"
    shared_kvpfs.host("delete", "guest", guest.name)
    sh(f"echo from the guest > {guest}")
    assert guest.read_text() == "from the guest\n"
    assert host_items(shared_kvpfs, "guest")[guest.name] == "from the guest"


@pytest.mark.parametrize("alone", [True, False], ids=["as started", "beside another kvpfs"])
def test_the_greeting_on_a_terminal_gives_commands_that_work(tmp_path: Path, alone: bool,
                                                             request: pytest.FixtureRequest):
    """What a new user meets first: on a terminal, `kvpfs mount --simulate` says what to try,
    with a `kvpfs` command that runs from another shell, venv on PATH or not, and that
    names this mount when another kvpfs runs too."""
    if not alone:
        request.getfixturevalue("shared_kvpfs")
    import pty
    import shlex

    (tmp_path / "mnt").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # a second shell without the venv activated
    venv_kvpfs = Path(sys.executable).with_name("kvpfs")
    command = [str(venv_kvpfs) if venv_kvpfs.exists() else sys.executable, "mount",
               str(tmp_path / "mnt"), "--simulate", "--pool-dir", str(tmp_path / "pools")]
    if not venv_kvpfs.exists():
        command[1:1] = ["-m", "kvpfs"]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(command, stdout=terminal, stderr=subprocess.DEVNULL, env=env)
    os.close(terminal)
    text = b""
    try:
        deadline = time.monotonic() + 15
        while b"Stop with Ctrl-C" not in text and time.monotonic() < deadline:
            text += os.read(controller, 4096)
        greeting = text.decode().replace("\r\n", "\n")
        assert "is serving the simulated host" in greeting, greeting
        hint = next(line for line in greeting.splitlines() if " list guest" in line)
        argv = shlex.split(hint.split("#")[0])
        listed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        setter = next(line for line in greeting.splitlines() if " set external" in line)
        for part in setter.split(";"):
            done = subprocess.run(shlex.split(part), env=env, capture_output=True, text=True,
                                  timeout=30)
            assert done.returncode == 0, done.stderr
        assert done.stdout == "hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        os.close(controller)
