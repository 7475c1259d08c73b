"""The `kvpfs` command line.

`kvpfs mount` runs the daemon in the foreground; `kvpfs host ...` plays the
host's administrator against a running simulated instance. Exit codes:
0 success, 1 the host answered with a failure status (or the key is missing),
2 usage or validation error, 3 kvpfs not reachable or failed to start,
4 I/O error on a pool file (lock timeout, unreadable file).
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from kvpfs import __version__, control
from kvpfs.cli import mounthelper
from kvpfs.cli.results import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from kvpfs.storage.locks import DEFAULT_LOCK_TIMEOUT
from kvpfs.wire.pools import pool_number

log = logging.getLogger("kvpfs")


def parse_pool(text: str) -> int:
    """A pool by number (0-4) or by its directory name."""
    try:
        return pool_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="kvpfs: %(levelname)s: %(message)s" if not debug
        else "kvpfs: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    _add_instance_options(host)
    # The same options after the subcommand (`kvpfs host set ... --mount M`), as the
    # scripting commands take theirs anywhere. SUPPRESS: a subcommand that was not given
    # them leaves what was given before it.
    anywhere = argparse.ArgumentParser(add_help=False)
    _add_instance_options(anywhere, default=argparse.SUPPRESS)
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


def _add_instance_options(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """`--control`/`--mount`: which running kvpfs `kvpfs host` talks to."""
    parser.add_argument("--control", type=Path, help="control socket of the kvpfs to use",
                        **defaults)  # type: ignore[arg-type]
    parser.add_argument("--mount", type=Path, help="mount point of the kvpfs to use",
                        **defaults)  # type: ignore[arg-type]




def _run_wait(args: argparse.Namespace) -> int:
    from kvpfs.cli import wait

    if args.key is None:  # a path to a key's file in a kvpfs mount
        if args.pool_dir is not None or args.mount is not None:
            print("kvpfs wait: PATH names its mount; --mount and --pool-dir go with POOL KEY",
                  file=sys.stderr)
            return EXIT_USAGE
        try:
            args.mount, args.pool, key = wait.resolve_path(Path(args.pool))
        except wait.NotAKvpfsPath as exc:
            print(f"kvpfs wait: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        try:
            args.pool = parse_pool(args.pool)
        except argparse.ArgumentTypeError as exc:
            print(f"kvpfs wait: {exc}", file=sys.stderr)
            return EXIT_USAGE
        key = os.fsencode(args.key)  # the bytes given on the command line
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        print("kvpfs wait: the key is not valid UTF-8, so no KVP key can match it",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        mounts = [args.mount] if args.mount else control.kvpfs_mounts()
        if args.pool_dir is None and len(mounts) > 1:
            print("kvpfs wait: several kvpfs mounts are running; choose one with --mount",
                  file=sys.stderr)
            return EXIT_USAGE
        if args.pool_dir is None and mounts:
            value = wait.wait_on_mount(mounts[0], args.pool, key, timeout=args.timeout,
                                       changed=args.changed)
        else:
            value = wait.wait_on_files(args.pool_dir or Path("/var/lib/hyperv"), args.pool, key,
                                       timeout=args.timeout, changed=args.changed)
    except OSError as exc:
        print(f"kvpfs wait: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    if value is None:
        print(f"kvpfs wait: timed out after {args.timeout:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if not args.quiet:
        sys.stdout.buffer.write(value + b"\n")
    return EXIT_OK


def _mountpoint_usable(mountpoint: Path) -> bool:
    """A directory, or a kvpfs mount left behind (`kvpfs mount` clears it).

    A dead or wedged mount must not be looked at (ENOTCONN, or a hang), so mountinfo
    is asked first.
    """
    if control.canonical_mountpoint(mountpoint) in control.kvpfs_mounts():
        return True
    return mountpoint.is_dir()


def _run_mount(args: argparse.Namespace, on_ready: Callable[[], None] | None = None) -> int:
    """Serve in the foreground; `on_ready` (the mount helper's) replaces the greeting."""
    from kvpfs.mount import MountConfig, StartupError, run

    setup_logging(args.debug)
    guest_gid = None
    if args.guest_group:
        try:
            guest_gid = grp.getgrnam(args.guest_group).gr_gid
        except KeyError:
            if not args.guest_group.isdigit():
                log.error("unknown group %r for --guest-group", args.guest_group)
                return EXIT_USAGE
            guest_gid = int(args.guest_group)
    if not _mountpoint_usable(args.mountpoint):
        log.error("mount point %s is not a directory (create it first)", args.mountpoint)
        return EXIT_USAGE
    extra = [opt for group in args.options for opt in group.split(",") if opt]

    def announce() -> None:
        if not sys.stdout.isatty():
            return  # a service: the log line "ready" says it all, keep the journal clean
        mnt = args.mountpoint
        print(f"kvpfs is serving {'the simulated host' if args.simulate else args.device}"
              f" on {mnt}. Try:", flush=True)
        print(f"  ls {mnt}/auto_external; cat {mnt}/auto_external/VirtualMachineId", flush=True)
        print(f"  echo Ready > {mnt}/guest/Status", flush=True)
        if args.simulate:
            # Copy-pasteable from another shell, where the venv may not be on PATH.
            beside = os.path.join(os.path.dirname(sys.executable), "kvpfs")
            kvpfs = ("kvpfs" if shutil.which("kvpfs") else shlex.quote(beside)
                     if os.access(beside, os.X_OK) else f"{shlex.quote(sys.executable)} -m kvpfs")
            host = f"{kvpfs} host"
            if len(control.kvpfs_mounts()) > 1:  # without a choice the command would refuse
                host += f" --mount {shlex.quote(str(control.canonical_mountpoint(mnt)))}"
            print(f"  {host} list guest      # what the host sees", flush=True)
            print(f"  {host} set external greeting hello; cat "
                  f"{mnt}/external/greeting", flush=True)
        print("Stop with Ctrl-C (or umount).", flush=True)

    config = MountConfig(
        mountpoint=args.mountpoint, device=args.device, pool_dir=args.pool_dir,
        simulate=args.simulate, allow_other=args.allow_other, raw=args.raw,
        debug_fuse=args.debug_fuse, control_path=args.control, guest_gid=guest_gid,
        external_readable=args.external_readable, lock_timeout=args.lock_timeout,
        extra_fuse_options=extra, on_ready=on_ready or announce,
    )
    try:
        run(config)
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _run_host(args: argparse.Namespace) -> int:
    if args.host_command == "ip":
        return _run_host_ip(args)
    try:
        path = control.find_control(args.control, args.mount)
        command = args.host_command
        request = {"op": command, "pool": args.pool}
        if command in ("set", "delete", "get"):
            request["key"] = args.key
        if command == "set":
            request["value"] = args.value
        answer = control.call(path, request)
    except control.ControlError as exc:
        print(f"kvpfs host: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if command == "list":
        items = answer["items"]
        if args.json:
            # Always a list: pools may hold one key several times, in this order.
            print(json.dumps([{"key": k, "value": v} for k, v in items], ensure_ascii=False,
                             indent=1))
        else:
            for key, value in items:
                print(f"{key}\t{value}")
        return EXIT_OK
    if answer["status"] != 0:
        print(f"kvpfs host {command}: {answer['status_name']}"
              f" (0x{answer['status']:08X})", file=sys.stderr)
        return EXIT_NOT_FOUND
    if command == "get":
        print(answer["value"])
    return EXIT_OK


IP_FIELDS = ("adapter_id", "addr_family", "dhcp_enabled", "ip_addr", "sub_net", "gate_way",
             "dns_addr")


def _add_host_ip_parser(host_sub: argparse._SubParsersAction,
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


def _run_host_ip(args: argparse.Namespace) -> int:
    if args.ip_command == "get":
        request: dict = {"op": "ip_get", "mac": args.mac}
    else:
        request = {"op": "ip_set", "guid": args.guid, "ip_addr": ";".join(args.ip),
                   "sub_net": ";".join(args.mask), "gate_way": ";".join(args.gateway),
                   "dns_addr": ";".join(args.dns), "dhcp": args.dhcp}
    try:
        answer = control.call(control.find_control(args.control, args.mount), request)
    except control.ControlError as exc:
        print(f"kvpfs host: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if answer["status"] != 0:
        print(f"kvpfs host ip {args.ip_command}: {answer['status_name']}"
              f" (0x{answer['status']:08X})", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.ip_command == "get":
        fields = {name: answer[name] for name in IP_FIELDS}
        if args.json:
            print(json.dumps(fields, indent=1))
        else:
            for name, value in fields.items():
                print(f"{name}\t{value}")
    return EXIT_OK


TOOL_COMMANDS = ("get", "set", "rm", "ls", "status", "dump")


def _add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    """`get/set/rm/ls/status/dump` on the pool files directly (cli/keys.py, status.py, dump.py)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pool-dir", type=Path, default=Path("/var/lib/hyperv"),
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


def _run_tool(args: argparse.Namespace) -> int:
    from kvpfs.cli import dump, keys, results, status

    prog = f"kvpfs {args.command}"
    common = {"lock_timeout": args.lock_timeout}
    if args.command == "get":
        return results.run(prog, keys.cmd_get, args.pool_dir, args.pool, args.key, raw=args.raw,
                           **common)
    if args.command == "set":
        return results.run(prog, keys.cmd_set, args.pool_dir, args.pool, args.key, args.value,
                           raw=args.raw, force_pool=args.force_pool, **common)
    if args.command == "rm":
        return results.run(prog, keys.cmd_rm, args.pool_dir, args.pool, args.key,
                           force_pool=args.force_pool, missing_ok=args.missing_ok, **common)
    if args.command == "ls":
        fmt = "json" if args.json else "export" if args.export else "text"
        return results.run(prog, keys.cmd_ls, args.pool_dir, args.pool, fmt=fmt,
                           all_records=args.all_records, prefix=args.prefix, **common)
    if args.command == "status":
        return results.run(prog, status.cmd_status, args.pool_dir, as_json=args.json, **common)
    return results.run(prog, dump.cmd_dump, args.pool_dir, output=args.output,
                           redact=args.redact, **common)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if mounthelper.is_helper_call(argv):  # mount.fuse3 runs `kvpfs SRC MNT -o OPTS`
        return mounthelper.main(argv, prog="kvpfs")
    args = build_parser().parse_args(argv)
    if args.command == "mount":
        return _run_mount(args)
    if args.command == "host":
        return _run_host(args)
    if args.command in TOOL_COMMANDS:
        return _run_tool(args)
    if args.command == "wait":
        return _run_wait(args)
    if args.command == "recover":
        from kvpfs.recovery import recover

        done = recover(args.mountpoint)
        for line in done or [f"{args.mountpoint}: no kvpfs mount, nothing to recover"]:
            print(line, flush=True)
        return 1 if any("could not" in line for line in done) else 0
    return EXIT_USAGE


def mount_helper_main(argv: list[str] | None = None) -> int:
    """`mount.kvpfs SRC MNT -o OPTS`, what `mount -t kvpfs` runs (see kvpfs/cli/mounthelper.py)."""
    return mounthelper.main(sys.argv[1:] if argv is None else argv)
