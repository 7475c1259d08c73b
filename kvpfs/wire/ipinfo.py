"""GET_IP_INFO / SET_IP_INFO without I/O: host tokens in, validated settings and replies out.

The host names an adapter and, for SET_IP_INFO, sends four `;`-separated lists (addresses,
subnet masks, gateways, DNS servers) and a DHCP flag.  The reference daemon copies those
strings into files and a shell command line with fixed-size C buffers; here every token is
parsed into an `ipaddress` object first, so nothing the host sends reaches a file or a
program unless it is an address, and a bad token is a clear HV_INVALIDARG instead of a
half-written file.  What a validated `StaticConfig` becomes on disk is
`kvpfs.wire.ipconfigfiles`.

Everything that touches the system (sysfs, netlink, files, nmcli/networkctl) lives in
`kvpfs.host.netconfig` and the `kvpfs.host.net*` modules it uses.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import TypeAlias

from kvpfs.wire import protocol

__all__ = [
    "ADDR_FAMILY_IPV4",
    "ADDR_FAMILY_IPV6",
    "InvalidArgument",
    "IpFields",
    "LinkInfo",
    "StaticConfig",
    "build_get_reply",
    "ip_fields",
    "nm_connection_uuid",
    "normalize_guid",
    "normalize_mac",
    "parse_set",
    "safe_ifname",
]

IpAddress: TypeAlias = IPv4Address | IPv6Address
IpInterface: TypeAlias = IPv4Interface | IPv6Interface

ADDR_FAMILY_IPV4 = 1
ADDR_FAMILY_IPV6 = 2

# process_ob_ipinfo converts each field with utf8s_to_utf16s into a host buffer of
# MAX_IP_ADDR_SIZE (1024) or MAX_GATEWAY_SIZE (512) UTF-16 units and never adds a NUL: a full
# buffer reaches the host unterminated.  One unit is kept free so the host always finds the
# end, and whole entries are dropped rather than cut (the kernel would cut mid-address).
IP_ADDR_LIMIT = 1023
SUB_NET_LIMIT = 1023
GATE_WAY_LIMIT = 511
DNS_ADDR_LIMIT = 1023

_ADDRESS_CHARS = frozenset("0123456789abcdefABCDEF.:")
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")
_GUID = re.compile(
    r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$"
)
# dev_valid_name() allows almost any byte; file names and the config languages do not.  The
# names Hyper-V guests really have (eth0, enP1234s1, ens33) all fit this.
_SAFE_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,14}$")
_UUID_NAMESPACE = uuid.UUID("8a3c3b4e-5d0b-4c5e-9a57-6b7670667331")


class InvalidArgument(ValueError):
    """A host token kvpfs refuses; the host gets HV_INVALIDARG and nothing is written."""


# --------------------------------------------------------------------------- names


def normalize_mac(text: str) -> str | None:
    """`00:15:5D:0A:0B:0C` in any case (or with dashes) as lower-case colon form, else None.

    The reference compares with the upper-cased sysfs text, so a lower-case MAC from the
    host fails there; a MAC is a number, its spelling should not matter.
    """
    text = text.strip()
    if not _MAC.fullmatch(text):
        return None
    return text.lower().replace("-", ":")


def normalize_guid(text: str) -> str | None:
    """A VMBus instance GUID as sysfs spells it (`{lower-case}`), with or without braces."""
    match = _GUID.fullmatch(text.strip())
    if match is None:
        return None
    return "{" + match.group(1).lower() + "}"


def safe_ifname(name: str) -> bool:
    """Whether `name` can go into file names, keyfiles and networkd globs unescaped."""
    return bool(_SAFE_IFNAME.fullmatch(name))


def nm_connection_uuid(mac: str) -> str:
    """A stable profile UUID per adapter, so a second SET replaces the first profile."""
    return str(uuid.uuid5(_UUID_NAMESPACE, "kvpfs-hyperv:" + mac.lower()))


# --------------------------------------------------------------------------- GET_IP_INFO


@dataclass(frozen=True)
class LinkInfo:
    """One interface's configuration as GET_IP_INFO reports it."""

    addresses: tuple[IpInterface, ...] = ()
    gateways: tuple[IpAddress, ...] = ()
    dns: tuple[IpAddress, ...] = ()
    dhcp: bool = False


