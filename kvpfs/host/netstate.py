"""GET_IP_INFO: what a link is configured as now.

Its addresses and default gateways come from the kernel over rtnetlink (`kvpfs.host.rtnl`,
the namespace kvpfs runs in), its DNS servers from systemd-resolved for that link when
resolved runs (else networkd's link state, else /etc/resolv.conf), and "DHCP on" from
whichever of NetworkManager, systemd-networkd, ifupdown or network-scripts manages the
link, read from their state and configuration files (or nmcli on the live system).
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import json
import logging
import re
import shlex
import socket
from collections.abc import Mapping
from pathlib import Path

from kvpfs.host import rtnl
from kvpfs.host.netfiles import TRUE_WORDS, keyfile, read_text, systemd_values
from kvpfs.host.netlinks import (
    IFUPDOWN,
    NETWORKD,
    NETWORKMANAGER,
    NM_DIRS,
    ZERO_MAC,
    Interface,
    Manager,
    link_manager,
    list_interfaces,
)
from kvpfs.host.netprograms import query
from kvpfs.host.netsettings import NetSettings
from kvpfs.wire.ipinfo import IpAddress, LinkInfo, normalize_mac
from kvpfs.wire.protocol import Status

log = logging.getLogger(__name__)

_SOURCE_DIRECTORY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------- DHCP


def _nm_ipv4_method(settings: NetSettings, uuid: str) -> str | None:
    """ipv4.method of a NetworkManager profile: nmcli when live, else the keyfile itself."""
    if not uuid:
        return None
    answer = query(settings, ["nmcli", "--get-values", "ipv4.method", "connection", "show",
                               "uuid", uuid])
    if answer is not None:
        return answer.strip()
    for directory in NM_DIRS:
        try:
            paths = sorted(settings.at(directory).glob("*.nmconnection"))
        except OSError:
            continue
        for path in paths:
            text = read_text(path)
            if text is None or uuid not in text:
                continue
            try:
                parser = keyfile(text)
            except configparser.Error:
                continue
            if parser.get("connection", "uuid", fallback="") == uuid:
                return parser.get("ipv4", "method", fallback="auto")
    return None


def _networkd_dhcp(settings: NetSettings, state: Mapping[str, str]) -> bool:
    """DHCP= of the link's .network file and its drop-ins (the last assignment wins)."""
    paths = [settings.at(state["NETWORK_FILE"])]
    paths += [settings.at(p) for p in shlex.split(state.get("NETWORK_FILE_DROPINS", ""))]
    values = systemd_values(paths, "Network", "DHCP")
    return bool(values) and values[-1].lower() in TRUE_WORDS | {"ipv4", "both", "v4"}


def _ifupdown_files(settings: NetSettings) -> list[Path]:
    """/etc/network/interfaces and the files it pulls in with `source`/`source-directory`.

    `source-directory` takes only names made of letters, digits, `_` and `-`, as
    interfaces(5) says (so editor backups are skipped).
    """
    pending = [settings.at("/etc/network/interfaces")]
    seen: list[Path] = []
    while pending and len(seen) < 256:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.append(path)
        for raw in (read_text(path) or "").splitlines():
            words = raw.split()
            if len(words) < 2 or words[0] not in ("source", "source-directory"):
                continue
            target = words[1] if words[1].startswith("/") else f"/etc/network/{words[1]}"
            pattern = settings.at(target)
            if words[0] == "source":
                pending += sorted(pattern.parent.glob(pattern.name))
                continue
            with contextlib.suppress(OSError):
                pending += sorted(p for p in pattern.iterdir()
                                  if _SOURCE_DIRECTORY_NAME.match(p.name) and p.is_file())
    return seen


def _ifupdown_dhcp(settings: NetSettings, stanza: str) -> bool:
    for path in _ifupdown_files(settings):
        for raw in (read_text(path) or "").splitlines():
            words = raw.split()
            if words[:3] == ["iface", stanza, "inet"] and len(words) >= 4:
                return words[3] == "dhcp"
    return False


def dhcp_enabled(settings: NetSettings, manager: Manager | None) -> bool:
    """Whether DHCPv4 is configured for the link by the manager that owns it."""
    if manager is None:
        return False
    if manager.name == NETWORKMANAGER:
        return _nm_ipv4_method(settings, manager.detail) == "auto"
    if manager.name == NETWORKD:
        return _networkd_dhcp(settings, manager.state)
    if manager.name == IFUPDOWN:
        return _ifupdown_dhcp(settings, manager.detail)
    return manager.state.get("BOOTPROTO", "").lower() in ("dhcp", "bootp")


# --------------------------------------------------------------------------- DNS


