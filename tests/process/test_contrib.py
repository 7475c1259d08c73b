"""Boot, service, fstab and container integration (contrib/), exercised for real.

* the systemd unit passes `systemd-analyze verify`, keeps out every option
  that would hide its mount in a private namespace, and its ExecStart parses;
* a real systemd (PID 1 of private namespaces) runs the unit as shipped:
  notify, sandbox, a mount others see, restart after a kill, Conflicts=,
  the condition on the device;
* READY=1 reaches $NOTIFY_SOCKET only once the filesystem is mounted;
* the udev rule, evaluated by `udevadm test` on a fake hv_kvp device in a
  private mount namespace, tags the device for systemd and wants kvpfs.service;
* the mount helper: `mount.kvpfs`, `mount -t fuse.kvpfs` and an fstab line
  (`mount -T FILE`) return once mounted, and `umount` ends the daemon;
* install.sh installs into a scratch root;
* the container manifests parse, agree with kvpfs's paths and options, and a
  bind of the mount's parent with rslave propagation (what Docker and
  Kubernetes do) shows a restarted kvpfs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from kvpfs.cli import mounthelper
from kvpfs.cli.parser import build_parser
from kvpfs.cli.results import EXIT_UNAVAILABLE, EXIT_USAGE
from kvpfs.wire.protocol import Pool
from tests.conftest import (
    REPO,
    KvpfsProcess,
    _dead_mount,
    fuse_missing,
    requires_fuse,
    skip_unless_ci,
)
from tests.support.fusewedge import silent_fuse_mount, waiting_in_fuse
from tests.support.waiting import wait_for

CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "kvpfs.service"
RULES = CONTRIB / "60-kvpfs.rules"
DEFAULTS = CONTRIB / "kvpfs.default"
VENV_BIN = Path(sys.executable).parent
KVPFS = VENV_BIN / "kvpfs"
MOUNT_HELPER = VENV_BIN / "mount.kvpfs"

# Unit settings that give the service its own mount namespace: a FUSE mount
# made there would be invisible to every other process (systemd.exec(5)).
MOUNT_NAMESPACE_SETTINGS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths", "ReadOnlyPaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountAPIVFS", "MountFlags",
    "PrivateUsers", "DynamicUser", "LogNamespace", "MountImages", "ExtensionImages",
    "ProtectHostname",  # not a mount namespace, but a UTS one: hostname changes would vanish
}


def unit_settings(text: str) -> dict[str, list[str]]:
    """A unit file's settings: name -> every value given (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        settings.setdefault(name.strip(), []).append(value.strip())
    return settings


