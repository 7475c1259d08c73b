"""`kvpfs mount`: from the command line's options to a running, mounted kvpfs."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from kvpfs import mountinfo
from kvpfs.cli.results import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

log = logging.getLogger("kvpfs")


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="kvpfs: %(levelname)s: %(message)s" if not debug
        else "kvpfs: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _mountpoint_usable(mountpoint: Path) -> bool:
    """A directory, or a kvpfs mount left behind (`kvpfs mount` clears it).

    A dead or wedged mount must not be looked at (ENOTCONN, or a hang), so mountinfo
    is asked first.
    """
    if mountinfo.canonical_mountpoint(mountpoint) in mountinfo.kvpfs_mounts():
        return True
    return mountpoint.is_dir()


def run_mount(args: argparse.Namespace, on_ready: Callable[[], None] | None = None) -> int:
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
            if len(mountinfo.kvpfs_mounts()) > 1:  # without a choice the command would refuse
                host += f" --mount {shlex.quote(str(mountinfo.canonical_mountpoint(mnt)))}"
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
