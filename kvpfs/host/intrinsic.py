"""Pool 2 (auto): the guest's intrinsic data, computed as the Linux daemon does.

The host enumerates ten fixed keys by index. Everything is computed per request
except the FQDN: name resolution can take seconds (the reference daemon's
host timeouts came from it), so a background task resolves it in a worker
thread with a time bound and the request path only reads the last result.
Until a resolution succeeds the plain host name is reported, never an error
text.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from kvpfs import compat
from kvpfs.host.netinfo import interface_addresses

log = logging.getLogger(__name__)

KEYS: tuple[str, ...] = (
    "FullyQualifiedDomainName",
    "IntegrationServicesVersion",
    "NetworkAddressIPv4",
    "NetworkAddressIPv6",
    "OSBuildNumber",
    "OSName",
    "OSMajorVersion",
    "OSMinorVersion",
    "OSVersion",
    "ProcessorArchitecture",
)


def _unquote_os_release(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    out, escaped = [], False
    for char in value:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)


@dataclass(frozen=True)
class OsInfo:
    name: str
    major: str
    minor: str


def read_os_info(root: Path = Path("/")) -> OsInfo:
    """NAME/VERSION_ID from os-release, else the legacy release files, else uname."""
    for candidate in ("etc/os-release", "usr/lib/os-release"):
        try:
            text = (root / candidate).read_text(errors="replace")
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = _unquote_os_release(value)
        return OsInfo(fields.get("NAME", ""), fields.get("VERSION_ID", ""), "")
    for legacy in ("etc/SuSE-release", "etc/redhat-release"):
        try:
            lines = (root / legacy).read_text(errors="replace").splitlines()
        except OSError:
            continue
        lines += ["", "", ""]
        return OsInfo(lines[0].strip(), lines[1].strip(), lines[2].strip())
    return OsInfo(os.uname().sysname, "", "")


def resolve_fqdn(hostname: str) -> str:
    """The canonical name for `hostname`, as the reference daemon asks for it."""
    infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM, 0,
                               socket.AI_CANONNAME)
    for _family, _type, _proto, canonname, _addr in infos:
        if canonname:
            return canonname
    return hostname


class FqdnCache:
    """The FQDN as last resolved, refreshed in the background."""

    def __init__(
        self,
        *,
        bound: float = 2.0,
        refresh: float = 300.0,
        retry: float = 10.0,
        resolver: Callable[[str], str] = resolve_fqdn,
    ) -> None:
        self.bound = bound
        self.refresh = refresh
        self.retry = retry
        self._resolver = resolver
        self.value = socket.gethostname()
        self._warned = False

    async def refresh_once(self) -> bool:
        hostname = socket.gethostname()
        reason = f"no answer within {self.bound:g} s"
        with trio.move_on_after(self.bound):
            try:
                self.value = await compat.to_thread_run_sync(
                    self._resolver, hostname, abandon_on_cancel=True
                )
                self._warned = False
                return True
            except (OSError, UnicodeError) as exc:  # idna refuses labels over 63 chars
                reason = str(exc)
        self.value = hostname
        if not self._warned:
            log.warning(
                "cannot resolve the FQDN of %r (%s); reporting the host name instead."
                " Check /etc/hosts or DNS; retrying every %g s",
                hostname, reason, self.retry,
            )
            self._warned = True
        return False

    async def run(self) -> None:
        while True:
            ok = await self.refresh_once()
            await trio.sleep(self.refresh if ok else self.retry)


class Intrinsics:
    """Computes the ten pool-2 values by index."""

    def __init__(self, fqdn: FqdnCache, os_info: OsInfo | None = None) -> None:
        self.fqdn = fqdn
        self.os_info = os_info or read_os_info()
        self.integration_version = "Unknown version"
        self._addresses_at: float | None = None
        self._address_lists: dict[int, str] = {}

    ADDRESS_TTL = 1.0  # a host enumeration asks for both lists within moments

    def _addresses(self, family: int) -> str:
        now = time.monotonic()
        if self._addresses_at is None or now - self._addresses_at > self.ADDRESS_TTL:
            found = [a for a in interface_addresses() if not a.loopback]
            self._address_lists = {
                fam: ";".join(a.address for a in found if a.family == fam)
                for fam in (socket.AF_INET, socket.AF_INET6)
            }
            self._addresses_at = now
        return self._address_lists[family]

    def value(self, index: int) -> tuple[str, str] | None:
        """(key, value) for `index`, or None past the last key.

        Blocking only for the address keys (a netlink round trip through
        getifaddrs); the device server calls this from a worker thread.
        """
        if not 0 <= index < len(KEYS):
            return None
        uname = os.uname()
        values: dict[int, Callable[[], str]] = {
            0: lambda: self.fqdn.value,
            1: lambda: self.integration_version,
            2: lambda: self._addresses(socket.AF_INET),
            3: lambda: self._addresses(socket.AF_INET6),
            4: lambda: uname.release,
            5: lambda: self.os_info.name,
            6: lambda: self.os_info.major,
            7: lambda: self.os_info.minor,
            8: lambda: uname.release.split("-", 1)[0],
            9: lambda: uname.machine,
        }
        return KEYS[index], values[index]()

    def needs_thread(self, index: int) -> bool:
        """Only a fresh read of the addresses (a netlink round trip) leaves the loop."""
        fresh = (self._addresses_at is not None
                 and time.monotonic() - self._addresses_at <= self.ADDRESS_TTL)
        return index in (2, 3) and not fresh