def environment(settings: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in settings.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion: ${VAR} as one word, $VAR split into words."""
    words: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def default_file_examples() -> dict[str, str]:
    """The commented-out settings of contrib/kvpfs.default."""
    examples = {}
    for line in DEFAULTS.read_text().splitlines():
        match = re.fullmatch(r"#(KVPFS_[A-Z_]+)=(.*)", line)
        if match:
            examples[match.group(1)] = match.group(2)
    return examples


# ---------------------------------------------------------------- the unit


def test_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        skip_unless_ci("systemd-analyze is not installed")
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/kvpfs " in text
    # verify insists the ExecStart binary exists: point it at this venv's kvpfs.
    copy = tmp_path / "kvpfs.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/kvpfs ", f"ExecStart={KVPFS} "))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=60)
    # Unknown or malformed settings are only warnings: demand silence, not just status 0.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_unit_settings():
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["ConditionPathExists"] == ["/dev/vmbus/hv_kvp"]
    assert settings["Restart"] == ["on-failure"]
    conflicts = " ".join(settings["Conflicts"]).split()
    assert {"hv-kvp-daemon.service", "hypervkvpd.service",
            "hyperv-daemons.hv-kvp-daemon.service"} <= set(conflicts)
    assert set(conflicts) <= set(" ".join(settings["After"]).split())  # stop them first
    assert settings["DeviceAllow"] == ["/dev/fuse rw", "/dev/vmbus/hv_kvp rw"]
    assert settings["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"][0].split()
    leaks = MOUNT_NAMESPACE_SETTINGS & set(settings)
    assert not leaks, f"{leaks} would hide the mount in the service's own namespace"


def test_unit_commands_parse():
    """ExecStart, with the defaults and with the documented examples, is valid `kvpfs mount`."""
    settings = unit_settings(UNIT.read_text())
    env = environment(settings)
    assert env["KVPFS_MOUNTPOINT"] == "/run/kvp"
    for overrides in ({}, default_file_examples()):
        words = expand(settings["ExecStart"][0], {**env, **overrides})
        assert words[0] == "/usr/local/bin/kvpfs"
        args = build_parser().parse_args(words[1:])
        assert args.command == "mount"
        assert str(args.mountpoint) == overrides.get("KVPFS_MOUNTPOINT", "/run/kvp")
        assert args.allow_other and not args.simulate
    assert default_file_examples()["KVPFS_OPTIONS"] == "--guest-group kvp"
    pre = [expand(cmd.lstrip("-"), env) for cmd in settings["ExecStartPre"]]
    assert ["fusermount3", "-u", "-z", "/run/kvp"] in pre
    assert settings["ExecStartPre"][0].startswith("-")  # nothing to clear is no failure
    (stop_post,) = settings["ExecStopPost"]
    words = expand(stop_post.lstrip("-"), env)
    assert words == ["/usr/local/bin/kvpfs", "recover", "/run/kvp"]
    args = build_parser().parse_args(words[1:])
    assert (args.command, str(args.mountpoint)) == ("recover", "/run/kvp")


def test_unit_watchdog_and_memory_settings():
    """The watchdog restarts kvpfs, and kvpfs has time to ping and to stop cleanly."""
    settings = unit_settings(UNIT.read_text())
    seconds = {name: int(settings[name][0]) for name in
               ("WatchdogSec", "TimeoutStopSec", "TimeoutAbortSec")}
    assert seconds["WatchdogSec"] >= 10  # pings every WatchdogSec/4: room for a busy machine
    assert seconds["TimeoutStopSec"] >= 5 and seconds["TimeoutAbortSec"] >= 2
    assert settings["Restart"] == ["on-failure"]  # includes a watchdog timeout
    assert "WatchdogSignal" not in settings  # SIGABRT: faulthandler logs every stack
    mega = {name: int(settings[name][0].rstrip("M")) for name in ("MemoryHigh", "MemoryMax")}
    assert 100 <= mega["MemoryHigh"] < mega["MemoryMax"]


@requires_fuse
def test_ready_is_notified_once_mounted(tmp_path):
    """Type=notify: READY=1 arrives when the mount already answers."""
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(address))
        notify.settimeout(20)
        kvpfs = start_with_notify(tmp_path, address)
        try:
            message = notify.recv(4096)
            mounted = os.path.ismount(kvpfs.mnt)
            assert message == b"READY=1"
            assert mounted
            assert {pool.dirname for pool in Pool} <= set(os.listdir(kvpfs.mnt))
            kvpfs.stop()  # its exit status: test_stop_right_after_ready_is_clean
        finally:
            kvpfs.cleanup()
    assert not os.path.ismount(kvpfs.mnt)


# A real systemd 252 runs the unit as shipped, as PID 1 of private PID, mount, UTS and cgroup
# namespaces: its own /run, /dev (with a stand-in /dev/vmbus/hv_kvp that --simulate never
# opens), /var/lib, /usr/local/bin (holding this venv's kvpfs) and /etc/default/kvpfs
# (KVPFS_OPTIONS=--simulate). SYSTEMD_UNIT_PATH limits it to the unit and stub targets, so
# nothing else starts. It shares the host's network and kernel, not its mounts or files.
SYSTEMD_OUTER = r"""
set -e
group="$1"; shift
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    mkdir "/sys/fs/cgroup/$group" && echo $$ > "/sys/fs/cgroup/$group/cgroup.procs"
else
    for h in systemd unified devices; do
        [ -d "/sys/fs/cgroup/$h" ] || continue
        mkdir "/sys/fs/cgroup/$h/$group" && echo $$ > "/sys/fs/cgroup/$h/$group/cgroup.procs"
    done
fi
exec unshare --cgroup --pid --fork --kill-child --mount --uts --propagation private \
    --mount-proc sh -c "$SYSTEMD_INNER" sh "$@"
"""
SYSTEMD_INNER = r"""
set -e
unit="$1" kvpfs="$2"
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
else
    mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
    mkdir /sys/fs/cgroup/systemd
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
    if grep -q cgroup2 /proc/filesystems; then
        mkdir /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
    fi
    if grep -qw devices /proc/cgroups; then
        mkdir /sys/fs/cgroup/devices && mount -t cgroup -o devices cgroup /sys/fs/cgroup/devices
    fi
fi
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/lock /run/units/kvpfs.service.d /run/bin /run/default /run/varlib /run/test
mount -t tmpfs -o mode=755 tmpfs /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9; mknod -m 666 /dev/tty c 5 0
mknod -m 600 /dev/fuse c 10 229
mkdir /dev/pts /dev/shm /dev/vmbus && mknod -m 600 /dev/vmbus/hv_kvp c 10 123
ln -s "$kvpfs" /run/bin/kvpfs && mount --bind /run/bin /usr/local/bin
cp -a /etc/default/. /run/default/ && mount --bind /run/default /etc/default
echo 'KVPFS_OPTIONS=--simulate --pool-dir /var/lib/hyperv' > /etc/default/kvpfs
mount --bind /run/varlib /var/lib
cp "$unit" /run/units/kvpfs.service
printf '[Service]\nStandardOutput=append:/run/test/kvpfs.log\nStandardError=inherit\n' \
    > /run/units/kvpfs.service.d/test-log.conf
for t in sysinit.target basic.target shutdown.target system.slice; do
    printf '[Unit]\nDefaultDependencies=no\n' > "/run/units/$t"
done
printf '[Unit]\nDefaultDependencies=no\nWants=kvpfs.service\n' > /run/units/kvpfs-test.target
printf '[Service]\nExecStart=sleep infinity\n' > /run/units/hv-kvp-daemon.service
SYSTEMD_UNIT_PATH=/run/units container=kvpfs-test exec /lib/systemd/systemd --system \
    --unit=kvpfs-test.target --log-target=null --show-status=false </dev/null >/dev/null 2>&1
"""


class NamespacedSystemd:
    """systemd as PID 1 of its own namespaces (SYSTEMD_OUTER); commands run beside it."""

    def __init__(self) -> None:
        self.group = f"kvpfs-test-{uuid.uuid4().hex[:8]}"
        self.proc = subprocess.Popen(
            ["sh", "-c", SYSTEMD_OUTER, "sh", self.group, str(UNIT), str(KVPFS)],
            env={**os.environ, "SYSTEMD_INNER": SYSTEMD_INNER},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = 0

    def wait_for_boot(self) -> None:
        def init_pid() -> int:
            """unshare's child once it is PID 1 of the new namespace (not a passing mkdir)."""
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                for child in children.read_text().split():
                    status = Path(f"/proc/{child}/status").read_text()
                    nspid = next(line for line in status.splitlines()
                                 if line.startswith("NSpid:")).split()
                    if nspid[-1] == "1" and len(nspid) > 2:
                        return int(child)
            except (OSError, StopIteration, ValueError):
                pass
            return 0

        def booted() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd did not start: {self.proc.stderr.read()}")
            self.pid = self.pid or init_pid()
            return bool(self.pid) and self.state("kvpfs-test.target") == "active"

        wait_for(booted, timeout=60, what="systemd to boot")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--target={self.pid}", "--mount", "--pid", "--",
                               *command], capture_output=True, text=True, timeout=60,
                              check=check)

    def state(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def main_pid(self) -> int:
        return int(self.run("systemctl", "show", "-P", "MainPID", "kvpfs.service").stdout)

    def log(self) -> str:
        return self.run("cat", "/run/test/kvpfs.log", check=False).stdout

    def stop(self) -> None:
        self.proc.kill()  # unshare --kill-child: systemd and its whole PID namespace go too
        self.proc.wait()
        for hierarchy in ("", "systemd/", "unified/", "devices/"):
            top = Path(f"/sys/fs/cgroup/{hierarchy}{self.group}")
            if top.is_dir():
                wait_for(lambda top=top: _remove_cgroup(top), timeout=10, what=f"{top} to empty")


def _remove_cgroup(top: Path) -> bool:
    for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()
    return not top.exists()


@pytest.fixture
def systemd():
    if fuse_missing():
        skip_unless_ci(fuse_missing())
    for tool in ("/lib/systemd/systemd", shutil.which("nsenter"), shutil.which("unshare")):
        if not tool or not os.path.exists(tool):
            skip_unless_ci(f"{tool} is missing")
    if os.path.exists("/run/systemd/system"):
        # Not tried there: a second systemd would need a cgroup delegated by the first.
        skip_unless_ci("systemd already runs this machine; the unit tests need a machine where"
                       " it does not (they run their own systemd in private namespaces)")
    instance = NamespacedSystemd()
    try:
        instance.wait_for_boot()
        yield instance
    finally:
        instance.stop()


def test_unit_under_real_systemd(systemd):
    """The unit as shipped, run by systemd: notify, sandbox, visible mount, restart, conflicts."""
    wait_for(lambda: systemd.state("kvpfs.service") in ("active", "failed"), timeout=30,
             what="kvpfs.service to start")
    assert systemd.state("kvpfs.service") == "active", systemd.log()  # READY=1 arrived
    # The mount is there for every process, not only inside the service.
    assert systemd.run("findmnt", "-n", "-o", "FSTYPE", "/run/kvp").stdout.strip() == "fuse.kvpfs"
    systemd.run("sh", "-c", "echo Ready > /run/kvp/guest/Status")
    assert systemd.run("cat", "/run/kvp/guest/Status").stdout == "Ready\n"  # as written
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    assert systemd.run(*as_nobody, "ls", "/run/kvp/auto").returncode == 0  # --allow-other
    assert systemd.run(*as_nobody, "ls", "/run/kvp/external", check=False).returncode != 0
    # The sandbox is in force.
    status = systemd.run("cat", f"/proc/{systemd.main_pid()}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapBnd"], 16) == 1 << 21  # CAP_SYS_ADMIN only
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"

    # Killed: restarted (Restart=on-failure), a fresh mount in place of the dead one.
    old_pid = systemd.main_pid()
    systemd.run("systemctl", "kill", "--signal=KILL", "kvpfs.service")
    wait_for(lambda: systemd.main_pid() not in (0, old_pid)
             and systemd.state("kvpfs.service") == "active", timeout=30,
             what="kvpfs.service to restart")
    # After a restart the key reads back as written: its newline is kept beside the pools
    # (docs/tools.md; a SIGKILL may come before it is saved), the host sees "Ready".
    assert systemd.run("cat", "/run/kvp/guest/Status").stdout in ("Ready\n", "Ready")

    # Conflicts= both ways with hv-kvp-daemon.service (a stand-in here).
    time.sleep(1.5)  # a stop right after the start is test_stop_right_after_ready_is_clean's
    systemd.run("systemctl", "start", "hv-kvp-daemon.service")
    assert systemd.state("kvpfs.service") == "inactive"
    assert systemd.run("findmnt", "/run/kvp", check=False).returncode != 0  # unmounted cleanly
    systemd.run("systemctl", "start", "kvpfs.service")
    assert systemd.state("hv-kvp-daemon.service") == "inactive"
    assert systemd.state("kvpfs.service") == "active"

    # Not a Hyper-V guest: the start is skipped at once, nothing waits.
    time.sleep(1.5)
    systemd.run("systemctl", "stop", "kvpfs.service")
    assert systemd.state("kvpfs.service") == "inactive"  # a clean exit on SIGTERM
    systemd.run("rm", "/dev/vmbus/hv_kvp")
    started = time.monotonic()
    systemd.run("systemctl", "start", "kvpfs.service")
    assert time.monotonic() - started < 5
    assert systemd.state("kvpfs.service") == "inactive"
    assert systemd.run("systemctl", "show", "-P", "ConditionResult",
                       "kvpfs.service").stdout.strip() == "no"


