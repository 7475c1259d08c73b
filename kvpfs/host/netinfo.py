"""The guest's interface addresses, read from the kernel with getifaddrs(3).

Python's standard library has no getifaddrs; spawning `ip` per host request
would cost milliseconds. ctypes over libc gives the same list the reference
daemon walks, in the same order, in microseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import socket
from dataclasses import dataclass

IFF_LOOPBACK = 0x8


class _Sockaddr(ctypes.Structure):
    _fields_ = (("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14))


class _Sockaddr6(ctypes.Structure):
    _fields_ = (
        ("sin6_family", ctypes.c_ushort),
        ("sin6_port", ctypes.c_ushort),
        ("sin6_flowinfo", ctypes.c_uint32),
        ("sin6_addr", ctypes.c_ubyte * 16),
        ("sin6_scope_id", ctypes.c_uint32),
    )


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = (
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.getifaddrs.argtypes = (ctypes.POINTER(ctypes.POINTER(_Ifaddrs)),)
_libc.freeifaddrs.argtypes = (ctypes.POINTER(_Ifaddrs),)


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    interface: str
    family: int  # socket.AF_INET or socket.AF_INET6
    address: str
    prefixlen: int
    loopback: bool


def _raw_address(sa: ctypes._Pointer[_Sockaddr]) -> bytes | None:
    family = sa.contents.sa_family
    if family == socket.AF_INET:
        return bytes(sa.contents.sa_data[2:6])
    if family == socket.AF_INET6:
        return bytes(ctypes.cast(sa, ctypes.POINTER(_Sockaddr6)).contents.sin6_addr)
    return None


def interface_addresses() -> list[InterfaceAddress]:
    """Every IPv4/IPv6 address of every interface, in the kernel's order."""
    head = ctypes.POINTER(_Ifaddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getifaddrs failed: {errno.errorcode.get(err, err)}")
    found: list[InterfaceAddress] = []
    try:
        node = head
        while node:
            entry = node.contents
            node = entry.ifa_next
            if not entry.ifa_addr:
                continue
            family = entry.ifa_addr.contents.sa_family
            raw = _raw_address(entry.ifa_addr)
            if raw is None:
                continue
            mask = _raw_address(entry.ifa_netmask) if entry.ifa_netmask else None
            prefixlen = int.from_bytes(mask, "big").bit_count() if mask else 0
            found.append(
                InterfaceAddress(
                    interface=entry.ifa_name.decode(errors="replace"),
                    family=family,
                    address=str(ipaddress.ip_address(raw)),
                    prefixlen=prefixlen,
                    loopback=bool(entry.ifa_flags & IFF_LOOPBACK),
                )
            )
    finally:
        _libc.freeifaddrs(head)
    return found
