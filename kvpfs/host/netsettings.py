"""Where the system's network lives for kvpfs, and what kvpfs may change there.

Every path the network code reads or writes is relative to a configurable root
(`NetSettings`) so tests can use fake sysfs trees, fake /run state and a scratch /etc;
`--simulate` writes to a sandbox and runs nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvpfs.host.netfiles import TRUE_WORDS

__all__ = ["ENV_COMMANDS", "ENV_OUTPUT", "ENV_ROOT", "ENV_SYSFS", "NetSettings"]

ENV_SYSFS = "KVPFS_SYSFS_ROOT"
ENV_ROOT = "KVPFS_NET_ROOT"
ENV_OUTPUT = "KVPFS_NET_OUTPUT"
ENV_COMMANDS = "KVPFS_NET_COMMANDS"


@dataclass(frozen=True)
class NetSettings:
    """Where the system is: sysfs, the root for /etc and /run, and what may be changed.

    `root` is read (state files, resolv.conf, existing configuration, hv_set_ifconfig);
    `output` (default: `root`) is where configuration files are written.  Services are
    queried (busctl, nmcli) only when `root` is the real `/`: a fake root describes a
    system those programs know nothing about.  `run_commands` off means configuration is
    written but nmcli/networkctl/hv_set_ifconfig are only logged.
    """

    sysfs: Path = Path("/sys")
    root: Path = Path("/")
    output: Path | None = None
    run_commands: bool = True
    command_timeout: float = 10.0
    activation_wait: int = 15

    @classmethod
    def from_env(cls, *, simulate: bool = False, sandbox: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> NetSettings:
        """Defaults for a real guest; with `simulate`, never touch the machine's network.

        Under --simulate configuration goes to `sandbox` and no program is run unless the
        environment says otherwise (KVPFS_NET_OUTPUT, KVPFS_NET_COMMANDS=1): a developer's
        demo must not rewrite the developer's network.  KVPFS_SYSFS_ROOT and
        KVPFS_NET_ROOT point tests at fake trees.
        """
        env = os.environ if environ is None else environ
        root = Path(env.get(ENV_ROOT) or "/")
        output = env.get(ENV_OUTPUT)
        if output:
            out: Path | None = Path(output)
        elif simulate:
            out = sandbox if sandbox is not None else Path(tempfile.gettempdir()) / "kvpfs-net"
        else:
            out = None
        commands = env.get(ENV_COMMANDS)
        run = (commands in TRUE_WORDS) if commands else not simulate
        return cls(sysfs=Path(env.get(ENV_SYSFS) or "/sys"), root=root, output=out,
                   run_commands=run)

    @property
    def live(self) -> bool:
        """Whether `root` is this machine's own `/` (so its services may be asked)."""
        return self.root == Path("/")

    def at(self, path: str) -> Path:
        """`path` (absolute) as seen under `root`."""
        return self.root / path.lstrip("/")

    def out(self, path: str) -> Path:
        """`path` (absolute) where configuration is written."""
        return (self.output or self.root) / path.lstrip("/")