def served_after_restart(systemd: NamespacedSystemd, old_pid: int) -> bool:
    """A new kvpfs is active and a read through its mount succeeds (never hangs the test)."""
    pid = systemd.main_pid()
    if pid in (0, old_pid) or systemd.state("kvpfs.service") != "active":
        return False
    done = systemd.run("timeout", "5", "cat", "/run/kvp/guest/Status", check=False)
    # As written, or as stored if the kill came before its newline was saved (docs/tools.md)
    return done.returncode == 0 and done.stdout in ("Ready\n", "Ready")


# Bounds the tests assert, generous for a loaded machine; the figures measured are printed.
KILL_RECOVERY_BOUND = 30.0  # RestartSec=2 + a start
WATCHDOG_RECOVERY_BOUND = 60.0  # WatchdogSec=15 + SIGABRT + RestartSec=2 + a start


def test_watchdog_and_recovery_under_real_systemd(systemd):
    """SIGKILL, then SIGSTOP (only the watchdog notices): systemd brings a working kvpfs
    back each time, with no human, and ExecStopPost's `kvpfs recover` cleans up."""
    wait_for(lambda: systemd.state("kvpfs.service") in ("active", "failed"), timeout=30,
             what="kvpfs.service to start")
    assert systemd.state("kvpfs.service") == "active", systemd.log()
    assert "watchdog pings every 3.75 s" in systemd.log()
    systemd.run("sh", "-c", "echo Ready > /run/kvp/guest/Status")

    old_pid = systemd.main_pid()
    started = time.monotonic()
    systemd.run("systemctl", "kill", "--signal=KILL", "kvpfs.service")
    wait_for(lambda: served_after_restart(systemd, old_pid), timeout=KILL_RECOVERY_BOUND,
             interval=0.2, what="kvpfs to be back after SIGKILL")
    after_kill = time.monotonic() - started
    assert "/run/kvp: unmounted" in systemd.log()  # the dead mount, by `kvpfs recover`

    old_pid = systemd.main_pid()
    time.sleep(1.5)  # a stop right after the start is test_stop_right_after_ready_is_clean's
    started = time.monotonic()
    systemd.run("systemctl", "kill", "--signal=STOP", "kvpfs.service")
    assert systemd.main_pid() == old_pid  # stopped, not dead: only the watchdog can tell
    wait_for(lambda: served_after_restart(systemd, old_pid), timeout=WATCHDOG_RECOVERY_BOUND,
             interval=0.2, what="the watchdog to restart a stopped kvpfs")
    after_stop = time.monotonic() - started
    result = systemd.run("systemctl", "show", "-P", "NRestarts", "kvpfs.service").stdout
    assert int(result) == 2
    log = systemd.log()
    assert "Fatal Python error: Aborted" in log  # SIGABRT, with every thread's stack
    assert "File " in log[log.index("Fatal Python error: Aborted"):]
    print(f"kvpfs served again {after_kill:.1f} s after SIGKILL and {after_stop:.1f} s after"
          f" SIGSTOP (WatchdogSec=15)")


