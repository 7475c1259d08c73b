"""Containers given the kvpfs mount the way docs/containers.md says, run for real.

Podman (rootful, runc) and bubblewrap run on a busybox rootfs; kvpfs serves the simulated
host, mounted at SHARE/kvp where SHARE is a temporary shared mount (as /run is on a systemd
host). The options the containers get are read from docs/containers.md, so the page and
the tests cannot drift apart. Each runtime is tried with kvpfs started before the
container, and after it (then restarted while the container runs). Each time the
container must read the host's keys, write guest/ContainerStatus with exit 0 and read it
back, the host must see the value, and every other write must be refused as documented.

bubblewrap's recursive `--ro-bind` is run too: it shows the trap the layout avoids
(guest/ read-only or writable depending on what started first).

Docker, Compose and Kubernetes cannot run here: their files and the documented Docker
command are checked for the options the page names.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, KvpfsProcess, fuse_missing, skip_unless_ci
from tests.support.containers import (
    CHECKS_ONCE,
    CHECKS_PER_LINE,
    CONTAINER_MOUNT,
    CONTAINER_SHARE,
    Podman,
    Step,
    busybox_rootfs,
    bwrap_sandbox,
    parse_checks,
    runc_bundle,
    shared_directory,
    tool_missing,
    unique_name,
)
from tests.support.waiting import wait_for

DOC = REPO / "docs" / "containers.md"
COMPOSE = REPO / "contrib" / "containers" / "compose.yaml"
DAEMONSET = REPO / "contrib" / "kubernetes" / "kvpfs-reader.yaml"
DEFAULTS = REPO / "contrib" / "kvpfs.default"
TMPFILES = REPO / "contrib" / "containers" / "kvp-share.conf"
GUEST_GID = 2375  # the --guest-group given to kvpfs, and to the Podman container


# ---------------------------------------------------------------- the page's commands


def documented_commands(program: str) -> list[list[str]]:
    """The shell commands of docs/containers.md that run `program`, split into words."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.DOTALL):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines(keepends=True):
            pending += line
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quoted argument goes on over the next lines
                continue
            pending = ""
            if words and words[0] == program:
                commands.append(words)
        assert not pending, f"unbalanced quotes in {block!r}"
    assert commands, f"docs/containers.md shows no {program} command"
    return commands


def option_values(words: list[str], *names: str) -> list[str]:
    """The values given to any of `names` (`--name VALUE` or `--name=VALUE`)."""
    values = []
    for i, word in enumerate(words):
        name, sep, value = word.partition("=")
        if name in names:
            values.append(value if sep else words[i + 1])
    return values


def documented_podman_options(share: Path) -> list[str]:
    """`--user` and the kvpfs volume of the page's `podman run`, the source made `share`."""
    (command,) = [c for c in documented_commands("podman") if c[1] == "run"]
    (user,) = option_values(command, "--user", "-u")
    (volume,) = [v for v in option_values(command, "-v", "--volume")
                 if v.split(":")[1] == CONTAINER_SHARE]
    source, target, options = volume.split(":")
    assert source == target == CONTAINER_SHARE, volume
    return ["--user", user, "--group-add", str(GUEST_GID),
            "-v", f"{share}:{CONTAINER_SHARE}:{options}"]


BWRAP_ONE_PATH = {"--remount-ro", "--dev", "--proc", "--tmpfs", "--dir", "--mqueue"}
BWRAP_TWO_PATHS = {"--bind", "--ro-bind", "--dev-bind", "--bind-try", "--ro-bind-try",
                   "--symlink"}


def documented_bwrap_options(share: Path) -> list[str]:
    """The options of the page's `bwrap` command that concern /run/kvp-share, in order,
    with the host's source made `share`."""
    (command,) = documented_commands("bwrap")
    options: list[str] = []
    i = 1
    while i < len(command) and command[i].startswith("--"):
        option = command[i]
        count = 2 if option in BWRAP_TWO_PATHS else 1 if option in BWRAP_ONE_PATH else 0
        args = command[i + 1:i + 1 + count]
        if any(a == CONTAINER_SHARE or a.startswith(CONTAINER_SHARE + "/") for a in args):
            if count == 2:
                args = [str(share), args[1]]
            options += [option, *args]
        i += 1 + count
    assert options, f"no option of {command} concerns {CONTAINER_SHARE}"
    return options


# ---------------------------------------------------------------- the host's side


@dataclass
class Setup:
    rootfs: Path
    share: Path
    kvpfs: KvpfsProcess