@dataclass(frozen=True)
class IpFields:
    """The reply's text fields, already cut to what the host can receive."""

    addr_family: int
    dhcp_enabled: int
    ip_addr: str
    sub_net: str
    gate_way: str
    dns_addr: str
    dropped: int = 0  # entries left out because a field was full


def _mask_text(iface: IpInterface) -> str:
    """IPv4 as a dotted mask, IPv6 as `/prefix` (what the reference sends)."""
    if iface.version == 4:
        return str(iface.netmask)
    return f"/{iface.network.prefixlen}"


def _terminated(items: Iterable[IpAddress], limit: int) -> tuple[str, int]:
    """Each address followed by `;` (the reference's gateway/DNS layout), within `limit`."""
    text, dropped = "", 0
    for item in items:
        entry = f"{item};"
        if len(text) + len(entry) > limit:
            dropped += 1
            continue
        text += entry
    return text, dropped


def ip_fields(info: LinkInfo) -> IpFields:
    """Lay out `info` as the reference does.

    Addresses and masks are `;`-joined and stay pairwise aligned (an address that does not
    fit is dropped with its mask); gateways and DNS servers each end with `;`.  The family
    bits describe the addresses reported.
    """
    ips: list[str] = []
    masks: list[str] = []
    family = 0
    dropped = 0
    for iface in info.addresses:
        ip, mask = str(iface.ip), _mask_text(iface)
        if (len(";".join([*ips, ip])) > IP_ADDR_LIMIT
                or len(";".join([*masks, mask])) > SUB_NET_LIMIT):
            dropped += 1
            continue
        ips.append(ip)
        masks.append(mask)
        family |= ADDR_FAMILY_IPV4 if iface.version == 4 else ADDR_FAMILY_IPV6
    gate_way, lost = _terminated(info.gateways, GATE_WAY_LIMIT)
    dropped += lost
    dns_addr, lost = _terminated(info.dns, DNS_ADDR_LIMIT)
    dropped += lost
    return IpFields(family, int(info.dhcp), ";".join(ips), ";".join(masks), gate_way,
                    dns_addr, dropped)


def build_get_reply(adapter_id: str, info: LinkInfo) -> bytes:
    """The GET_IP_INFO answer; `adapter_id` is echoed as the reference leaves it in place."""
    f = ip_fields(info)
    return protocol.encode_ip_info_reply(adapter_id, f.addr_family, f.dhcp_enabled, f.ip_addr,
                                         f.sub_net, f.gate_way, f.dns_addr)


# --------------------------------------------------------------------------- SET_IP_INFO


