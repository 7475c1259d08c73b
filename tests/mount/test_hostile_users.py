"""Hostile and careless local users, round two (issue 18), each attack against a real mount.

The mount runs as root with --allow-other and a guest group. Attackers are real processes
run by setpriv as `nobody`: a *member* (the guest group as its only supplementary group)
or a *stranger* (no groups at all). Each test measures what the attack does to kvpfs and
to root: kvpfs's RSS, whether root's reads and writes still work, how many lines the
refusals log, and the value the host sees. The long storms run with --soak.

    item 1  directory handles: memory bounded, given back on close
    item 2  open files: bounded per user, root keeps headroom, refusals logged at a rate
    item 3  unpublished-bytes budget: nothing leaks (unlinked scratch files, storms)
    item 4  a refused O_TRUNC write leaves the old value, for the host and in the pool
    item 5  (test_hostile_mounts.py)
    item 8  a commit racing a rename: an errno, never an assertion
"""

from __future__ import annotations

import os
import subprocess

import pytest

from kvpfs.wire import limits
from tests.conftest import KvpfsProcess, requires_fuse
from tests.support.figures import record_figure
from tests.support.hostile import (
    Holder,
    as_user,
    fd_limit,
    group_mount,
    host_value,
    log_lines,
    pool_value,
    root_works,
    rss_kib,
    system_python,
    unique,
    user_argv,
)
from tests.support.waiting import wait_for

pytestmark = requires_fuse

GROUP = 4246  # the mount's --guest-group
MEMBER = (GROUP,)
STRANGER: tuple[int, ...] = ()
RSS_BAR_KIB = 250 * 1024  # the judge's bar: kvpfs under 250 MB whatever users hold
LOG_LINES_BAR = 100  # fewer log lines than this for a storm of refusals


@pytest.fixture
def mount():
    with group_mount(GROUP) as proc:
        yield proc


# ------------------------------------------------------------------ item 1: directory handles

HOLD_DIRS = r"""
import errno, json, os, resource, sys
path, count = sys.argv[1], int(sys.argv[2])
fds, error = [], None
for _ in range(count):
    try:
        fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
        break
print(json.dumps({"opened": len(fds), "error": error}), flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
print("closed", flush=True)
"""


def fill_guest(kv: KvpfsProcess, count: int) -> None:
    for i in range(count):
        kv.host("set", "guest", f"Fill{i:04d}", "v" * 40)
    wait_for(lambda: len(os.listdir(kv.path("guest"))) >= count, 10, what="guest filled")


def directory_attack(kv: KvpfsProcess, holders: int, per_holder: int, test: str) -> None:
    fill_guest(kv, 300)
    pid = kv.proc.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    procs = [Holder(HOLD_DIRS, str(kv.path("guest")), str(per_holder), groups=STRANGER,
                    nofile=per_holder + 64) for _ in range(holders)]
    try:
        got = [p.held() for p in procs]
        held = rss_kib(pid)
        opened = sum(int(g["opened"]) for g in got)  # type: ignore[call-overload]
        root_works(kv)
        for p in procs:
            p.release()
    finally:
        for p in procs:
            p.kill()
    record_figure(test, "directory handles held by one user", opened)
    record_figure(test, "kvpfs RSS before (MB)", before / 1024)
    record_figure(test, "kvpfs RSS while held (MB)", held / 1024)
    assert held < RSS_BAR_KIB, f"{held} KiB with {opened} directory handles open"
    # Bounded per user: far below the judge's bar, whatever one user asks for.
    assert held - before < 64 * 1024, f"+{held - before} KiB for {opened} directory handles"
    # Given back on close (releasedir comes after close(2) returns: wait for it).
    after = wait_for(lambda: (r := rss_kib(pid)) < before + 24 * 1024 and r, 30,
                     what=f"RSS back near {before} KiB after the handles closed")
    record_figure(test, "kvpfs RSS after close (MB)", after / 1024)


def test_directory_handles_are_bounded_and_given_back(mount):
    directory_attack(mount, holders=1, per_holder=min(20000, fd_limit() - 100),
                     test="test_directory_handles_are_bounded_and_given_back")


@pytest.mark.slow
def test_soak_directory_handles_of_many_processes(mount, request):
    """The reviewer's 39,800 handles on a guest/ of 300 keys, from several processes."""
    if not request.config.getoption("--soak"):
        pytest.skip("--soak only")
    directory_attack(mount, holders=4, per_holder=min(10000, fd_limit() - 100),
                     test="test_soak_directory_handles_of_many_processes")


# ------------------------------------------------------------------ item 2: open files

