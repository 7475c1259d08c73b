"""Addresses and default routes read from the kernel over rtnetlink.

GET_IP_INFO needs one interface's addresses and default gateways.  Parsing
`ip route` text is what broke the reference daemon (multipath `nexthop via`
lines, gateways of other interfaces); asking the kernel directly gives exact
answers keyed by interface index.  A netlink socket belongs to the network
namespace of the process that opens it, so this always describes the
namespace kvpfs runs in.  Python's socket module speaks AF_NETLINK natively:
a dump is one request and a few reads, no subprocess, no dependency.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Address", "Gateway", "NetlinkError", "addresses", "default_gateways"]

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8

RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18

RTN_UNICAST = 1
RT_TABLE_MAIN = 254

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTGENMSG = struct.Struct("=Bxxx")
_RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")

_RECV_SIZE = 1 << 20
_TIMEOUT = 5.0


class NetlinkError(OSError):
    """The kernel refused or broke off a dump."""


@dataclass(frozen=True, slots=True)
class Address:
    """One address of an interface, in the kernel's dump order."""

    family: int  # socket.AF_INET or socket.AF_INET6
    address: str
    prefixlen: int
    flags: int


@dataclass(frozen=True, slots=True)
class Gateway:
    """The next hop of a default route (main table) leaving through ``ifindex``."""

    family: int  # family of the route (a v4 route may go via an IPv6 next hop)
    address: str
    ifindex: int
    metric: int


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr in ``data[offset:end]``; stops at a malformed one."""
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size:offset + length]  # drop NLA_F_* bits
        offset += _align(length)


def _dump(message_type: int, family: int) -> Iterator[tuple[int, bytes]]:
    """Every (type, payload) of one rtnetlink dump, for the caller's namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_ROUTE) as sock:
        sock.settimeout(_TIMEOUT)
        sock.bind((0, 0))
        seq = 1
        body = _RTGENMSG.pack(family)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), message_type,
                                NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        sock.send(header + body)
        own_pid = sock.getsockname()[0]
        while True:
            data = sock.recv(_RECV_SIZE)
            if not data:
                raise NetlinkError("netlink socket closed during a dump")
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, msg_seq, pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise NetlinkError(f"truncated netlink message ({length} bytes)")
                payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += _align(length)
                if msg_seq != seq or pid not in (own_pid, 0):
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if err:
                        raise NetlinkError(err, f"rtnetlink dump: {os.strerror(err)}")
                    return
                yield kind, payload


def _ip_text(family: int, raw: bytes) -> str | None:
    if family == socket.AF_INET and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if family == socket.AF_INET6 and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return None


def addresses(ifindex: int) -> list[Address]:
    """IPv4 then IPv6 addresses of ``ifindex`` (what getifaddrs lists, by index not name).

    Filtering by index rather than by name is what makes `eth1` not pick up `eth10`,
    and keeps IPv4 alias labels (`eth0:1`) with their interface.
    """
    found: list[Address] = []
    for kind, payload in _dump(RTM_GETADDR, socket.AF_UNSPEC):
        if kind != RTM_NEWADDR or len(payload) < _IFADDRMSG.size:
            continue
        family, prefixlen, flags, _scope, index = _IFADDRMSG.unpack_from(payload)
        if index != ifindex or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        attrs = dict(_attributes(payload, _IFADDRMSG.size, len(payload)))
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on a
        # point-to-point link (for IPv6 only IFA_ADDRESS is sent unless there is a peer).
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        text = _ip_text(family, raw) if raw else None
        if text is None:
            continue
        if IFA_FLAGS in attrs and len(attrs[IFA_FLAGS]) >= 4:
            flags = _U32.unpack_from(attrs[IFA_FLAGS])[0]
        found.append(Address(family, text, prefixlen, flags))
    return found


def _via(raw: bytes) -> str | None:
    """struct rtvia: u16 family, then the address."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    return _ip_text(family, raw[2:])


def _next_hops(family: int, attrs: dict[int, bytes]) -> Iterator[tuple[int, str]]:
    """(ifindex, gateway) of a route: its single next hop or each multipath one."""
    gateway = attrs.get(RTA_GATEWAY)
    text = _ip_text(family, gateway) if gateway else _via(attrs.get(RTA_VIA, b""))
    oif = attrs.get(RTA_OIF)
    if text is not None and oif is not None and len(oif) >= 4:
        yield struct.unpack_from("=i", oif)[0], text
    multipath = attrs.get(RTA_MULTIPATH)
    if not multipath:
        return
    offset = 0
    while offset + _RTNEXTHOP.size <= len(multipath):
        length, _flags, _hops, index = _RTNEXTHOP.unpack_from(multipath, offset)
        if length < _RTNEXTHOP.size or offset + length > len(multipath):
            return
        hop = dict(_attributes(multipath, offset + _RTNEXTHOP.size, offset + length))
        gateway = hop.get(RTA_GATEWAY)
        text = _ip_text(family, gateway) if gateway else _via(hop.get(RTA_VIA, b""))
        if text is not None:
            yield index, text
        offset += _align(length)


def default_gateways(ifindex: int) -> list[Gateway]:
    """Next hops of the main table's default routes that leave through ``ifindex``.

    IPv4 first, then IPv6 (the reference's order), each in the kernel's order; multipath
    routes contribute the next hops on this interface only.  A gateway listed twice (two
    metrics) is reported once.
    """
    found: list[Gateway] = []
    seen: set[tuple[int, str]] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for kind, payload in _dump(RTM_GETROUTE, family):
            if kind != RTM_NEWROUTE or len(payload) < _RTMSG.size:
                continue
            (rt_family, dst_len, _src_len, _tos, table, _proto, _scope, rt_type,
             _flags) = _RTMSG.unpack_from(payload)
            if rt_family != family or dst_len != 0 or rt_type != RTN_UNICAST:
                continue
            attrs = dict(_attributes(payload, _RTMSG.size, len(payload)))
            if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) >= 4:
                table = _U32.unpack_from(attrs[RTA_TABLE])[0]
            if table != RT_TABLE_MAIN:
                continue
            metric = _U32.unpack_from(attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else 0
            for index, text in _next_hops(family, attrs):
                if index == ifindex and (family, text) not in seen:
                    seen.add((family, text))
                    found.append(Gateway(int(family), text, index, metric))
    return found
