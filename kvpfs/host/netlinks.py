"""Finding network links and the manager that configures each.

Links are read from sysfs (`<sysfs>/class/net`): name, MAC, interface index and, for a
VMBus NIC, its instance GUID (how SET_IP_INFO names the adapter). The manager that owns a
link is found from the managers' own run state, in the reference script's order:
NetworkManager, systemd-networkd, ifupdown, network-scripts.
"""

from __future__ import annotations

import configparser
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from kvpfs.host.netfiles import TRUE_WORDS, key_values, keyfile, read_text
from kvpfs.host.netsettings import NetSettings
from kvpfs.wire.ipinfo import normalize_guid, normalize_mac, safe_ifname

log = logging.getLogger(__name__)

ZERO_MAC = "00:00:00:00:00:00"

NETWORKMANAGER = "NetworkManager"
NETWORKD = "systemd-networkd"
IFUPDOWN = "ifupdown"
NETWORK_SCRIPTS = "network-scripts"

# Where the managers keep configuration (the first of each is where kvpfs writes).
NM_DIR = "/etc/NetworkManager/system-connections"
NM_DIRS = (NM_DIR, "/run/NetworkManager/system-connections",
           "/usr/lib/NetworkManager/system-connections")
NETWORKD_DIR = "/etc/systemd/network"


@dataclass(frozen=True)
class Interface:
    """A network link as sysfs shows it."""

    name: str
    mac: str | None  # lower-case colon form, None if not an Ethernet-style address
    ifindex: int
    device_id: str | None  # VMBus instance GUID `{...}`, only for VMBus NICs


def list_interfaces(settings: NetSettings) -> list[Interface]:
    """Every interface in `<sysfs>/class/net`, by interface index."""
    net = settings.sysfs / "class" / "net"
    try:
        names = os.listdir(net)
    except OSError as exc:
        log.warning("cannot list network interfaces in %s: %s", net, exc)
        return []
    found: list[Interface] = []
    for name in names:
        entry = net / name
        mac_text = read_text(entry / "address")
        guid_text = read_text(entry / "device" / "device_id")
        try:
            ifindex = socket.if_nametoindex(name)  # the live namespace decides
        except OSError:
            text = read_text(entry / "ifindex")
            if text is None or not text.isdigit():
                continue
            ifindex = int(text)
        found.append(Interface(
            name=name,
            mac=normalize_mac(mac_text) if mac_text else None,
            ifindex=ifindex,
            device_id=normalize_guid(guid_text) if guid_text else None,
        ))
    return sorted(found, key=lambda i: (i.ifindex, i.name))


def find_by_guid(settings: NetSettings, adapter_id: str) -> Interface | None:
    """The link whose VMBus instance GUID is `adapter_id` (SET_IP_INFO's adapter id)."""
    guid = normalize_guid(adapter_id)
    if guid is None:
        return None
    for iface in list_interfaces(settings):
        if iface.device_id == guid:
            return iface
    return None


@dataclass(frozen=True)
class Manager:
    """Who configures a link, and the handle to its configuration for that link."""

    name: str  # NETWORKMANAGER, NETWORKD, IFUPDOWN or NETWORK_SCRIPTS
    detail: str  # profile UUID, .network file, ifupdown stanza, or ifcfg path
    state: Mapping[str, str]


def _nm_state(settings: NetSettings, ifindex: int) -> dict[str, str] | None:
    """NetworkManager's per-device run state (/run/NetworkManager/devices/<ifindex>)."""
    text = read_text(settings.at(f"/run/NetworkManager/devices/{ifindex}"))
    if text is None:
        return None
    try:
        parser = keyfile(text)
    except configparser.Error:
        return None
    return dict(parser["device"]) if parser.has_section("device") else {}


def _networkd_state(settings: NetSettings, ifindex: int) -> dict[str, str] | None:
    text = read_text(settings.at(f"/run/systemd/netif/links/{ifindex}"))
    return None if text is None else key_values(text)


def _ifupdown_stanza(settings: NetSettings, name: str) -> str | None:
    """The stanza ifupdown brought `name` up with (`ifquery --state`), from /run/network."""
    text = read_text(settings.at("/run/network/ifstate"))
    for line in (text or "").splitlines():
        iface, sep, stanza = line.strip().partition("=")
        if sep and iface == name:
            return stanza or name
    return None


def link_manager(settings: NetSettings, iface: Interface) -> Manager | None:
    """Which network manager configures `iface`, in the reference script's order."""
    nm = _nm_state(settings, iface.ifindex)
    if nm is not None and nm.get("managed", "").lower() in TRUE_WORDS:
        return Manager(NETWORKMANAGER, nm.get("connection-uuid", ""), nm)
    networkd = _networkd_state(settings, iface.ifindex)
    if (networkd is not None and networkd.get("NETWORK_FILE")
            and networkd.get("ADMIN_STATE") != "unmanaged"):
        return Manager(NETWORKD, networkd["NETWORK_FILE"], networkd)
    stanza = _ifupdown_stanza(settings, iface.name)
    if stanza is not None:
        return Manager(IFUPDOWN, stanza, {})
    if safe_ifname(iface.name):
        ifcfg = f"/etc/sysconfig/network-scripts/ifcfg-{iface.name}"
        text = read_text(settings.at(ifcfg))
        if text is not None:
            return Manager(NETWORK_SCRIPTS, ifcfg, key_values(text))
    return None