@dataclass(frozen=True)
class StaticConfig:
    """A validated SET_IP_INFO: what the host wants the adapter to look like."""

    dhcp: bool
    addresses: tuple[IpInterface, ...] = ()
    gateways: tuple[IpAddress, ...] = ()
    dns: tuple[IpAddress, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    def addresses_v(self, version: int) -> list[IpInterface]:
        return [a for a in self.addresses if a.version == version]

    def gateways_v(self, version: int) -> list[IpAddress]:
        return [g for g in self.gateways if g.version == version]

    def dns_v(self, version: int) -> list[IpAddress]:
        return [d for d in self.dns if d.version == version]

    def on_link(self, gateway: IpAddress) -> bool:
        """Whether `gateway` lies in one of the configured subnets (or is IPv6 link-local)."""
        if gateway.version == 6 and gateway.is_link_local:
            return True
        return any(gateway in a.network for a in self.addresses_v(gateway.version))


def _tokens(text: str) -> list[str]:
    """The `;`-separated tokens, blanks around them dropped, empty ones skipped.

    The reference skips leading spaces and empty tokens too; the host is known to end some
    lists with `;`.
    """
    return [token.strip() for token in text.split(";") if token.strip()]


def _address(token: str, what: str) -> IpAddress:
    """A unicast IPv4/IPv6 address; anything else is HV_INVALIDARG."""
    if not set(token) <= _ADDRESS_CHARS:
        # Also rules out zone ids (`fe80::1%eth0`), prefixes and anything shell-like.
        raise InvalidArgument(f"{what} {token!r} is not an IPv4 or IPv6 address")
    try:
        address = ipaddress.ip_address(token)
    except ValueError:
        raise InvalidArgument(f"{what} {token!r} is not an IPv4 or IPv6 address") from None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        raise InvalidArgument(f"{what} {token!r} is an IPv4-mapped IPv6 address")
    if (address.is_unspecified or address.is_multicast or address.is_loopback
            or (isinstance(address, IPv4Address) and address.is_reserved)):
        raise InvalidArgument(f"{what} {token!r} is not a unicast address")
    return address


def _prefix(token: str, address: IpAddress) -> int:
    """The prefix length a mask token gives `address`.

    IPv4: a dotted contiguous mask (what Windows sends) or a prefix length; IPv6: a prefix
    length, with or without `/` (what Windows sends), or a contiguous IPv6 mask.
    """
    bits = address.max_prefixlen
    text = token[1:] if token.startswith("/") else token
    if text.isdigit() and text.isascii() and len(text) <= 3:
        prefix = int(text)
    else:
        try:
            mask = ipaddress.ip_address(text)
        except ValueError:
            raise InvalidArgument(
                f"subnet {token!r} for {address} is neither a mask nor a prefix length"
            ) from None
        if mask.version != address.version:
            raise InvalidArgument(f"subnet {token!r} is not an IPv{address.version} mask"
                                  f" (for {address})")
        value = int(mask)
        host = ~value & ((1 << bits) - 1)
        if host & (host + 1):
            raise InvalidArgument(f"subnet mask {token!r} for {address} is not contiguous")
        prefix = bits - host.bit_length()
    if not 1 <= prefix <= bits:
        raise InvalidArgument(f"prefix length {prefix} for {address} is outside 1..{bits}")
    return prefix


def _unique(items: list[IpAddress]) -> tuple[IpAddress, ...]:
    return tuple(dict.fromkeys(items))


def parse_set(ip_addr: str, sub_net: str, gate_way: str, dns_addr: str,
              dhcp_enabled: int) -> StaticConfig:
    """Validate a SET_IP_INFO; raises InvalidArgument naming the first bad token.

    Addresses pair with masks by position (as in the reference's keyfile writer).  Checks
    beyond syntax are the ones the network managers would otherwise reject or silently
    repair: a mask per address, no address twice, no IPv4 gateway or DNS server when IPv4
    has neither an address nor DHCP, no gateway that is one of the adapter's own addresses.
    """
    if dhcp_enabled not in (0, 1):
        raise InvalidArgument(f"dhcp_enabled is {dhcp_enabled}, not 0 or 1")
    dhcp = bool(dhcp_enabled)
    ips = [_address(t, "address") for t in _tokens(ip_addr)]
    masks = _tokens(sub_net)
    if len(masks) != len(ips):
        raise InvalidArgument(f"{len(ips)} address(es) but {len(masks)} subnet mask(s)"
                              f" (one per address, in order)")
    addresses: list[IpInterface] = []
    for ip, mask in zip(ips, masks, strict=True):
        if ip in (a.ip for a in addresses):
            raise InvalidArgument(f"address {ip} is given twice")
        addresses.append(ipaddress.ip_interface((ip, _prefix(mask, ip))))
    gateways = _unique([_address(t, "gateway") for t in _tokens(gate_way)])
    dns = _unique([_address(t, "DNS server") for t in _tokens(dns_addr)])
    has_v4 = dhcp or any(a.version == 4 for a in addresses)
    for server in dns:
        if server.version == 4 and not has_v4:
            # IPv4 would be disabled; NetworkManager refuses ipv4.dns then.
            raise InvalidArgument(f"IPv4 DNS server {server} but no IPv4 address and no DHCP")
    own = {a.ip for a in addresses}
    notes: list[str] = []
    for gateway in gateways:
        if gateway in own:
            raise InvalidArgument(f"gateway {gateway} is one of the adapter's own addresses")
        has_family = any(a.version == gateway.version for a in addresses)
        if gateway.version == 4 and not has_family and not dhcp:
            raise InvalidArgument(f"IPv4 gateway {gateway} but no IPv4 address and no DHCP")
        if gateway.version == 6 and not has_family and not gateway.is_link_local:
            # IPv6 without static addresses is SLAAC; a global static gateway is only usable
            # if a router advertises a prefix, so say so in the log rather than refuse.
            notes.append(f"IPv6 gateway {gateway} without a static IPv6 address (SLAAC)")
    return StaticConfig(dhcp, tuple(addresses), gateways, dns, tuple(notes))
