"""A scripted Hyper-V host for the emulated device, plus a context manager that runs one.

:class:`EmulatedHost` is synchronous on purpose: tests and benchmarks call it from plain code
(or from a worker thread), and one call is one host transaction.  It applies the kernel's
string conversions exactly as ``drivers/hv/hv_kvp.c`` does, so its results are what a real
Hyper-V host would see:

* host strings go down as ``host_to_guest`` (UTF-16 -> UTF-8, keys capped at 511 bytes,
  values at 2047, IP fields at 128/1024/512 bytes);
* ENUMERATE/GET answers come back through ``guest_to_host`` (254 units for keys, 1022 for
  values, strlen-terminated, read at offsets 20/532 even for GET); invalid UTF-8 turns the
  status into E_FAIL, as the kernel does;
* a non-zero daemon status short-circuits: the host gets the status and no data.

Usage::

    with run_emulated_device(tmp_path) as (device_path, host):
        ...  # start a daemon on device_path, then
        assert host.set(Pool.EXTERNAL, "k", "v") == Status.S_OK
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulation import emuwire
from emulation.emuwire import ReplySource
from kvpfs.host.simulator import IpInfoResult, ip_info_as_host_sees
from kvpfs.wire.kernelconv import (
    GUEST_KEY_MAX_UNITS,
    GUEST_VALUE_MAX_UNITS,
    HOST_KEY_MAX_BYTES,
    HOST_VALUE_MAX_BYTES,
    ConversionError,
    guest_to_host,
    host_to_guest,
)
from kvpfs.wire.kernelside import (
    encode_delete_request,
    encode_enumerate_request,
    encode_get_request,
    encode_ip_info_request,
    encode_set_request,
    reply_key_value,
)
from kvpfs.wire.protocol import MESSAGE_SIZE, Op, Status, ValueType

__all__ = [
    "DEVICE_FILE",
    "EmulatedHost",
    "EmulatorError",
    "HostReply",
    "IpInfo",
    "NoDaemonReply",
    "control_socket_of",
    "run_emulated_device",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE_FILE = "hv_kvp"
CONTROL_XATTR = "user.kvpemu.control"

# utf16s_to_utf8s maxout in process_ib_ipinfo (host -> daemon), in bytes.
_IP_ADAPTER_MAX_BYTES = 128  # MAX_ADAPTER_ID_SIZE
_IP_ADDR_MAX_BYTES = 1024  # MAX_IP_ADDR_SIZE
_IP_GATEWAY_MAX_BYTES = 512  # MAX_GATEWAY_SIZE
# utf8s_to_utf16s maxout in process_ob_ipinfo (daemon -> host), in UTF-16 units.
_IP_ADAPTER_MAX_UNITS = 128
_IP_ADDR_MAX_UNITS = 1024
_IP_GATEWAY_MAX_UNITS = 512
# sun_path is 108 bytes including the NUL.
_SUN_PATH_MAX = 107


class EmulatorError(RuntimeError):
    """The emulator refused a command or went away."""


class NoDaemonReply(EmulatorError):
    """:meth:`EmulatedHost.raw` got a kernel-made status instead of a daemon reply."""

    def __init__(self, status: int, source: ReplySource) -> None:
        super().__init__(f"no daemon reply: status {status:#x} ({source.name})")
        self.status = status
        self.source = source


@dataclass(frozen=True)
class HostReply:
    """One finished transaction as the kernel saw it (before any UTF-16 conversion)."""

    status: int
    source: ReplySource
    reply: bytes | None  # the daemon's 7432-byte write, None when the kernel answered alone


IpInfo = IpInfoResult  # GET_IP_INFO as the host receives it


def _cstring_at(data: bytes, offset: int) -> bytes:
    """``strlen`` from ``offset`` (bounded by the message, like reply_key_value)."""
    end = data.find(b"\0", offset)
    return data[offset : end if end >= 0 else len(data)]


def _host_text(text: str, max_bytes: int) -> str:
    """A host string as the daemon gets it, back as str for the text-based IP encoder."""
    return host_to_guest(text, max_bytes).decode("utf-8")


def control_socket_of(device_path: str | os.PathLike[str]) -> str:
    """Find the control socket of the emulator serving ``device_path`` (via an xattr)."""
    return os.fsdecode(os.getxattr(device_path, CONTROL_XATTR))


class EmulatedHost:
    """Synchronous client of the emulator's control socket (thread-safe: one connection per
    thread, so one thread can wait on a request while another queries state).

    ``timeout`` bounds every socket wait (including a request that sits in the ring because
    no daemon is registered); ``socket.timeout`` is raised when it expires, and the
    request is then withdrawn by closing the connection.
    """

    def __init__(self, control_socket: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.control_socket = os.fspath(control_socket)
        self.timeout = timeout
        # One connection per thread: a request blocks its connection until it is answered,
        # and tests query state from one thread while another thread waits on a request.
        self._local = threading.local()
        self._all: set[socket.socket] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> socket.socket:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.control_socket)
            except OSError:
                sock.close()
                raise
            self._local.sock = sock
            with self._lock:
                self._all.add(sock)
        return sock

    def _drop(self) -> None:
        """Forget this thread's connection (its stream position is unknown after an error)."""
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None:
            self._local.sock = None
            with self._lock:
                self._all.discard(sock)
            sock.close()

    def close(self) -> None:
        """Close every thread's connection (requests still in the ring are withdrawn)."""
        with self._lock:
            socks, self._all = self._all, set()
        for sock in socks:
            # shutdown() (unlike close()) wakes a thread blocked in recv on this socket.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._local = threading.local()

    def __enter__(self) -> EmulatedHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, sock: socket.socket, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = sock.recv(count - len(chunks))
            if not chunk:
                raise EmulatorError("emulator closed the control connection")
            chunks += chunk
        return bytes(chunks)

    def _roundtrip(self, frame: bytes, timeout: float | None = None) -> bytes:
        sock = self._connect()
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            sock.sendall(frame)
            length = emuwire.split_length(self._recv_exact(sock, 4))
            payload = self._recv_exact(sock, length)
        except BaseException:
            self._drop()
            raise
        if payload[:1] == emuwire.KIND_ERROR:
            raise EmulatorError(payload[1:].decode(errors="replace"))
        return payload

    def command(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a JSON control command; raise :class:`EmulatorError` if it failed."""
        return self._command(cmd, args, None)

    def _command(
        self, cmd: str, args: dict[str, Any], sock_timeout: float | None
    ) -> dict[str, Any]:
        payload = self._roundtrip(emuwire.json_frame({"cmd": cmd, **args}), sock_timeout)
        answer = json.loads(payload[1:])
        if not answer.get("ok"):
            raise EmulatorError(f"{cmd}: {answer.get('error')} (state {answer.get('state')})")
        return answer

    # ------------------------------------------------------------------ transactions

    def transact(self, request: bytes, timeout: float | None = None) -> HostReply:
        """Send one kernel-format request; wait for the kernel's answer."""
        if len(request) != MESSAGE_SIZE:
            raise ValueError(f"request is {len(request)} bytes, expected {MESSAGE_SIZE}")
        payload = self._roundtrip(emuwire.frame(emuwire.KIND_REQUEST + bytes(request)), timeout)
        status, source, reply = emuwire.decode_answer(payload)
        return HostReply(status, source, reply)

    def raw(self, request: bytes, timeout: float | None = None) -> bytes:
        """The daemon's raw 7432-byte reply to ``request`` (status in its first 4 bytes).

        Raises :class:`NoDaemonReply` when the kernel answered by itself (timeout, reset,
        stale message, unload).
        """
        result = self.transact(request, timeout)
        if result.reply is None:
            raise NoDaemonReply(result.status, result.source)
        return result.reply

    def set(self, pool: int, key: str, value: str, timeout: float | None = None) -> int:
        """Host SET with a REG_SZ value; returns the status."""
        request = encode_set_request(
            pool, host_to_guest(key, HOST_KEY_MAX_BYTES), host_to_guest(value, HOST_VALUE_MAX_BYTES)
        )
        return self.transact(request, timeout).status

    def set_integer(
        self, pool: int, key: str, value: int, value_type: int = ValueType.REG_U32
    ) -> int:
        """Host SET of a REG_U32/REG_U64 value (the kernel sends its decimal text)."""
        request = encode_set_request(
            pool, host_to_guest(key, HOST_KEY_MAX_BYTES), str(value).encode(), value_type
        )
        return self.transact(request).status

    def get(self, pool: int, key: str, timeout: float | None = None) -> tuple[int, str]:
        """Host GET: (status, value).  On stock Linux the value is always empty (kernel bug)."""
        result = self.transact(
            encode_get_request(pool, host_to_guest(key, HOST_KEY_MAX_BYTES)), timeout
        )
        if result.status != Status.S_OK or result.reply is None:
            return result.status, ""
        _, value = reply_key_value(result.reply)
        try:
            return Status.S_OK, guest_to_host(value, GUEST_VALUE_MAX_UNITS)
        except ConversionError:
            return Status.E_FAIL, ""

    def delete(self, pool: int, key: str, timeout: float | None = None) -> int:
        """Host DELETE; returns the status."""
        request = encode_delete_request(pool, host_to_guest(key, HOST_KEY_MAX_BYTES))
        return self.transact(request, timeout).status

    def enumerate(
        self, pool: int, index: int, timeout: float | None = None
    ) -> tuple[int, str, str]:
        """Host ENUMERATE of one index: (status, key, value); empty strings unless S_OK."""
        result = self.transact(encode_enumerate_request(pool, index), timeout)
        if result.status != Status.S_OK or result.reply is None:
            return result.status, "", ""
        key, value = reply_key_value(result.reply)
        try:
            return (
                Status.S_OK,
                guest_to_host(key, GUEST_KEY_MAX_UNITS),
                guest_to_host(value, GUEST_VALUE_MAX_UNITS),
            )
        except ConversionError:
            return Status.E_FAIL, "", ""

    def enumerate_all(self, pool: int, limit: int = 100_000) -> list[tuple[str, str]]:
        """Enumerate from index 0 until a non-S_OK status, as the host does."""
        items: list[tuple[str, str]] = []
        for index in range(limit):
            status, key, value = self.enumerate(pool, index)
            if status != Status.S_OK:
                return items
            items.append((key, value))
        raise EmulatorError(f"pool {pool} still enumerating after {limit} items")

    def ip_info(
        self,
        op: int,
        adapter_id: str,
        addr_family: int = 0,
        dhcp_enabled: int = 0,
        ip_addr: str = "",
        sub_net: str = "",
        gate_way: str = "",
        dns_addr: str = "",
        *,
        pool: int = 0,
        timeout: float | None = None,
    ) -> IpInfo:
        """GET_IP_INFO (only adapter_id/addr_family are passed down) or SET_IP_INFO."""
        if op == Op.GET_IP_INFO:
            request = encode_ip_info_request(
                op,
                _host_text(adapter_id, _IP_ADAPTER_MAX_BYTES),
                addr_family,
                pool=pool,
            )
        else:
            request = encode_ip_info_request(
                op,
                _host_text(adapter_id, _IP_ADAPTER_MAX_BYTES),
                addr_family,
                dhcp_enabled,
                _host_text(ip_addr, _IP_ADDR_MAX_BYTES),
                _host_text(sub_net, _IP_ADDR_MAX_BYTES),
                _host_text(gate_way, _IP_GATEWAY_MAX_BYTES),
                _host_text(dns_addr, _IP_ADDR_MAX_BYTES),
                pool=pool,
            )
        result = self.transact(request, timeout)
        if op != Op.GET_IP_INFO or result.status != Status.S_OK or result.reply is None:
            return IpInfo(result.status)
        return ip_info_as_host_sees(result.reply)

    # ------------------------------------------------------------------ faults & state

    def ping(self) -> int:
        """Round trip to the emulator; returns its pid."""
        return int(self.command("ping")["pid"])

    def state(self) -> dict[str, Any]:
        """Device state and counters (see ``KvpDevice.snapshot``)."""
        return self.command("state")["state"]

    def fail_next_read(self, err: int = errno.EIO, count: int = 1) -> None:
        """The next ``count`` reads of the device fail with ``err`` (message kept)."""
        self.command("fail_next_read", errno=err, count=count)

    def fail_next_write(self, err: int = errno.EIO, count: int = 1) -> None:
        """The next ``count`` writes fail with ``err`` (not processed)."""
        self.command("fail_next_write", errno=err, count=count)

    def clear_faults(self) -> None:
        self.command("clear_faults")

    def vanish(self, mode: str = "unload") -> dict[str, Any]:
        """Make the device disappear.

        ``unload``: module unload -- the opener's read/write get EBADF and poll
        POLLERR|POLLHUP, open gets EBADF while the opener still holds it, then ENOENT once
        closed. ``unlink``: only the name goes (open -> ENOENT), an open fd keeps working.
        """
        return self.command("vanish", mode=mode)["state"]

    def reappear(self) -> dict[str, Any]:
        """The device is back (after an unload: a fresh instance in INIT)."""
        return self.command("return")["state"]

    def hibernate(self) -> dict[str, Any]:
        """The guest hibernates and resumes (``hv_kvp_pre_suspend``): state forced READY."""
        return self.command("hibernate")["state"]

    def hold_until_open(self) -> None:
        """Host requests sent from now on arrive right after the next open of the device,
        before the opener can register (with `hibernate`: the registration race)."""
        self.command("hold_until_open")

    def set_timeout(self, seconds: float) -> None:
        """Per-request timeout for transactions started from now on."""
        self.command("set_timeout", seconds=seconds)

    def wait_for(self, timeout: float = 10.0, **conditions: Any) -> dict[str, Any]:
        """Block until the device state matches, e.g. ``registered=True, min_handshakes=2``.

        Conditions: registered, opened, message_queued, present (bools); min_handshakes,
        min_opens, min_completed, min_resets, min_register_writes (ints); idle (no
        transaction and nothing in the ring).  Raises :class:`EmulatorError` on timeout.
        """
        answer = self._command("wait", {**conditions, "timeout": timeout}, timeout + 5.0)
        return answer["state"]

    def wait_registered(self, timeout: float = 10.0, min_handshakes: int = 1) -> dict[str, Any]:
        return self.wait_for(timeout, registered=True, min_handshakes=min_handshakes)


def _mounted(path: str) -> bool:
    """Is ``path`` a mount point?  Read mountinfo: os.path.ismount fails on dead FUSE mounts."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                mount_point = fields[4].encode().decode("unicode_escape")
                if mount_point == target:
                    return True
    except OSError:
        pass
    return False


def _lazy_unmount(path: str) -> None:
    """Best-effort ``fusermount3 -u -z`` for a mount the emulator failed to remove."""
    for _ in range(5):
        if not _mounted(path):
            return
        subprocess.run(
            ["fusermount3", "-u", "-z", path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


@contextlib.contextmanager
def run_emulated_device(
    tmpdir: str | os.PathLike[str],
    *,
    timeout: float = 30.0,
    start_timeout: float = 10.0,
    host_timeout: float = 60.0,
    debug: bool = False,
) -> Iterator[tuple[str, EmulatedHost]]:
    """Start the emulator in a subprocess; yield ``(device_path, host)``.

    ``timeout`` is the per-request timeout (HV_UTIL_TIMEOUT); ``host_timeout`` bounds each
    blocking call of the yielded :class:`EmulatedHost`.  The emulator's log goes to
    ``tmpdir/emulator.log`` and is included in the error if it fails to start.  On exit the
    process gets SIGTERM (then SIGKILL), and a leftover mount is removed with
    ``fusermount3 -u -z``.
    """
    tmp = Path(tmpdir)
    mountdir = tmp / "emulated-dev"
    mountdir.mkdir(parents=True, exist_ok=True)
    short_dir: str | None = None
    control = tmp / "emulator.sock"
    if len(os.fsencode(control)) > _SUN_PATH_MAX:
        short_dir = tempfile.mkdtemp(prefix="kvpemu-")
        control = Path(short_dir) / "ctl.sock"
    log_path = tmp / "emulator.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [
        sys.executable,
        "-m",
        "emulation.emulated_device",
        str(mountdir),
        str(control),
        "--timeout",
        str(timeout),
    ]
    if debug:
        args.append("--debug")
    host = EmulatedHost(control, timeout=host_timeout)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
        )
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise EmulatorError(
                    f"emulator exited with {proc.returncode}:\n{log_path.read_text()}"
                )
            if _mounted(str(mountdir)) and os.path.exists(control):
                try:
                    host.ping()
                    break
                except OSError:
                    host._drop()
            if time.monotonic() > deadline:
                raise EmulatorError(f"emulator did not come up:\n{log_path.read_text()}")
            time.sleep(0.02)
        yield str(mountdir / DEVICE_FILE), host
    finally:
        host.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        _lazy_unmount(str(mountdir))
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)
