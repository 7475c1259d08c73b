"""Real container runtimes for the tests: rootful Podman and bubblewrap on a busybox rootfs.

No image can be pulled here, so every container runs on a root filesystem made from
Debian's busybox-static. Podman keeps all its state (storage, run state, events, lock
files) below the test's own directory, so tests never see each other's containers.

The host side of docs/containers.md is a directory on a shared mount that holds the
kvpfs mount point; `shared_directory` makes a temporary one (`mount --bind X X`,
`mount --make-shared X`), as /run is on a systemd host, without touching `/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import wait_for

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: no libraries needed in the rootfs
# Where the containers see the host's shared directory, and the mount inside it: the
# paths of docs/containers.md, contrib/containers/compose.yaml and the Kubernetes example.
CONTAINER_SHARE = "/run/kvp-share"
CONTAINER_MOUNT = f"{CONTAINER_SHARE}/kvp"

# What a container does with the mount, in busybox sh. One line per step:
# "STEP RC OUTPUT" (OUTPUT is what the command printed, its error message included).
CHECKS = r"""
k=/run/kvp-share/kvp
try() { step=$1; shift; out=$("$@" 2>&1); rc=$?; echo "$step $rc $out"; }
checks() {
    try vmid cat "$k/auto_external/VirtualMachineId"
    try marker cat "$k/auto_external/Marker"
    try secret cat "$k/external/Marker"
    try guest sh -c 'echo "$1" > "$2"' sh "$1" "$k/guest/ContainerStatus"
    try readback cat "$k/guest/ContainerStatus"
    try external sh -c 'echo intruder > "$1"' sh "$k/external/Intruder"
    try auto_external sh -c 'echo intruder > "$1"' sh "$k/auto_external/Marker"
    try parent touch /run/kvp-share/intruder
    echo end
}
"""
# Run the checks once, with the status to write as $1.
CHECKS_ONCE = CHECKS + 'checks "$1"\n'
# Run the checks once per line read from stdin (the status to write): a container
# started before kvpfs waits, doing nothing, until the test tells it to look.
CHECKS_PER_LINE = CHECKS + 'while read -r status; do checks "$status"; done\n'


@dataclass(frozen=True)
class Step:
    rc: int
    output: str


def parse_checks(stdout: str) -> dict[str, Step]:
    """The steps of one run of CHECKS, by name; AssertionError if the run did not finish."""
    steps: dict[str, Step] = {}
    for line in stdout.splitlines():
        if line == "end":
            return steps
        name, rc, output = [*line.split(" ", 2), ""][:3]
        steps[name] = Step(int(rc), output)
    raise AssertionError(f"the container's checks did not finish:\n{stdout}")


def busybox_rootfs(path: Path) -> Path:
    """A root filesystem holding only busybox and its applets, and the documented mount point."""
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing (Debian package busybox-static)")
    bindir = path / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (bindir / applet).symlink_to("busybox")
    for directory in ("proc", "sys", "dev", "tmp", "etc", CONTAINER_MOUNT.lstrip("/")):
        (path / directory).mkdir(parents=True, exist_ok=True)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return path


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target == prefix or target.startswith(prefix + "/"):
            found.append(target)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_below(path: Path) -> None:
    """Detach whatever is still mounted at or below `path` (cleanup after a failure)."""
    for target in mounts_below(path):
        subprocess.run(["umount", "--lazy", target], capture_output=True, check=False)


@contextlib.contextmanager
def shared_directory(path: Path) -> Iterator[Path]:
    """`path` as a mount of its own in a shared peer group: what /run is on a systemd host.
    A mount made below it later propagates to every slave copy of it (a container's)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield path
    finally:
        unmount_below(path)


def processes_naming(path: Path) -> list[int]:
    """Processes with `path` among their arguments."""
    needle = os.fsencode(path)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if needle in arguments:
                found.append(int(entry.name))
    return found


def unique_name(what: str) -> str:
    return f"kvpfs-test-{what}-{uuid.uuid4().hex[:12]}"


class Podman:
    """Rootful `podman` whose storage, run state, events and temp files live in `base`.

    runc, not crun: crun refuses to start on a host whose cgroup v2 hierarchy still has a
    controller in hybrid mode ("cgroups in hybrid mode not supported"), as this one has.
    cgroupfs, not systemd: no systemd needs to be running. Explicit ulimits: podman 4.3
    asks for RLIMIT_NOFILE 1048576 and lowers its own RLIMIT_NPROC to 32768 first, and a
    root without CAP_SYS_RESOURCE (a sandbox) may not raise either limit back up.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        # podman refuses a run root longer than 50 characters: a short directory of its own.
        self.runroot = Path(tempfile.mkdtemp(prefix="kvpfs-podman-", dir="/tmp"))
        self.global_args = [
            "--root", str(base / "storage"), "--runroot", str(self.runroot),
            "--tmpdir", str(base / "tmp"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc",
        ]
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 1048576 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
        nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
        self.run_args = ["--network", "none", "--ulimit", f"nofile={nofile}:{nofile}",
                         "--ulimit", f"nproc={nproc}:{nproc}"]
        self.names: list[str] = []

    def __call__(self, *args: str, stdin: str | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *self.global_args, *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def run(self, name: str, rootfs: Path, options: Sequence[str], *command: str,
            detach: bool = False) -> subprocess.CompletedProcess[str]:
        """`podman run` of `command` on `rootfs`; a detached one is removed by `remove_all`."""
        self.names.append(name)
        mode = ["-d"] if detach else ["--rm"]
        return self("run", *mode, "--name", name, *self.run_args, *options,
                    "--rootfs", str(rootfs), *command)

    def exec(self, name: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self("exec", name, *command)

    def remove_all(self) -> None:
        """Remove every container this object started, running or not, and anything it
        left mounted in its directories."""
        for name in self.names:
            self("rm", "--force", "--time", "0", "--ignore", name)
        # conmon runs `podman container cleanup` once a container ends, on its own time:
        # wait for every process that names this run root, or it recreates what we remove.
        wait_for(lambda: not processes_naming(self.runroot), timeout=60,
                 what=f"conmon and podman's cleanup of {self.runroot} to finish")
        unmount_below(self.base)
        unmount_below(self.runroot)
        shutil.rmtree(self.runroot, ignore_errors=True)


def runc_bundle(bundle: Path, rootfs: Path, mount: dict[str, object], *args: str) -> Path:
    """An OCI bundle for `runc run`: runc's default spec (`runc spec`) with `rootfs` read-only
    as /, `args` as the process, no terminal, and `mount` added: what a container engine
    hands its runtime."""
    bundle.mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = list(args)
    config["mounts"].append(mount)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def bwrap_sandbox(rootfs: Path, options: Sequence[str], *command: str) -> list[str]:
    """A bubblewrap command line: `rootfs` read-only as /, fresh /proc, /dev and /tmp, no
    network, and `options` (the kvpfs binds) after them."""
    return ["bwrap", "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--die-with-parent", *options, *command]


def tool_missing(*tools: str) -> str | None:
    """Why the container tests cannot run here, or None."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./dev.sh setup installs it)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (Debian package busybox-static)"
    if os.geteuid() != 0:
        return "the container tests run rootful containers (run as root)"
    return None