def _address(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _busctl_property(settings: NetSettings, path: str, interface: str,
                     name: str) -> list[object] | None:
    answer = query(settings, ["busctl", "--json=short", "get-property",
                               "org.freedesktop.resolve1", path, interface, name])
    if answer is None:
        return None
    try:
        data = json.loads(answer)["data"]
    except (ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, list) else None


def _from_bytes(family: object, raw: object) -> IpAddress | None:
    if not isinstance(raw, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return None
    if family == socket.AF_INET and len(raw) == 4:
        return ipaddress.IPv4Address(bytes(raw))
    if family == socket.AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Address(bytes(raw))
    return None


def resolved_dns(settings: NetSettings, ifindex: int) -> list[IpAddress] | None:
    """systemd-resolved's servers for the link (else its global ones); None if unreachable.

    Link objects are /org/freedesktop/resolve1/link/_3<ifindex>: D-Bus object paths escape
    a leading digit, and "_3" + digit is that escape for any index.
    """
    link = _busctl_property(settings, f"/org/freedesktop/resolve1/link/_3{ifindex}",
                            "org.freedesktop.resolve1.Link", "DNS")
    if link is None:
        return None
    servers = [a for entry in link if isinstance(entry, list) and len(entry) == 2
               if (a := _from_bytes(entry[0], entry[1])) is not None]
    if servers:
        return list(dict.fromkeys(servers))
    every = _busctl_property(settings, "/org/freedesktop/resolve1",
                             "org.freedesktop.resolve1.Manager", "DNS") or []
    servers = [a for entry in every if isinstance(entry, list) and len(entry) == 3
               and entry[0] == 0 if (a := _from_bytes(entry[1], entry[2])) is not None]
    return list(dict.fromkeys(servers))


def resolv_conf_dns(settings: NetSettings) -> list[IpAddress]:
    """`nameserver` lines of /etc/resolv.conf (zone ids dropped), as the reference's script."""
    servers = []
    for raw in (read_text(settings.at("/etc/resolv.conf")) or "").splitlines():
        words = raw.split()
        if len(words) >= 2 and words[0] == "nameserver":
            address = _address(words[1])
            if address is not None:
                servers.append(address)
    return list(dict.fromkeys(servers))


def dns_servers(settings: NetSettings, iface: Interface, manager: Manager | None,
                has_addresses: bool) -> list[IpAddress]:
    """The link's DNS servers: resolved per link, else networkd's, else resolv.conf.

    resolv.conf is system-wide, so (like the reference, which only reads it per address)
    it is reported only for an interface that has an address at all.
    """
    if settings.live and settings.at("/run/systemd/resolve").is_dir():
        servers = resolved_dns(settings, iface.ifindex)
        if servers is not None:
            return servers
    if manager is not None and manager.name == NETWORKD and manager.state.get("DNS"):
        servers = [a for word in manager.state["DNS"].split()
                   if (a := _address(word)) is not None]
        if servers:
            return list(dict.fromkeys(servers))
    return resolv_conf_dns(settings) if has_addresses else []


# --------------------------------------------------------------------------- GET_IP_INFO


def get_ip_info(settings: NetSettings, adapter_id: str) -> tuple[int, LinkInfo | None]:
    """(status, configuration) of the adapter with MAC `adapter_id`.

    Several interfaces share a MAC when an SR-IOV virtual function backs a synthetic NIC;
    as in the current reference, the first one (by index) with an address is reported.
    """
    mac = normalize_mac(adapter_id)
    if mac is None or mac == ZERO_MAC:
        log.warning("GET_IP_INFO: adapter id %r is not a MAC address", adapter_id)
        return Status.INVALIDARG, None
    candidates = [i for i in list_interfaces(settings) if i.mac == mac]
    if not candidates:
        log.warning("GET_IP_INFO: no interface has MAC %s", mac)
        return Status.E_FAIL, None
    chosen, addresses = candidates[0], []
    for candidate in candidates:
        found = rtnl.addresses(candidate.ifindex)
        if found:
            chosen, addresses = candidate, found
            break
    manager = link_manager(settings, chosen)
    info = LinkInfo(
        addresses=tuple(ipaddress.ip_interface((a.address, a.prefixlen)) for a in addresses),
        gateways=tuple(ipaddress.ip_address(g.address)
                       for g in rtnl.default_gateways(chosen.ifindex)),
        dns=tuple(dns_servers(settings, chosen, manager, bool(addresses))),
        dhcp=dhcp_enabled(settings, manager),
    )
    log.debug("GET_IP_INFO %s: %s (managed by %s): %s", mac, chosen.name,
              manager.name if manager else "nothing", info)
    return Status.S_OK, info