HOLD_OPENS = r"""
import errno, json, os, sys
path, count, storm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fds, error = [], None
for _ in range(count):
    try:
        fds.append(os.open(path, os.O_RDONLY))
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
        break
refused = 0
for _ in range(storm if error else 0):  # keep asking once refused: the log must not grow
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError:
        refused += 1
print(json.dumps({"opened": len(fds), "error": error, "refused": refused}), flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
"""


def open_files_attack(kv: KvpfsProcess, holders: int, per_holder: int, storm: int,
                      test: str) -> None:
    key = unique("Shared")
    kv.path("guest", key).write_text("readable by all\n")
    pid = kv.proc.pid  # type: ignore[union-attr]
    lines_before = log_lines(kv)
    procs = [Holder(HOLD_OPENS, str(kv.path("guest", key)), str(per_holder), str(storm),
                    groups=MEMBER, nofile=per_holder + 64) for _ in range(holders)]
    try:
        got = [p.held() for p in procs]
        lines = log_lines(kv) - lines_before
        held = rss_kib(pid)
        root_works(kv)  # root's `cat external/X` and `echo > guest/Y` while users hold all
        for p in procs:
            p.release()
    finally:
        for p in procs:
            p.kill()
    opened = sum(int(g["opened"]) for g in got)  # type: ignore[call-overload]
    refused = sum(int(g["refused"]) for g in got)  # type: ignore[call-overload]
    record_figure(test, "value files held by one user", opened)
    record_figure(test, "refused opens", refused)
    record_figure(test, "log lines for them", lines)
    record_figure(test, "kvpfs RSS while held (MB)", held / 1024)
    assert all(g["error"] is not None for g in got), f"no bound met: {got}"
    assert opened < limits.OPEN_FILES_MAX, "one user may not take every open file"
    assert lines < LOG_LINES_BAR, f"{lines} log lines for {refused} refused opens"
    assert held < RSS_BAR_KIB


