"""Every `kvpfs` subcommand and option, in one argparse tree.

One source for `--help`, for the commands that run them and for the kvpfs(8) page
(`kvpfs.cli.manpage` walks this tree), so none of them can drift from the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from kvpfs import __version__
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.wire.pools import SYSTEM_POOL_DIR, pool_number

# argparse's type for `add_subparsers()`; subscriptable only for type checkers.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

TOOL_COMMANDS = ("get", "set", "rm", "ls", "status", "dump")



def parse_pool(text: str) -> int:
    """A pool by number (0-4) or by its directory name."""
    try:
        return pool_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpfs", description="Hyper-V KVP pools as a filesystem (replaces hv_kvp_daemon)."
    )
    parser.add_argument("--version", action="version", version=f"kvpfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="serve the KVP device and mount the pools (foreground)")
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument("--device", default="/dev/vmbus/hv_kvp",
                       help="KVP device (default /dev/vmbus/hv_kvp)")
    mount.add_argument("--pool-dir", type=Path,
                       help="pool files directory (default /var/lib/hyperv; with --simulate"
                            " ~/.local/state/kvpfs/simulated-pools)")
    mount.add_argument("--simulate", action="store_true",
                       help="run against the built-in simulated Hyper-V host")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users in (the kernel enforces file modes)")
    mount.add_argument("--guest-group", help="group allowed to write guest/ (with --allow-other)")
    mount.add_argument("--external-readable", action="store_true",
                       help="make external/ (pool 0, may hold secrets) readable by everyone")
    mount.add_argument("--raw", action="store_true",
                       help="store written bytes exactly (keep a trailing newline)")
    mount.add_argument("--control", type=Path, help="control socket path")
    mount.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT,
                       help="seconds to wait for another program's pool lock (default 5)")
    mount.add_argument("--debug", action="store_true", help="log every host message")
    mount.add_argument("--debug-fuse", action="store_true", help="libfuse request tracing")
    mount.add_argument("-o", dest="options", action="append", default=[],
                       help="extra FUSE mount options (comma-separated)")

    host = sub.add_parser("host", help="act as the Hyper-V host of a simulated kvpfs")
    add_instance_options(host)
    # The same options after the subcommand (`kvpfs host set ... --mount M`), as the
    # scripting commands take theirs anywhere. SUPPRESS: a subcommand that was not given
    # them leaves what was given before it.
    anywhere = argparse.ArgumentParser(add_help=False)
    add_instance_options(anywhere, default=argparse.SUPPRESS)
    host_sub = host.add_subparsers(dest="host_command", required=True)
    h_set = host_sub.add_parser("set", parents=[anywhere],
                                help="AddKvpItems/ModifyKvpItems: set a key in a pool")
    h_set.add_argument("pool", type=parse_pool)
    h_set.add_argument("key")
    h_set.add_argument("value")
    h_del = host_sub.add_parser("delete", parents=[anywhere], help="RemoveKvpItems: delete a key")
    h_del.add_argument("pool", type=parse_pool)
    h_del.add_argument("key")
    h_get = host_sub.add_parser("get", parents=[anywhere],
                                help="what the host reads for one key (by enumeration)")
    h_get.add_argument("pool", type=parse_pool)
    h_get.add_argument("key")
    h_list = host_sub.add_parser("list", parents=[anywhere],
                                 help="enumerate a pool as the host does")
    h_list.add_argument("pool", type=parse_pool)
    h_list.add_argument("--json", action="store_true")
    _add_host_ip_parser(host_sub, anywhere)

    wait = sub.add_parser(
        "wait", help="wait until a key exists (or changes)",
        usage="kvpfs wait [options] (POOL KEY | PATH)",
        description="Wait until a key exists (or changes). Name it as POOL KEY, or as the"
                    " path of its file in a kvpfs mount (/run/kvp/external/Ready).")
    wait.add_argument("pool", metavar="POOL|PATH")
    wait.add_argument("key", nargs="?")
    wait.add_argument("--timeout", type=float, help="give up after SECONDS (exit 124)")
    wait.add_argument("--changed", action="store_true",
                      help="wait for a new value rather than for the key to exist")
    wait.add_argument("--mount", type=Path, help="kvpfs mount to watch (default: the one running)")
    wait.add_argument("--pool-dir", type=Path,
                      help="watch pool files in DIR instead of a mount (default without a"
                           " running kvpfs: /var/lib/hyperv)")
    wait.add_argument("-q", "--quiet", action="store_true", help="do not print the value")
    recover = sub.add_parser(
        "recover", help="abort and unmount what a dead or stuck kvpfs left on a mount point"
                        " (the service's ExecStopPost; never on a working kvpfs)")
    recover.add_argument("mountpoint", type=Path)
    _add_tool_parsers(sub)
    return parser


def add_instance_options(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """`--control`/`--mount`: which running kvpfs `kvpfs host` talks to."""
    parser.add_argument("--control", type=Path, help="control socket of the kvpfs to use",
                        **defaults)  # type: ignore[arg-type]
    parser.add_argument("--mount", type=Path, help="mount point of the kvpfs to use",
                        **defaults)  # type: ignore[arg-type]


def _add_host_ip_parser(host_sub: Subcommands,
                        anywhere: argparse.ArgumentParser) -> None:
    """`kvpfs host ip get|set`: the host's GET_IP_INFO / SET_IP_INFO."""
    ip = host_sub.add_parser("ip", parents=[anywhere],
                             help="GET_IP_INFO / SET_IP_INFO: an adapter's network setup")
    ip_sub = ip.add_subparsers(dest="ip_command", required=True)
    get = ip_sub.add_parser("get", parents=[anywhere],
                            help="what the host shows for the adapter with this MAC")
    get.add_argument("mac", help="adapter MAC address, e.g. 00:15:5D:01:02:03")
    get.add_argument("--json", action="store_true")
    set_ = ip_sub.add_parser(
        "set", parents=[anywhere],
        help="inject a configuration into the adapter with this VMBus GUID",
        description="Each option may be repeated or hold a ;-separated list; the strings"
                    " reach the guest exactly as given (to try malformed input too).")
    set_.add_argument("guid", help="the adapter's VMBus instance id, e.g. {f8615163-...}")
    set_.add_argument("--ip", action="append", default=[], help="address(es)")
    set_.add_argument("--mask", action="append", default=[],
                      help="subnet mask per address: 255.255.255.0 for IPv4, 64 for IPv6")
    set_.add_argument("--gateway", action="append", default=[], help="default gateway(s)")
    set_.add_argument("--dns", action="append", default=[], help="DNS server(s)")
    set_.add_argument("--dhcp", action="store_true", help="enable DHCP (IPv4)")


