"""kvpfs as a mount helper: `kvpfs SRC MNT -o OPTS` and `mount.kvpfs SRC MNT -o OPTS`.

`mount -t fuse.kvpfs SRC MNT -o OPTS` (or the fstab line
`SRC MNT fuse.kvpfs OPTS 0 0`) makes mount(8) run mount.fuse3, which runs
`kvpfs SRC MNT -o OPTS` through /bin/sh, `kvpfs` being looked up in mount(8)'s
own PATH (`/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
whatever the caller's). `mount -t kvpfs` runs `/sbin/mount.kvpfs` the same way.

The `-o` options are translated into `kvpfs mount` arguments and parsed by
the very parser `kvpfs mount` uses, so both accept exactly the same things.
Generic fstab options that mean nothing to a FUSE filesystem are dropped;
anything else unknown is an error (a misspelt `alow_other` must not mount
silently without it).
"""

from __future__ import annotations

import argparse
import os
import sys

from kvpfs.cli.results import EXIT_USAGE

# SRC is free-form in the FUSE convention; these are the ones we accept besides a device path.
SOURCE_NAMES = ("kvpfs", "none")

# kvpfs options with a value: `-o pool_dir=/x` becomes `--pool-dir /x`.
VALUE_OPTIONS = {
    "pool_dir": "--pool-dir",
    "device": "--device",
    "guest_group": "--guest-group",
    "control": "--control",
    "lock_timeout": "--lock-timeout",
}
# kvpfs flags: `-o simulate` becomes `--simulate`.
FLAG_OPTIONS = {
    "simulate": "--simulate",
    "allow_other": "--allow-other",
    "external_readable": "--external-readable",
    "raw": "--raw",
    "debug": "--debug",
    "debug_fuse": "--debug-fuse",
}
# Handed to the kernel/libfuse unchanged (kvpfs always mounts nosuid,nodev,noatime).
FUSE_OPTIONS = ("ro", "noatime", "sync", "async", "dirsync", "allow_root", "auto_unmount")
# Generic mount(8)/fstab options: meaningless here, or always in force for FUSE
# (mount.fuse3 itself appends `dev,suid` unless told `nodev,nosuid`).
IGNORED_OPTIONS = ("defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
                   "_netdev", "nofail", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec")
IGNORED_PREFIXES = ("x-", "comment=")


class HelperUsageError(Exception):
    """The mount helper's arguments cannot be honoured; the message says which and why."""


def is_helper_call(argv: list[str]) -> bool:
    """Whether `kvpfs ARGV` is mount.fuse3's `kvpfs SRC MNT -o OPTS` rather than a subcommand."""
    return bool(argv) and (argv[0] in SOURCE_NAMES or argv[0].startswith("/"))


def build_helper_parser(prog: str = "mount.kvpfs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [kvpfs|none|DEVICE] MOUNTPOINT [-o OPTIONS] [-f]",
        description="Mount kvpfs the fstab way: returns once the mount is live, then serves it"
                    " from the background. Options: simulate, pool_dir=DIR, device=PATH,"
                    " allow_other, guest_group=GROUP, external_readable, raw, control=PATH,"
                    " lock_timeout=S, debug, debug_fuse, and the FUSE options "
                    + ", ".join(FUSE_OPTIONS) + ".",
    )
    parser.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        help="comma-separated mount options")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (for systemd units)")
    # What mount(8) may hand a /sbin/mount.TYPE helper: accepted and ignored.
    parser.add_argument("-n", "-s", "-v", dest="ignored", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("-t", dest="type", help=argparse.SUPPRESS)
    return parser


def translate(source: str | None, mountpoint: str, options: list[str]) -> list[str]:
    """`SRC MNT -o OPTS` as the argument list of `kvpfs mount` (paths made absolute)."""
    argv = ["mount", os.path.abspath(mountpoint)]
    device_from_source = None
    if source is not None and source not in SOURCE_NAMES:
        if not source.startswith("/"):
            raise HelperUsageError(
                f"unknown source {source!r}: use `kvpfs`, `none` or the KVP device's path")
        device_from_source = source
    fuse: list[str] = []
    device_given = False
    for option in (opt for group in options for opt in group.split(",")):
        if not option or option in IGNORED_OPTIONS or option.startswith(IGNORED_PREFIXES):
            continue
        name, has_value, value = option.partition("=")
        key = name.replace("-", "_")
        if key in VALUE_OPTIONS:
            if not has_value or not value:
                raise HelperUsageError(f"mount option {name} needs a value ({name}=...)")
            if key in ("pool_dir", "device", "control"):
                value = os.path.abspath(value)
            device_given |= key == "device"
            argv += [VALUE_OPTIONS[key], value]
        elif key in FLAG_OPTIONS:
            if has_value:
                raise HelperUsageError(f"mount option {name} takes no value")
            argv.append(FLAG_OPTIONS[key])
        elif option in FUSE_OPTIONS:
            fuse.append(option)
        else:
            raise HelperUsageError(f"unknown mount option {option!r}")
    if device_from_source is not None and not device_given:
        argv += ["--device", device_from_source]
    if fuse:
        argv += ["-o", ",".join(fuse)]
    return argv


def main(argv: list[str], prog: str = "mount.kvpfs") -> int:
    """Mount as mount(8) expects: return once mounted (or in the foreground with -f)."""
    from kvpfs.cli.daemonize import run_in_background
    from kvpfs.cli.mountcmd import run_mount
    from kvpfs.cli.parser import build_parser

    args = build_helper_parser(prog).parse_intermixed_args(argv)
    if args.type is not None and args.type not in ("kvpfs", "fuse.kvpfs"):
        print(f"{prog}: this helper mounts kvpfs, not {args.type}", file=sys.stderr)
        return EXIT_USAGE
    if len(args.paths) > 2:
        print(f"{prog}: too many arguments: {' '.join(args.paths)}", file=sys.stderr)
        return EXIT_USAGE
    source, mountpoint = (None, *args.paths) if len(args.paths) == 1 else args.paths
    try:
        mount_argv = translate(source, mountpoint, args.options)
    except HelperUsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        mount_args = build_parser().parse_args(mount_argv)
    except SystemExit as exc:  # argparse already said why (e.g. lock_timeout=abc)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.foreground:
        return run_mount(mount_args, on_ready=lambda: None)
    return run_in_background(lambda ready: run_mount(mount_args, on_ready=ready))