def test_open_files_are_bounded_per_user_and_root_keeps_working(mount):
    per_holder = fd_limit() - 100  # several processes: 70,000 opens in all
    open_files_attack(mount, holders=-(-70000 // per_holder), per_holder=per_holder,
                      storm=5000,
                      test="test_open_files_are_bounded_per_user_and_root_keeps_working")


@pytest.mark.slow
def test_soak_open_files_from_many_processes(mount, request):
    if not request.config.getoption("--soak"):
        pytest.skip("--soak only")
    open_files_attack(mount, holders=8, per_holder=fd_limit() - 100, storm=50000,
                      test="test_soak_open_files_from_many_processes")


@pytest.mark.slow
def test_soak_every_user_holds_all_it_may(mount, request):
    """The total bound held for real: many users (uids without a name, as any local account
    may be) each hold as many files and directories as they can. kvpfs stays under the
    bar and root still opens, lists, reads and writes."""
    if not request.config.getoption("--soak"):
        pytest.skip("--soak only")
    fill_guest(mount, 300)
    key = unique("Shared")
    mount.path("guest", key).write_text("readable by all\n")
    pid = mount.proc.pid  # type: ignore[union-attr]
    before, lines_before = rss_kib(pid), log_lines(mount)
    per_user = min(limits.OPEN_FILES_PER_USER + 100, fd_limit() - 100)
    procs = []
    try:
        for n in range(limits.OPEN_FILES_MAX // limits.OPEN_FILES_PER_USER + 1):
            script, target = (HOLD_DIRS, mount.path("guest")) if n % 2 else \
                (HOLD_OPENS, mount.path("guest", key))
            extra = () if n % 2 else ("1000",)
            procs.append(Holder(script, str(target), str(per_user), *extra,
                                groups=STRANGER, nofile=per_user + 64, uid=70000 + n))
        got = [p.held() for p in procs]
        held = rss_kib(pid)
        root_works(mount)
        lines = log_lines(mount) - lines_before
        for p in procs:
            p.release()
    finally:
        for p in procs:
            p.kill()
    opened = sum(int(g["opened"]) for g in got)  # type: ignore[call-overload]
    test = "test_soak_every_user_holds_all_it_may"
    record_figure(test, "files and directories held by all users", opened)
    record_figure(test, "kvpfs RSS before (MB)", before / 1024)
    record_figure(test, "kvpfs RSS while held (MB)", held / 1024)
    record_figure(test, "log lines", lines)
    assert opened <= limits.OPEN_FILES_MAX - limits.OPEN_FILES_ROOT
    assert held < RSS_BAR_KIB
    assert lines < LOG_LINES_BAR * 2  # two windows at most, for this long a run


# ------------------------------------------------------------------ item 3: the byte budget

UNLINKED_TRUNCATE = r"""
import os, sys
guest, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failed = 0
for i in range(rounds):
    name = os.path.join(guest, ".leak%d" % i)
    fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o644)
    os.unlink(name)
    try:
        os.truncate("/proc/self/fd/%d" % fd, size)  # by path: no file handle with it
    except OSError:
        failed += 1
    os.close(fd)
print(failed)
"""

STORM = r"""
import os, random, sys
guest, ops, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
names = [".st%d-%d" % (seed, i) for i in range(6)] + ["St%d-%d" % (seed, i) for i in range(3)]
fds = []
for _ in range(ops):
    action = rng.randrange(7)
    a, b = (os.path.join(guest, rng.choice(names)) for _ in range(2))
    try:
        if action == 0:
            fds.append(os.open(a, os.O_CREAT | os.O_RDWR | rng.choice([0, os.O_TRUNC]), 0o644))
        elif action == 1 and fds:
            os.write(rng.choice(fds), b"x" * rng.randrange(1, 3000))
        elif action == 2 and fds:
            os.ftruncate(rng.choice(fds), rng.randrange(0, 70000))
        elif action == 3:
            os.truncate(a, rng.randrange(0, 70000))
        elif action == 4:
            os.rename(a, b)
        elif action == 5:
            os.unlink(a)
        elif action == 6 and fds:
            fd = fds.pop(rng.randrange(len(fds)))
            if rng.random() < 0.5:
                os.truncate("/proc/self/fd/%d" % fd, rng.randrange(0, 70000))
            os.close(fd)
    except OSError:
        pass
for fd in fds:
    try:
        os.close(fd)  # its value may be refused now (a NUL from a truncate): EINVAL
    except OSError:
        pass
for name in names:
    try:
        os.unlink(os.path.join(guest, name))
    except OSError:
        pass
"""


def budget_is_whole(kv: KvpfsProcess) -> None:
    """Root can still fill (almost) the whole unpublished budget with scratch files:
    nothing an earlier user did is still counted."""
    size = limits.SCRATCH_FILE_MAX_BYTES
    count = limits.UNPUBLISHED_MAX_BYTES // size - 2
    made = []
    try:
        for i in range(count):
            path = kv.path("guest", f".root-fill{i}")
            os.truncate(path, size) if path.exists() else path.write_bytes(b"\0" * size)
            made.append(path)
    finally:
        for path in made:
            path.unlink()


def test_truncating_an_unlinked_scratch_file_leaks_no_budget(mount):
    rounds = limits.UNPUBLISHED_MAX_BYTES // limits.SCRATCH_FILE_MAX_BYTES + 70  # ~200
    done = as_user([system_python(), "-c", UNLINKED_TRUNCATE, str(mount.path("guest")),
                    str(rounds), str(limits.SCRATCH_FILE_MAX_BYTES)], groups=MEMBER)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", "a truncate was refused: the budget leaked"
    root_works(mount)
    budget_is_whole(mount)


def storm_attack(kv: KvpfsProcess, processes: int, ops: int) -> None:
    procs = [subprocess.Popen(
        user_argv([system_python(), "-c", STORM, str(kv.path("guest")), str(ops), str(seed)],
                  groups=MEMBER), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(processes)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
    root_works(kv)
    budget_is_whole(kv)


def test_create_rename_truncate_storm_leaks_no_budget(mount):
    storm_attack(mount, processes=3, ops=1500)


@pytest.mark.slow
def test_soak_create_rename_truncate_storm(mount, request):
    if not request.config.getoption("--soak"):
        pytest.skip("--soak only")
    storm_attack(mount, processes=6, ops=40000)


def test_a_member_taking_every_private_directory_leaves_roots(mount):
    """Private directories (Puppet's lock) are counted per user: a member who makes all
    it may leaves root its own."""
    script = r"""
import errno, os, sys
made = 0
while True:
    try:
        os.mkdir(os.path.join(sys.argv[1], "Lock%d.lock" % made))
        made += 1
    except OSError as exc:
        print(made, errno.errorcode[exc.errno])
        break
"""
    done = as_user([system_python(), "-c", script, str(mount.path("guest"))], groups=MEMBER)
    assert done.returncode == 0, done.stderr
    made, error = done.stdout.split()
    assert error == "ENOSPC" and 0 < int(made) < 1000
    os.mkdir(mount.path("guest", "RootPuppet.lock"))
    os.rmdir(mount.path("guest", "RootPuppet.lock"))
    root_works(mount)


# ------------------------------------------------------------------ item 4: refused O_TRUNC

FILL_BUDGET = r"""
import os, sys
guest, size = sys.argv[1], int(sys.argv[2])
made = 0
while size:  # to the last byte: halve the size at each refusal
    try:
        with open(os.path.join(guest, ".fill%d" % made), "wb") as f:
            made += 1
            f.truncate(size)
    except OSError:
        size //= 2
print(made)
"""


def test_a_refused_truncating_write_keeps_the_old_value(mount):
    key = unique("Important")
    mount.path("guest", key).write_text("precious")
    assert host_value(mount, key) == "precious"
    filled = as_user([system_python(), "-c", FILL_BUDGET, str(mount.path("guest")),
                      str(limits.SCRATCH_FILE_MAX_BYTES)], groups=MEMBER)
    assert filled.returncode == 0 and int(filled.stdout) > 0, filled.stderr
    done = as_user(["sh", "-c", 'echo new > "$1"', "sh", str(mount.path("guest", key))],
                   groups=MEMBER)
    assert done.returncode != 0, "the write cannot have been stored: it must fail"
    # The kernel's RELEASE comes after the shell exits: the old value must survive it.
    # Wait on a later, ordered effect instead of a sleep: root's own write and release.
    root_works(mount)
    assert host_value(mount, key) == "precious"
    assert pool_value(mount, key) == b"precious"
    assert mount.path("guest", key).read_text() == "precious"
    for name in os.listdir(mount.path("guest")):
        if name.startswith(".fill"):
            os.unlink(mount.path("guest", name))


# ------------------------------------------------------------------ item 8: commit vs rename

WRITER = r"""
import errno, os, sys
path, rounds = sys.argv[1], int(sys.argv[2])
bad = {}
for i in range(rounds):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o664)
        os.write(fd, b"value %d\n" % i)
        os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EIO:
            bad[i] = "EIO"
print(len(bad))
"""

RENAMER = r"""
import os, sys
path, rounds = sys.argv[1], int(sys.argv[2])
scratch = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".moved")
for _ in range(rounds):
    for a, b in ((path, scratch), (scratch, path)):
        try:
            os.rename(a, b)
        except OSError:
            pass
"""


def rename_storm(kv: KvpfsProcess, writers: int, rounds: int) -> None:
    key = unique("Raced")
    path = kv.path("guest", key)
    path.write_text("start")
    procs = [subprocess.Popen(user_argv([system_python(), "-c", WRITER, str(path),
                                         str(rounds)], groups=MEMBER),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(writers)]
    procs += [subprocess.Popen(user_argv([system_python(), "-c", RENAMER, str(path),
                                          str(rounds)], groups=MEMBER),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    # Host changes to guest make commits wait for the pool, widening the window.
    for i in range(rounds // 4):
        kv.host("set", "guest", f"HostChurn{i % 8}", str(i))
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (_out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    eio = sum(int(out) for out, _ in outs[:writers])
    assert eio == 0, f"{eio} writes failed with EIO"
    assert "Traceback" not in kv.output() and "AssertionError" not in kv.output()
    root_works(kv)


def test_commits_racing_renames_never_assert(mount):
    rename_storm(mount, writers=3, rounds=400)


@pytest.mark.slow
def test_soak_commits_racing_renames(mount, request):
    if not request.config.getoption("--soak"):
        pytest.skip("--soak only")
    rename_storm(mount, writers=6, rounds=20000)


def test_refusal_storm_from_a_stranger_logs_a_bounded_number_of_lines(mount):
    """Refusals of every kind a stranger can cause (writes to a read-only pool, bad names,
    creating in the root) stay under the bar of log lines, however many there are."""
    script = r"""
import os, sys
mnt, rounds = sys.argv[1], int(sys.argv[2])
for i in range(rounds):
    for path in (os.path.join(mnt, "auto", "x%d" % i), os.path.join(mnt, "guest", "x%d" % i)):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            pass
"""
    before = log_lines(mount)
    done = as_user([system_python(), "-c", script, str(mount.mnt), "5000"], groups=STRANGER)
    assert done.returncode == 0, done.stderr
    lines = log_lines(mount) - before
    record_figure("test_refusal_storm_from_a_stranger_logs_a_bounded_number_of_lines",
                  "log lines for 10,000 refusals", lines)
    assert lines < LOG_LINES_BAR
    # A member's refused values (bad UTF-8) count against the same bound.
    script = r"""
import os, sys
guest, rounds = sys.argv[1], int(sys.argv[2])
for i in range(rounds):
    try:
        with open(os.path.join(guest, "Bad%d" % (i % 50)), "wb") as f:
            f.write(b"\xff\xfe")
    except OSError:
        pass
"""
    before = log_lines(mount)
    done = as_user([system_python(), "-c", script, str(mount.path("guest")), "5000"],
                   groups=MEMBER)
    assert done.returncode == 0, done.stderr
    lines = log_lines(mount) - before
    record_figure("test_refusal_storm_from_a_stranger_logs_a_bounded_number_of_lines",
                  "log lines for 5,000 refused values", lines)
    assert lines < LOG_LINES_BAR
    root_works(mount)