@requires_fuse
@pytest.mark.parametrize("fusectl", [False, True], ids=["forced-unmount", "fusectl"])
def test_recover_aborts_a_wedged_connection(tmp_path, fusectl):
    """`kvpfs recover` (the unit's ExecStopPost) frees a mount nobody answers, without ever
    looking at it, and leaves nothing mounted; with /sys/fs/fuse/connections mounted it
    aborts through fusectl, otherwise through a forced unmount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = silent_fuse_mount(mnt)
    stuck = None
    try:
        stuck = subprocess.Popen(["stat", "-f", str(mnt)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        wait_for(lambda: waiting_in_fuse(stuck.pid), timeout=10, what="stat to wait on the mount")
        command = [str(KVPFS), "recover", str(mnt)]
        if fusectl:  # in a private mount namespace: the host keeps its /sys as it is
            command = ["unshare", "--mount", "sh", "-c", "mount -t fusectl fusectl"
                       " /sys/fs/fuse/connections && exec \"$@\"", "sh", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        aborted = re.search(r"aborted FUSE connection (\d+)( \(forced unmount\))?", done.stdout)
        assert aborted, done.stdout
        assert bool(aborted.group(2)) != fusectl
        assert stuck.wait(timeout=10) != 0  # freed: the aborted connection failed its request
        assert "Transport endpoint is not connected" in stuck.stderr.read()
        if fusectl:  # detached in the private namespace only; here it is dead (aborted)
            subprocess.run(["umount", "-l", str(mnt)], check=True)
        assert str(mnt) not in Path("/proc/self/mountinfo").read_text()
    finally:
        os.close(fd)
        if stuck is not None and stuck.poll() is None:
            stuck.kill()
            stuck.wait()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_recover_without_a_mount_does_nothing(tmp_path):
    done = subprocess.run([str(KVPFS), "recover", str(tmp_path)], capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{tmp_path}: no kvpfs mount, nothing to recover\n"


def start_with_notify(base: Path, address: Path) -> KvpfsProcess:
    kvpfs = KvpfsProcess(base)
    kvpfs.mnt.mkdir(parents=True)
    with open(kvpfs.log, "wb") as log:
        kvpfs.proc = subprocess.Popen(
            [str(KVPFS), "mount", str(kvpfs.mnt), "--simulate", "--pool-dir", str(kvpfs.pools),
             "--control", str(kvpfs.control)],
            env={**os.environ, "NOTIFY_SOCKET": str(address)}, stdout=subprocess.DEVNULL,
            stderr=log)
    return kvpfs


@requires_fuse
def test_stop_right_after_ready_is_clean(tmp_path):
    """`systemctl stop` just after READY=1: SIGTERM must unmount cleanly, every time."""
    for attempt in range(5):
        address = tmp_path / f"notify-{attempt}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(address))
            notify.settimeout(20)
            kvpfs = start_with_notify(tmp_path / str(attempt), address)
            try:
                assert notify.recv(4096) == b"READY=1"
                kvpfs.proc.send_signal(signal.SIGTERM)
                assert kvpfs.proc.wait(timeout=20) == 0, kvpfs.output()
                assert not os.path.ismount(kvpfs.mnt) and not _dead_mount(kvpfs.mnt)
            finally:
                kvpfs.cleanup()


# ---------------------------------------------------------------- the udev rule

RULE_LINE = re.compile(
    r'(?P<key>[A-Z_]+)(\{(?P<attr>[^}]+)\})?(?P<op>==|!=|\+=|-=|:=|=)"(?P<value>[^"]*)"')


def test_udev_rule_is_well_formed():
    """Strictly: every clause KEY[{attr}]OP"value", separated by ", " (udev 252 is lenient)."""
    rules = [line for line in RULES.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(rules) == 1
    clauses = [RULE_LINE.fullmatch(part) for part in rules[0].split(", ")]
    assert all(clauses), rules[0]
    parsed = [(c["key"], c["attr"], c["op"], c["value"]) for c in clauses]
    assert parsed == [
        ("ACTION", None, "!=", "remove"),
        ("SUBSYSTEM", None, "==", "misc"),
        ("KERNEL", None, "==", "vmbus/hv_kvp"),
        ("TAG", None, "+=", "systemd"),
        ("ENV", "SYSTEMD_WANTS", "+=", "kvpfs.service"),
    ]


UDEV_SANDBOX = r"""
set -e
rules="$1" action="$2"
# Everything udevadm writes lands in these tmpfs; the host's /dev, /run and sysfs stay as they are.
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev
mkdir /run/rules /run/empty
cp "$rules" /run/rules/
mount --bind /run/rules /etc/udev/rules.d
mount --bind /run/empty /usr/lib/udev/rules.d
mount -t tmpfs tmpfs /sys/devices/virtual/misc
dev='/sys/devices/virtual/misc/vmbus!hv_kvp'
mkdir "$dev"
printf 'MAJOR=10\nMINOR=123\nDEVNAME=vmbus/hv_kvp\n' > "$dev/uevent"
printf '10:123\n' > "$dev/dev"
ln -s ../../../../class/misc "$dev/subsystem"
SYSTEMD_DEVICE_VERIFY_SYSFS=0 exec udevadm test --action="$action" "$dev"
"""


@pytest.mark.parametrize("action, wanted", [("add", True), ("change", True), ("remove", False)])
def test_udev_rule_wants_kvpfs_for_the_kvp_device(action, wanted):
    """What udev itself makes of the rule for a (fake) /dev/vmbus/hv_kvp."""
    if shutil.which("udevadm") is None:
        skip_unless_ci("udevadm is not installed (Debian package udev; ./dev.sh setup installs it)")
    if os.geteuid() != 0:
        skip_unless_ci("needs root for a private mount namespace")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", UDEV_SANDBOX, "sh",
         str(RULES), action],
        capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Reading rules file: /etc/udev/rules.d/60-kvpfs.rules" in output
    complaints = [line for line in output.splitlines() if line.startswith("/etc/udev/rules.d/")]
    assert not complaints, complaints
    properties = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert properties["DEVNAME"] == "/dev/vmbus/hv_kvp"
    if wanted:
        assert properties.get("SYSTEMD_WANTS") == "kvpfs.service"
        assert ":systemd:" in properties.get("CURRENT_TAGS", "")
    else:
        assert "SYSTEMD_WANTS" not in properties


# ---------------------------------------------------------------- the mount helper


def test_helper_argv_detection():
    assert mounthelper.is_helper_call(["kvpfs", "/run/kvp", "-o", "rw"])
    assert mounthelper.is_helper_call(["none", "/run/kvp"])
    assert mounthelper.is_helper_call(["/dev/vmbus/hv_kvp", "/run/kvp"])
    assert mounthelper.is_helper_call(["/run/kvp", "-o", "simulate"])  # mount.fuse3, no source
    for argv in (["mount", "/run/kvp"], ["host", "list", "guest"], ["--version"], [],
                 ["mout", "/run/kvp"]):
        assert not mounthelper.is_helper_call(argv)


def test_helper_options_translate():
    argv = mounthelper.translate("kvpfs", "/run/kvp", [
        "rw,nosuid,nodev,dev,suid,defaults,auto,noauto,user,nouser,_netdev,nofail,exec,noexec",
        "x-systemd.requires=network.target,comment=systemd.automount",
        "simulate,pool_dir=/srv/pools,device=/dev/kvp,allow_other,guest_group=kvp",
        "external_readable,raw,control=/run/c.sock,lock-timeout=2.5,ro,noatime,debug",
    ])
    assert argv == ["mount", "/run/kvp", "--simulate", "--pool-dir", "/srv/pools",
                    "--device", "/dev/kvp", "--allow-other", "--guest-group", "kvp",
                    "--external-readable", "--raw", "--control", "/run/c.sock",
                    "--lock-timeout", "2.5", "--debug", "-o", "ro,noatime"]
    args = build_parser().parse_args(argv)
    assert (args.simulate, args.lock_timeout, args.options) == (True, 2.5, ["ro,noatime"])
    # A device path as the source is the device; relative paths become absolute.
    argv = mounthelper.translate("/dev/vmbus/hv_kvp", "mnt", ["pool_dir=pools"])
    assert argv == ["mount", os.path.abspath("mnt"), "--pool-dir", os.path.abspath("pools"),
                    "--device", "/dev/vmbus/hv_kvp"]
    for bad in ("alow_other", "simulate=1", "pool_dir", "pool_dir=", "suid=0", "writeback"):
        with pytest.raises(mounthelper.HelperUsageError):
            mounthelper.translate("kvpfs", "/run/kvp", [bad])
    with pytest.raises(mounthelper.HelperUsageError):
        mounthelper.translate("somewhere", "/run/kvp", [])


def daemon_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line mentions `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def unmount_and_expect_exit(mnt: Path) -> None:
    """`umount MNT` must end the background daemon that served it."""
    assert daemon_pids(str(mnt)), "the background daemon is not running"
    # An inotify echo of the host's start-up push holds a file open for a moment: an
    # umount landing on one is refused as busy, as on any filesystem in use.
    wait_for(lambda: subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30,
                                    check=False).returncode == 0, what="a successful umount")
    wait_for(lambda: not daemon_pids(str(mnt)), timeout=10, what="the daemon to exit after umount")
    assert not os.path.ismount(mnt)


def helper_options(base: Path) -> str:
    return f"simulate,pool_dir={base / 'pools'},control={base / 'control.sock'}"


def check_served(mnt: Path, control: Path) -> None:
    """Files work both ways through a helper-made mount."""
    from kvpfs import control as control_mod

    # The host pushes its identity right after registering, shortly after the mount.
    vm_id = mnt / "auto_external" / "VirtualMachineId"
    wait_for(vm_id.exists, timeout=10, what="the host's VirtualMachineId")
    assert vm_id.read_text()
    (mnt / "guest" / "Status").write_text("Ready\n")
    items = dict(control_mod.call(control, {"op": "list", "pool": "guest"})["items"])
    assert items["Status"] == "Ready"


@pytest.fixture
def helper_base(tmp_path):
    if fuse_missing():
        skip_unless_ci(fuse_missing())
    (tmp_path / "mnt").mkdir()
    yield tmp_path
    mnt = tmp_path / "mnt"
    for pid in daemon_pids(str(mnt)):
        os.kill(pid, signal.SIGTERM)
    if os.path.ismount(mnt) or _dead_mount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_mount_helper_returns_once_mounted(helper_base):
    mnt = helper_base / "mnt"
    done = subprocess.run([str(MOUNT_HELPER), "kvpfs", str(mnt), "-o",
                           "rw,nodev,nosuid,defaults," + helper_options(helper_base)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert os.path.ismount(mnt)  # no waiting: mounted before the helper returned
    assert done.stdout == ""
    check_served(mnt, helper_base / "control.sock")
    # The daemon left the caller's session and terminal behind.
    (pid,) = daemon_pids(str(mnt))
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/2") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    unmount_and_expect_exit(mnt)


def test_mount_helper_reports_failure(helper_base):
    mnt = helper_base / "mnt"
    done = subprocess.run([str(KVPFS), "/dev/no-such-kvp", str(mnt)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EXIT_UNAVAILABLE
    assert "/dev/no-such-kvp does not exist" in done.stderr
    assert not os.path.ismount(mnt)
    done = subprocess.run([str(MOUNT_HELPER), "kvpfs", str(mnt), "-o", "simulate,alow_other"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USAGE
    assert "unknown mount option 'alow_other'" in done.stderr
    done = subprocess.run([str(KVPFS), "kvpfs", str(helper_base / "missing"), "-o", "simulate"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USAGE
    assert "is not a directory" in done.stderr


def test_mount_helper_foreground(helper_base):
    mnt = helper_base / "mnt"
    proc = subprocess.Popen([str(KVPFS), "kvpfs", str(mnt), "-f", "-o",
                             helper_options(helper_base)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.ismount(mnt) or proc.poll() is not None, timeout=10,
                 what="the mount")
        assert proc.poll() is None, proc.communicate()
        check_served(mnt, helper_base / "control.sock")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == b""  # no greeting: a helper is quiet
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.ismount(mnt)


@pytest.fixture
def shared_dir():
    """A tmpfs with shared propagation, like /run on a systemd host."""
    if fuse_missing():
        skip_unless_ci(fuse_missing())
    path = Path(tempfile.mkdtemp(prefix="kvpfs-shared-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "kvpfs-test", str(path)],
                   check=True)
    subprocess.run(["mount", "--make-shared", str(path)], check=True)
    try:
        yield path
    finally:
        for pid in daemon_pids(str(path)):
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        subprocess.run(["umount", "--recursive", "--lazy", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


# mount(8) runs helpers with its own fixed PATH (/usr/local/sbin:/usr/local/bin:...), so
# mount.fuse3 can only find a `kvpfs` installed there. In a private mount namespace,
# /usr/local/sbin is replaced by a directory holding this venv's kvpfs; the mount point
# sits in a shared tmpfs, so the mount made in there appears out here too.
MOUNT_NAMESPACE = r"""
set -e
bindir="$1"; shift
mount --make-slave "$(findmnt -n -o TARGET --target /usr/local/sbin)"  # keep the bind in here
mount --bind "$bindir" /usr/local/sbin
exec "$@"
"""


def mount8(shared: Path, *args: str) -> subprocess.CompletedProcess:
    bindir = shared.parent / f"{shared.name}-bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / "kvpfs"
    if not link.is_symlink():
        link.symlink_to(KVPFS)
    try:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", MOUNT_NAMESPACE,
             "sh", str(bindir), "mount", *args],
            capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(bindir, ignore_errors=True)


def test_mount_t_fuse_kvpfs(shared_dir):
    mnt = shared_dir / "mnt"
    mnt.mkdir()
    done = mount8(shared_dir, "-t", "fuse.kvpfs", "kvpfs", str(mnt), "-o",
                  "allow_other," + helper_options(shared_dir))
    assert done.returncode == 0, done.stderr
    assert os.path.ismount(mnt)
    found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", str(mnt)],
                           capture_output=True, text=True).stdout.split()
    assert found[:2] == ["kvpfs", "fuse.kvpfs"]
    assert "allow_other" in found[2] and "nosuid" in found[2] and "nodev" in found[2]
    check_served(mnt, shared_dir / "control.sock")
    unmount_and_expect_exit(mnt)


def test_fstab_line(shared_dir):
    """An /etc/fstab-style line, from a scratch file (mount -T): the real fstab is untouched."""
    mnt = shared_dir / "mnt"
    mnt.mkdir()
    fstab = shared_dir / "fstab"
    fstab.write_text(f"# test\nkvpfs {mnt} fuse.kvpfs "
                     f"defaults,noauto,nofail,allow_other,{helper_options(shared_dir)} 0 0\n")
    done = mount8(shared_dir, "-T", str(fstab), str(mnt))
    assert done.returncode == 0, done.stderr
    assert os.path.ismount(mnt)
    check_served(mnt, shared_dir / "control.sock")
    unmount_and_expect_exit(mnt)


# ---------------------------------------------------------------- install.sh


def test_install_script_into_a_scratch_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    done = subprocess.run(["bash", str(CONTRIB / "install.sh"), "--root", str(root),
                           "--kvpfs", str(KVPFS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert os.readlink(root / "usr/local/bin/kvpfs") == str(KVPFS)
    assert os.readlink(root / "sbin/mount.kvpfs") == str(MOUNT_HELPER)
    assert (root / "etc/systemd/system/kvpfs.service").read_text() == UNIT.read_text()
    assert (root / "etc/udev/rules.d/60-kvpfs.rules").read_text() == RULES.read_text()
    assert (root / "etc/default/kvpfs").read_text() == DEFAULTS.read_text()
    # Settings already there are kept; an uninstall removes what the install added.
    (root / "etc/default/kvpfs").write_text("KVPFS_OPTIONS=--raw\n")
    subprocess.run(["bash", str(CONTRIB / "install.sh"), "--root", str(root), "--kvpfs",
                    str(KVPFS)], check=True, capture_output=True, timeout=60)
    assert (root / "etc/default/kvpfs").read_text() == "KVPFS_OPTIONS=--raw\n"
    subprocess.run(["bash", str(CONTRIB / "install.sh"), "--root", str(root), "--uninstall"],
                   check=True, capture_output=True, timeout=60)
    assert not (root / "usr/local/bin/kvpfs").is_symlink()
    assert not (root / "etc/systemd/system/kvpfs.service").exists()
    assert (root / "etc/default/kvpfs").exists()


# ---------------------------------------------------------------- containers


def load_yaml(path: Path) -> list:
    yaml = pytest.importorskip("yaml")
    return list(yaml.safe_load_all(path.read_text()))


def shared_parent() -> str:
    mountpoint = default_file_examples()["KVPFS_MOUNTPOINT"]
    return os.path.dirname(mountpoint)


def scripted_paths(script: str) -> list[str]:
    """Paths into the kvpfs mount that a container script reads or writes."""
    mountpoint = default_file_examples()["KVPFS_MOUNTPOINT"]
    return re.findall(re.escape(mountpoint) + r"/[\w/]+", script)


def check_container_paths(script: str) -> None:
    paths = scripted_paths(script)
    assert paths
    mountpoint = default_file_examples()["KVPFS_MOUNTPOINT"]
    for path in paths:
        pool = Path(path).relative_to(mountpoint).parts[0]
        assert pool in {p.dirname for p in Pool}, path
    assert any("/auto_external/VirtualMachineId" in p for p in paths)
    assert any("/guest/" in p for p in paths)


def test_compose_file():
    (doc,) = load_yaml(CONTRIB / "containers" / "compose.yaml")
    (service,) = doc["services"].values()
    (volume,) = service["volumes"]
    assert volume["type"] == "bind" and volume["read_only"] is True
    assert volume["bind"]["propagation"] == "rslave"
    assert volume["source"] == shared_parent()  # the parent, not the mount itself
    check_container_paths(service["command"][-1])
    script = "\n".join(service["command"])
    assert volume["target"] in script


def test_kubernetes_daemonset():
    (doc,) = load_yaml(CONTRIB / "kubernetes" / "kvpfs-reader.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("apps/v1", "DaemonSet")
    spec = doc["spec"]["template"]["spec"]
    assert doc["spec"]["selector"]["matchLabels"].items() <= \
        doc["spec"]["template"]["metadata"]["labels"].items()
    (volume,) = spec["volumes"]
    assert volume["hostPath"]["path"] == shared_parent()
    (container,) = spec["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert mount["mountPropagation"] == "HostToContainer"
    assert mount["readOnly"] is True
    check_container_paths(container["command"][-1])
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["supplementalGroups"]  # the --guest-group, to write guest/


@requires_fuse
def test_rslave_bind_of_the_parent_follows_a_restart(shared_dir, tmp_path):
    """What `-v parent:parent:ro,rslave` / HostToContainer does, with a kvpfs restart in between.

    The "container" is a private mount namespace whose view of the parent is a
    read-only bind made a recursive slave, as runc does.
    """
    kvpfs = KvpfsProcess(tmp_path)
    kvpfs.mnt = shared_dir / "kvp"
    view = Path(tempfile.mkdtemp(prefix="kvpfs-container-", dir="/tmp"))
    inside = view / "kvp"
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
         'mount --bind -o ro "$1" "$2" && mount --make-rslave "$2" && echo ready'
         ' && exec sleep 600', "sh", str(shared_dir), str(view)],
        stdout=subprocess.PIPE, text=True)

    def container(*command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--target={holder.pid}", "--mount", "--", *command],
                              capture_output=True, text=True, timeout=30, check=check)

    try:
        assert holder.stdout.readline().strip() == "ready"
        kvpfs.start()
        wait_for(kvpfs.path("auto_external", "VirtualMachineId").exists, timeout=10,
                 what="the VM id")
        first_id = kvpfs.path("auto_external", "VirtualMachineId").read_text()
        assert container("cat", f"{inside}/auto_external/VirtualMachineId").stdout == first_id
        assert kvpfs.stop() == 0
        assert container("ls", "-A", str(inside)).stdout == ""  # gone inside too

        marker = uuid.uuid4().hex
        kvpfs.start()
        assert kvpfs.host("set", "external", "restarted", marker)["status"] == 0
        assert container("cat", f"{inside}/external/restarted").stdout == marker
        # The parent is read-only in there; the mount below it keeps kvpfs's own rules.
        assert container("touch", f"{view}/new", check=False).returncode != 0
        container("sh", "-c", f"echo Ready > {inside}/guest/FromContainer")
        assert dict(kvpfs.host("list", "guest")["items"])["FromContainer"] == "Ready"
    finally:
        holder.kill()
        holder.wait()
        kvpfs.cleanup()
        shutil.rmtree(view, ignore_errors=True)


# ---------------------------------------------------------------- README


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Running it as a service, from fstab, in containers")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_examples_are_what_kvpfs_accepts():
    section = readme_section()
    fstab_lines = [line.split() for line in section.splitlines()
                   if re.match(r"kvpfs\s+/\S+\s+fuse\.kvpfs\s", line)]
    assert fstab_lines
    for source, mountpoint, _fstype, options, *_ in fstab_lines:
        argv = mounthelper.translate(source, mountpoint, [options])
        assert build_parser().parse_args(argv).allow_other
    by_hand = re.findall(r"`mount -t fuse\.kvpfs (kvpfs|none|/\S+) (/\S+) -o (\S+)`", section)
    assert by_hand
    for source, mountpoint, options in by_hand:
        build_parser().parse_args(mounthelper.translate(source, mountpoint, [options]))
    # The settings shown for container hosts are the ones contrib/kvpfs.default documents.
    examples = default_file_examples()
    for name, value in examples.items():
        assert f"{name}={value}" in section
    docker = section[section.index("docker run"):]
    docker = docker[:docker.index("```")]
    # Docker 25+: read-only but not recursively, so guest/ stays writable (docs/containers.md).
    parent = shared_parent()
    assert (f"--mount type=bind,src={parent},dst={parent},readonly,"
            "bind-propagation=rslave,bind-recursive=writable") in docker
    assert f"-v {parent}:{parent}:ro,rslave" in section  # Podman's ro is not recursive
    check_container_paths(docker)