def runtime_missing(*tools: str) -> None:
    reason = fuse_missing() or tool_missing(*tools)
    if reason:
        skip_unless_ci(reason)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A busybox rootfs, a shared directory, and a kvpfs (not started) to mount in it."""
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    with shared_directory(tmp_path / "share") as share:
        (tmp_path / "kvpfs").mkdir()
        kvpfs = KvpfsProcess(tmp_path / "kvpfs", "--allow-other", "--guest-group",
                             str(GUEST_GID))
        kvpfs.mnt = share / "kvp"
        kvpfs.mnt.mkdir()  # the mount point exists before kvpfs, as the unit's does
        try:
            yield Setup(rootfs, share, kvpfs)
        finally:
            kvpfs.cleanup()


def host_items(kvpfs: KvpfsProcess, pool: str) -> dict[str, str]:
    """A pool as the (simulated) host enumerates it."""
    return dict(kvpfs.host("list", pool)["items"])


def host_sets_marker(kvpfs: KvpfsProcess) -> str:
    """A new value the host sets for the key Marker, in auto_external/ and external/."""
    marker = uuid.uuid4().hex
    for pool in ("auto_external", "external"):
        assert kvpfs.host("set", pool, "Marker", marker)["status"] == 0
    return marker


def expect_documented(steps: dict[str, Step], setup: Setup, status: str, marker: str, *,
                      root: bool) -> None:
    """What docs/containers.md promises: keys read, guest/ written and seen by the host,
    everything else refused, by kvpfs (Permission denied) or by the read-only bind.
    external/ is for root only."""
    kvpfs = setup.kvpfs
    assert steps["vmid"] == Step(0, host_items(kvpfs, "auto_external")["VirtualMachineId"])
    assert steps["marker"] == Step(0, marker)
    if root:
        assert steps["secret"] == Step(0, marker)
    else:
        assert steps["secret"].rc != 0 and "Permission denied" in steps["secret"].output
    assert steps["guest"] == Step(0, ""), "echo > guest/ContainerStatus failed in the container"
    assert steps["readback"] == Step(0, status)
    for step in ("external", "auto_external"):
        assert steps[step].rc != 0 and "Permission denied" in steps[step].output, steps[step]
    assert steps["parent"].rc != 0, steps["parent"]
    assert "Read-only file system" in steps["parent"].output, steps["parent"]
    wait_for(lambda: host_items(kvpfs, "guest").get("ContainerStatus") == status, timeout=10,
             what=f"the host to see guest/ContainerStatus={status}")
    assert "Intruder" not in host_items(kvpfs, "external")
    assert host_items(kvpfs, "auto_external")["Marker"] == marker
    assert not (setup.share / "intruder").exists()


# ---------------------------------------------------------------- Podman


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    runtime_missing("podman", "runc")
    engine = Podman(tmp_path / "podman")
    try:
        yield engine
    finally:
        engine.remove_all()


@pytest.mark.parametrize("user", ["documented", "root"])
def test_podman_kvpfs_started_first(podman: Podman, setup: Setup, user: str):
    """As the page's user (uid 65534 in the guest group), and as the container's root, which
    is the host's root in rootful Podman: it writes guest/ without the group."""
    options = documented_podman_options(setup.share)
    if user == "root":
        options = options[options.index("-v"):]  # no --user, no --group-add
    setup.kvpfs.start()
    marker = host_sets_marker(setup.kvpfs)
    status = f"Ready {uuid.uuid4().hex}"
    done = podman.run(unique_name("first"), setup.rootfs, options,
                      "/bin/sh", "-c", CHECKS_ONCE, "sh", status)
    assert done.returncode == 0, done.stderr
    expect_documented(parse_checks(done.stdout), setup, status, marker, root=user == "root")


def test_podman_container_started_first_then_kvpfs_restarts(podman: Podman, setup: Setup):
    name = unique_name("early")
    started = podman.run(name, setup.rootfs, documented_podman_options(setup.share),
                         "/bin/sleep", "3600", detach=True)
    assert started.returncode == 0, started.stderr

    def look() -> tuple[int, str]:
        seen = podman.exec(name, "/bin/ls", "-A", CONTAINER_MOUNT)
        return seen.returncode, seen.stdout + seen.stderr

    assert look() == (0, "")  # no kvpfs yet: an empty directory
    for round_ in ("first start", "after a restart"):
        setup.kvpfs.start()
        marker = host_sets_marker(setup.kvpfs)
        status = f"Ready {round_}"
        done = podman.exec(name, "/bin/sh", "-c", CHECKS_ONCE, "sh", status)
        assert done.returncode == 0, done.stderr
        expect_documented(parse_checks(done.stdout), setup, status, marker, root=False)
        assert setup.kvpfs.stop() == 0
        assert look() == (0, "")  # the unmount reached it too


# ---------------------------------------------------------------- bubblewrap


@pytest.fixture
def bwrap() -> None:
    runtime_missing("bwrap")


