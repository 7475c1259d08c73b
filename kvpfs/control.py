"""The control socket: how `kvpfs host ...` reaches a running kvpfs.

One JSON object per line each way over a Unix stream socket (mode 0600). The
running instance names its socket in the extended attribute
`user.kvpfs.control` of its mount root, so the command line finds it from
/proc/self/mountinfo without being told where it is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from kvpfs.mountinfo import canonical_mountpoint, kvpfs_mounts

log = logging.getLogger(__name__)

CONTROL_XATTR = "user.kvpfs.control"
MAX_REQUEST = 64 * 1024

JsonObject = dict[str, Any]  # one request or answer, one line of JSON
Handler = Callable[[JsonObject], Awaitable[JsonObject]]


class ControlError(Exception):
    """The control socket could not be reached or answered with an error."""


# Bytes kept as they are in a socket's name; every other byte but `/` is escaped %XX.
_NAME_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+,=@:")
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, with the NUL
_HASH_DIGITS = 16


def control_socket_name(mountpoint: Path, room: int = 255) -> str:
    """The socket's file name for a mount point: one name per mount point, and readable.

    `/` becomes `-`, and `-`, `%`, `~` and every byte outside a small safe set are
    escaped as `%XX`, so no two mount points share a name (the old `/`→`-` mapping gave
    `/a/x-y/mnt` and `/a/x/y-mnt` the same one); `/` itself is `-`. A name longer than
    `room` bytes keeps its start and ends in `~` and 16 hex digits of a hash of the
    path: `~` never appears in a name that was not shortened.
    """
    path = os.fsencode(canonical_mountpoint(mountpoint))
    body = "".join(
        "-" if byte == 0x2F else chr(byte) if byte in _NAME_SAFE else f"%{byte:02X}"
        for byte in path[1:]
    ) or "-"
    suffix = ".sock"
    if len(body) + len(suffix) <= room:
        return body + suffix
    digest = hashlib.sha256(path).hexdigest()[:_HASH_DIGITS]
    keep = max(0, room - len(suffix) - 1 - _HASH_DIGITS)
    prefix = body[:keep]
    if "%" in prefix[-2:]:  # not half an escape
        prefix = prefix[: prefix.rindex("%")]
    return f"{prefix}~{digest}{suffix}"


def default_control_path(mountpoint: Path) -> Path:
    """`/run/kvpfs/NAME.sock` (root) or `$XDG_RUNTIME_DIR/kvpfs/NAME.sock`, within the
    108 bytes a Unix socket's path may have. Without XDG_RUNTIME_DIR, a directory of this
    user's own in the temporary directory, `kvpfs-UID` (checked by `check_control_path`):
    a shared `/tmp/kvpfs` could be made by another user, who could then replace the socket."""
    if os.geteuid() == 0:
        directory = Path("/run/kvpfs")
    elif "XDG_RUNTIME_DIR" in os.environ:
        directory = Path(os.environ["XDG_RUNTIME_DIR"]) / "kvpfs"
    else:
        directory = Path(tempfile.gettempdir()) / f"kvpfs-{os.geteuid()}"
    room = SUN_PATH_MAX - len(os.fsencode(directory)) - 1
    return directory / control_socket_name(mountpoint, min(255, room))


class ControlSocketInUse(ControlError):
    """Another live kvpfs (or other program) answers on the control socket's path."""


def _probe(path: Path, timeout: float = 2.0) -> str:
    """What is at `path`: "free" (nothing), "stale" (a socket nobody listens on),
    "live" (a socket someone accepts on, or too busy to say) or "other" (not a socket)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "free"
    if not stat.S_ISSOCK(st.st_mode):
        return "other"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except OSError:
            return "live"  # a full backlog or a timeout: someone is there
    return "live"


def check_control_directory(directory: Path) -> None:
    """OSError(EPERM) naming the problem if another user could replace a socket in
    `directory`: it must be a real directory owned by this user or root, and writable by
    others only if sticky (as /tmp is). A missing one is fine: it is created 0700."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    problem = None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a symlink or another file)"
    elif st.st_uid not in (0, os.geteuid()):
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}) or root"
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        problem = (f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}) and not"
                   " sticky")
    if problem:
        raise OSError(errno.EPERM, f"the control socket's directory {directory} {problem}, so"
                      " another user could replace the socket; remove it or give --control"
                      " PATH in a directory of your own")


def check_control_path(path: Path) -> None:
    """Refuse a control socket path another live instance owns (a stale one may go), or
    whose directory another user could change (`check_control_directory`).

    Called before anything is created, so a refused start leaves nothing behind.
    """
    check_control_directory(path.parent)
    state = _probe(path)
    if state == "live":
        raise ControlSocketInUse(
            f"the control socket {path} belongs to another running kvpfs (it answers);"
            " stop that one first, or give this one its own with --control PATH")
    if state == "other":
        raise ControlSocketInUse(
            f"{path} exists and is not a socket; remove it or choose another --control PATH")


async def serve(path: Path, handler: Handler, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket; never takes one over from a live instance."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_control_directory(path.parent)  # again: it may have been made meanwhile
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for _attempt in range(3):
            old_umask = os.umask(0o177)
            try:
                await listener.bind(str(path))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
            finally:
                os.umask(old_umask)
            # Something is there: replace it only if nobody listens (a kvpfs killed
            # before it could remove its socket).
            await trio.to_thread.run_sync(check_control_path, path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            log.info("replaced the stale control socket %s", path)
        else:
            raise ControlSocketInUse(f"cannot bind the control socket {path}: it keeps"
                                     " reappearing (another kvpfs starting at the same time?)")
    except BaseException:
        listener.close()
        raise
    listener.listen(16)
    ours = os.lstat(path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve_one, trio.SocketStream(conn), handler)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            now = os.lstat(path)
            if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):  # still ours
                path.unlink()


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        buffer = b""
        try:
            while b"\n" not in buffer:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
                if len(buffer) > MAX_REQUEST:
                    raise ValueError(f"request longer than {MAX_REQUEST} bytes")
            request = json.loads(buffer.split(b"\n", 1)[0])
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            answer = await handler(request)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"error": f"bad request: {exc}"}
        except trio.BrokenResourceError:
            return
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(json.dumps(answer).encode() + b"\n")


def call(path: Path, request: JsonObject, *, timeout: float = 60.0) -> JsonObject:
    """Send one request and wait for the answer (blocking; for the command line)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ControlError(f"cannot talk to kvpfs at {path}: {exc.strerror or exc}") from None
    if not data:
        raise ControlError(f"kvpfs at {path} closed the connection without an answer")
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ControlError(f"kvpfs at {path} answered {data[:80]!r}, not a JSON object")
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer


def find_control(explicit: Path | None = None, mountpoint: Path | None = None) -> Path:
    """The control socket to use: given, from a named mount, or the only running mount."""
    if explicit is not None:
        return explicit
    candidates = [mountpoint] if mountpoint is not None else kvpfs_mounts()
    found = []
    for mount in candidates:
        try:
            found.append(Path(os.getxattr(mount, CONTROL_XATTR).decode()))
        except OSError:
            continue
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError(
            "no running kvpfs found (no fuse.kvpfs mount in /proc/self/mountinfo);"
            " start one with `kvpfs mount MOUNTPOINT --simulate` or pass --control PATH"
        )
    raise ControlError(
        "several kvpfs mounts are running ("
        + ", ".join(str(m) for m in candidates)
        + "); choose one with --mount MOUNTPOINT or --control PATH"
    )