def _add_tool_parsers(sub: Subcommands) -> None:
    """`get/set/rm/ls/status/dump` on the pool files directly (cli/keys.py, status.py, dump.py)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pool-dir", type=Path, default=SYSTEM_POOL_DIR,
                        help="pool files directory (default /var/lib/hyperv)")
    common.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT,
                        metavar="SECONDS",
                        help="how long to wait for another program's pool lock (default 5)")
    get = sub.add_parser("get", parents=[common],
                         help="print a key's value from the pool files (exit 1 if missing)")
    get.add_argument("pool", type=parse_pool)
    get.add_argument("key")
    get.add_argument("--raw", action="store_true", help="print the exact bytes, no newline")
    set_ = sub.add_parser("set", parents=[common], help="set a guest key in the pool file")
    set_.add_argument("pool", type=parse_pool)
    set_.add_argument("key")
    set_.add_argument("value", help="the value, or - to read it from stdin")
    set_.add_argument("--raw", action="store_true",
                      help="keep a trailing newline read from stdin")
    rm = sub.add_parser("rm", parents=[common], help="delete every record of a guest key")
    rm.add_argument("pool", type=parse_pool)
    rm.add_argument("key")
    rm.add_argument("--missing-ok", action="store_true", help="exit 0 if the key is missing")
    for writer in (set_, rm):
        writer.add_argument("--force-pool", action="store_true",
                            help="write a host pool (0, 3, 4) although the host never reads it")
    ls = sub.add_parser("ls", parents=[common], help="list a pool's keys and values")
    ls.add_argument("pool", type=parse_pool)
    form = ls.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="a JSON object (or list)")
    form.add_argument("--export", action="store_true",
                      help="export KVP_NAME='value' lines for eval")
    ls.add_argument("--all-records", action="store_true",
                    help="every record in file order: duplicates and invalid records too")
    ls.add_argument("--prefix", default="KVP_", help="variable prefix for --export (KVP_)")
    status = sub.add_parser("status", parents=[common],
                            help="pool files, staleness and running daemons at a glance")
    status.add_argument("--json", action="store_true")
    dump = sub.add_parser("dump", parents=[common],
                          help="support bundle: JSON on stdout, or a directory / .tar[.gz]")
    dump.add_argument("--output", "-o", type=Path,
                      help="write DIR, or an archive if it ends in .tar, .tar.gz, .tgz, .tar.xz")
    dump.add_argument("--redact", action="store_true",
                      help="leave every value and the raw pool files out")