def run_bwrap_once(setup: Setup, options: list[str], status: str) -> dict[str, Step]:
    done = subprocess.run(bwrap_sandbox(setup.rootfs, options, "/bin/sh", "-c", CHECKS_ONCE,
                                        "sh", status),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return parse_checks(done.stdout)


class WaitingSandbox:
    """A bwrap sandbox that runs the checks once per line it reads: started before kvpfs,
    it waits doing nothing until told to look, and it can look again after a restart."""

    def __init__(self, setup: Setup, options: list[str]) -> None:
        self.proc = subprocess.Popen(
            bwrap_sandbox(setup.rootfs, options, "/bin/sh", "-c", CHECKS_PER_LINE),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def checks(self, status: str, timeout: float = 30.0) -> dict[str, Step]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(status.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while not re.search(rb"(^|\n)end\n", self.buffer):
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise AssertionError(f"the sandbox did not answer in {timeout:g} s: "
                                     f"{self.buffer!r}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self.proc.wait(10)
                assert self.proc.stderr is not None
                raise AssertionError(f"the sandbox exited ({self.proc.returncode}): "
                                     f"{self.buffer!r} {self.proc.stderr.read()!r}")
            self.buffer += chunk
        text, _, self.buffer = self.buffer.partition(b"end\n")
        return parse_checks(text.decode() + "end\n")

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the loop reads end of file and the shell exits
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.selector.close()


def test_bwrap_kvpfs_started_first(bwrap: None, setup: Setup):
    setup.kvpfs.start()
    marker = host_sets_marker(setup.kvpfs)
    status = f"Ready {uuid.uuid4().hex}"
    steps = run_bwrap_once(setup, documented_bwrap_options(setup.share), status)
    expect_documented(steps, setup, status, marker, root=True)


def test_bwrap_sandbox_started_first_then_kvpfs_restarts(bwrap: None, setup: Setup):
    sandbox = WaitingSandbox(setup, documented_bwrap_options(setup.share))
    try:
        for round_ in ("first start", "after a restart"):
            setup.kvpfs.start()
            marker = host_sets_marker(setup.kvpfs)
            status = f"Ready {round_}"
            expect_documented(sandbox.checks(status), setup, status, marker, root=True)
            assert setup.kvpfs.stop() == 0
        assert sandbox.finish() == 0
    finally:
        sandbox.kill()


def test_bwrap_recursive_ro_bind_is_the_trap(bwrap: None, setup: Setup):
    """`--ro-bind` of the parent: guest/ is read-only if kvpfs was there first, writable if
    it came later. The page's options exist to avoid exactly this."""
    trap = ["--ro-bind", str(setup.share), CONTAINER_SHARE]
    sandbox = WaitingSandbox(setup, trap)
    try:
        setup.kvpfs.start()
        host_sets_marker(setup.kvpfs)
        late = run_bwrap_once(setup, trap, "from a sandbox started after kvpfs")
        assert late["guest"].rc != 0 and "Read-only file system" in late["guest"].output
        early = sandbox.checks("from a sandbox started before kvpfs")
        assert early["guest"] == Step(0, "")
        wait_for(lambda: host_items(setup.kvpfs, "guest").get("ContainerStatus")
                 == "from a sandbox started before kvpfs", timeout=10, what="the early write")
        assert sandbox.finish() == 0
    finally:
        sandbox.kill()


def test_bwrap_bind_of_the_mount_point_keeps_a_dead_mount(bwrap: None, setup: Setup):
    """A bind of the mount point itself, made while kvpfs runs, copies that one mount: after
    a kvpfs restart the sandbox still has the dead copy. The page's layout binds the parent."""
    setup.kvpfs.start()
    host_sets_marker(setup.kvpfs)
    sandbox = WaitingSandbox(setup, ["--bind", str(setup.kvpfs.mnt), CONTAINER_MOUNT])
    try:
        assert sandbox.checks("before the restart")["guest"] == Step(0, "")
        assert setup.kvpfs.stop() == 0
        setup.kvpfs.start()
        stale = sandbox.checks("after the restart")
        assert stale["vmid"].rc != 0, stale["vmid"]
        assert "not connected" in stale["vmid"].output, stale["vmid"]
        assert sandbox.finish() == 0
    finally:
        sandbox.kill()


# ---------------------------------------------------------------- runc, as Docker runs it


@pytest.fixture
def runc() -> None:
    runtime_missing("runc")


@pytest.mark.parametrize(("options", "guest_writable"), [
    (["rbind", "ro", "rslave"], True),  # a read-only bind: the bind itself only
    (["rbind", "ro", "rro", "rslave"], False),  # recursive read-only, what Docker 25+ adds
])
def test_runc_read_only_bind_recursive_or_not(runc: None, setup: Setup, tmp_path: Path,
                                              options: list[str], guest_writable: bool):
    """Docker cannot run here, but its runtime can: runc given the parent directory,
    read-only, with and without `rro` (the option by which Docker 25 makes a read-only bind
    recursive, unless `bind-recursive=writable`). kvpfs is up before the container."""
    setup.kvpfs.start()
    marker = host_sets_marker(setup.kvpfs)
    status = f"Ready {'/'.join(options)}"
    mount = {"destination": CONTAINER_SHARE, "type": "bind", "source": str(setup.share),
             "options": options}
    bundle = runc_bundle(tmp_path / "bundle", setup.rootfs, mount,
                         "/bin/sh", "-c", CHECKS_ONCE, "sh", status)
    state = tmp_path / "runc-state"
    name = unique_name("runc")
    try:
        done = subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle),
                               name], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, check=False)
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", name],
                       capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    steps = parse_checks(done.stdout)
    if guest_writable:
        expect_documented(steps, setup, status, marker, root=True)
    else:
        assert steps["guest"].rc != 0 and "Read-only file system" in steps["guest"].output
        assert "ContainerStatus" not in host_items(setup.kvpfs, "guest")


# ---------------------------------------------------------------- what cannot run here


def load_yaml(path: Path) -> list:
    yaml = pytest.importorskip("yaml")
    return list(yaml.safe_load_all(path.read_text()))


def default_file_examples() -> dict[str, str]:
    examples = {}
    for line in DEFAULTS.read_text().splitlines():
        match = re.fullmatch(r"#(KVPFS_[A-Z_]+)=(.*)", line)
        if match:
            examples[match.group(1)] = match.group(2)
    return examples


def test_host_settings_match_the_layout():
    """The page's /etc/default/kvpfs lines are contrib/kvpfs.default's, and put the mount
    one level below the directory every container gets."""
    examples = default_file_examples()
    text = DOC.read_text()
    for name, value in examples.items():
        assert f"{name}={value}" in text
    assert examples["KVPFS_MOUNTPOINT"] == CONTAINER_MOUNT
    assert os.path.dirname(examples["KVPFS_MOUNTPOINT"]) == CONTAINER_SHARE


def test_tmpfiles_entry_makes_the_directory_before_anything_starts(tmp_path: Path):
    """contrib/containers/kvp-share.conf, applied by the real systemd-tmpfiles to a scratch
    root, makes the directory containers get and the mount point in it."""
    if shutil.which("systemd-tmpfiles") is None:
        skip_unless_ci("systemd-tmpfiles is not installed (Debian package systemd)")
    done = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    for path in (CONTAINER_SHARE, CONTAINER_MOUNT):
        made = (tmp_path / path.lstrip("/")).stat()
        assert stat.S_ISDIR(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o755, path
        assert (made.st_uid, made.st_gid) == (0, 0)
    assert "contrib/containers/kvp-share.conf" in DOC.read_text()


def test_documented_docker_command():
    (command,) = [c for c in documented_commands("docker") if c[1] == "run"]
    mounts = [dict(field.partition("=")[::2] for field in value.split(","))
              for value in option_values(command, "--mount")]
    (mount,) = [m for m in mounts if m.get("dst") == CONTAINER_SHARE]
    assert mount == {"type": "bind", "src": CONTAINER_SHARE, "dst": CONTAINER_SHARE,
                     "readonly": "", "bind-propagation": "rslave",
                     "bind-recursive": "writable"}
    assert not option_values(command, "-v", "--volume")  # -v cannot say bind-recursive
    script = command[-1]
    assert f"{CONTAINER_MOUNT}/guest/" in script and f"{CONTAINER_MOUNT}/auto_external/" in script


def test_compose_file_avoids_both_traps():
    (doc,) = load_yaml(COMPOSE)
    (service,) = doc["services"].values()
    (volume,) = service["volumes"]
    assert volume == {"type": "bind", "source": CONTAINER_SHARE, "target": CONTAINER_SHARE,
                      "read_only": True,
                      "bind": {"propagation": "rslave", "recursive": "writable"}}
    script = service["command"][-1]
    assert f"{CONTAINER_MOUNT}/guest/" in script
    # The page shows the same volume.
    assert "recursive: writable" in DOC.read_text()


def test_kubernetes_daemonset_avoids_both_traps():
    (doc,) = load_yaml(DAEMONSET)
    spec = doc["spec"]["template"]["spec"]
    (volume,) = spec["volumes"]
    assert volume["hostPath"] == {"path": CONTAINER_SHARE, "type": "Directory"}
    (container,) = spec["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == CONTAINER_SHARE
    assert mount["readOnly"] is True and mount["mountPropagation"] == "HostToContainer"
    # IfPossible/Enabled would be refused with HostToContainer; Disabled is the default.
    assert mount.get("recursiveReadOnly", "Disabled") == "Disabled"
    assert spec["securityContext"]["supplementalGroups"]
    assert f"{CONTAINER_MOUNT}/guest/" in container["command"][-1]
