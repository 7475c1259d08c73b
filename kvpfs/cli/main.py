"""The `kvpfs` command: parse the command line and hand it to the command it names.

Exit statuses (one set for every command, `kvpfs.cli.results`): 0 success, 1 the host
answered with a failure status (or the key is missing), 2 usage or validation error, 3 kvpfs
not reachable or failed to start, 4 I/O error on a pool file, 124 `wait --timeout` ran out.
"""

from __future__ import annotations

import argparse
import sys

from kvpfs.cli import mounthelper
from kvpfs.cli.parser import TOOL_COMMANDS, build_parser
from kvpfs.cli.results import EXIT_USAGE


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
        from kvpfs.cli.mountcmd import run_mount

        return run_mount(args)
    if args.command == "host":
        from kvpfs.cli.hostcmd import run_host

        return run_host(args)
    if args.command in TOOL_COMMANDS:
        return _run_tool(args)
    if args.command == "wait":
        from kvpfs.cli.wait import run_wait

        return run_wait(args)
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
