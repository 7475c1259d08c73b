"""The system side of GET_IP_INFO and SET_IP_INFO.

GET_IP_INFO: the adapter is found by MAC in sysfs, its addresses and default gateways come
from the kernel over rtnetlink (`kvpfs.host.rtnl`, the namespace kvpfs runs in), its DNS servers
from systemd-resolved for that link when resolved runs (else networkd's link state, else
/etc/resolv.conf), and "DHCP on" from whichever of NetworkManager, systemd-networkd,
ifupdown or network-scripts manages the link, read from their state files.

SET_IP_INFO: the adapter is found by VMBus instance GUID in sysfs, the host's tokens are
validated (`kvpfs.wire.ipinfo.parse_set`), and the configuration goes to the network manager
that owns the link: a NetworkManager keyfile loaded and activated with nmcli, or a
systemd-networkd .network file followed by `networkctl reload`; otherwise, like the
reference, `ifcfg-<if>` plus `<if>.nmconnection` handed to hv_set_ifconfig if installed.
Programs are run with argument lists, never a shell, each bounded by a timeout, and never
on the trio loop. The host's answer does not wait for them (`IpInfoService`): it comes once
the configuration is validated and written, and the activation runs afterwards, in the
background, because nmcli alone may take longer than the kernel's 30 s per request.

Every path is relative to a configurable root (`NetSettings`) so tests can use fake sysfs
trees, fake /run state and a scratch /etc; `--simulate` writes to a sandbox and runs
nothing.
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from kvpfs import compat
from kvpfs.host import rtnl
from kvpfs.wire import protocol
from kvpfs.wire.ipinfo import (
    InvalidArgument,
    IpAddress,
    LinkInfo,
    StaticConfig,
    build_get_reply,
    nm_connection_uuid,
    normalize_guid,
    normalize_mac,
    parse_set,
    render_ifcfg,
    render_networkd,
    render_nm_keyfile,
    safe_ifname,
)
from kvpfs.wire.protocol import Op, Status

log = logging.getLogger(__name__)

__all__ = [
    "ENV_COMMANDS",
    "ENV_OUTPUT",
    "ENV_ROOT",
    "ENV_SYSFS",
    "Interface",
    "IpInfoService",
    "Manager",
    "NetSettings",
    "get_ip_info",
    "link_manager",
    "list_interfaces",
    "set_ip_info",
]

ENV_SYSFS = "KVPFS_SYSFS_ROOT"
ENV_ROOT = "KVPFS_NET_ROOT"
ENV_OUTPUT = "KVPFS_NET_OUTPUT"
ENV_COMMANDS = "KVPFS_NET_COMMANDS"

NM_DIR = "/etc/NetworkManager/system-connections"
NM_DIRS = (NM_DIR, "/run/NetworkManager/system-connections",
           "/usr/lib/NetworkManager/system-connections")
NETWORKD_DIR = "/etc/systemd/network"
NETWORKD_DIRS = (NETWORKD_DIR, "/run/systemd/network", "/usr/local/lib/systemd/network",
                 "/usr/lib/systemd/network", "/lib/systemd/network")
STATE_DIR = "/var/lib/hyperv"  # where the reference writes ifcfg-<if> (KVP_CONFIG_LOC)
SET_IFCONFIG = "/usr/libexec/hypervkvpd/hv_set_ifconfig"
ZERO_MAC = "00:00:00:00:00:00"

NETWORKMANAGER = "NetworkManager"
NETWORKD = "systemd-networkd"
IFUPDOWN = "ifupdown"
NETWORK_SCRIPTS = "network-scripts"

_QUERY_TIMEOUT = 3.0
_TRUE = frozenset({"1", "yes", "true", "on"})
_SOURCE_DIRECTORY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NetSettings:
    """Where the system is: sysfs, the root for /etc and /run, and what may be changed.

    `root` is read (state files, resolv.conf, existing configuration, hv_set_ifconfig);
    `output` (default: `root`) is where configuration files are written.  Services are
    queried (busctl, nmcli) only when `root` is the real `/`: a fake root describes a
    system those programs know nothing about.  `run_commands` off means configuration is
    written but nmcli/networkctl/hv_set_ifconfig are only logged.
    """

    sysfs: Path = Path("/sys")
    root: Path = Path("/")
    output: Path | None = None
    run_commands: bool = True
    command_timeout: float = 10.0
    activation_wait: int = 15

    @classmethod
    def from_env(cls, *, simulate: bool = False, sandbox: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> NetSettings:
        """Defaults for a real guest; with `simulate`, never touch the machine's network.

        Under --simulate configuration goes to `sandbox` and no program is run unless the
        environment says otherwise (KVPFS_NET_OUTPUT, KVPFS_NET_COMMANDS=1): a developer's
        demo must not rewrite the developer's network.  KVPFS_SYSFS_ROOT and
        KVPFS_NET_ROOT point tests at fake trees.
        """
        env = os.environ if environ is None else environ
        root = Path(env.get(ENV_ROOT) or "/")
        output = env.get(ENV_OUTPUT)
        if output:
            out: Path | None = Path(output)
        elif simulate:
            out = sandbox if sandbox is not None else Path(tempfile.gettempdir()) / "kvpfs-net"
        else:
            out = None
        commands = env.get(ENV_COMMANDS)
        run = (commands in _TRUE) if commands else not simulate
        return cls(sysfs=Path(env.get(ENV_SYSFS) or "/sys"), root=root, output=out,
                   run_commands=run)

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    def at(self, path: str) -> Path:
        """`path` (absolute) as seen under `root`."""
        return self.root / path.lstrip("/")

    def out(self, path: str) -> Path:
        """`path` (absolute) where configuration is written."""
        return (self.output or self.root) / path.lstrip("/")


# --------------------------------------------------------------------------- interfaces


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str | None  # lower-case colon form, None if not an Ethernet-style address
    ifindex: int
    device_id: str | None  # VMBus instance GUID `{...}`, only for VMBus NICs


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def list_interfaces(settings: NetSettings) -> list[Interface]:
    """Every interface in `<sysfs>/class/net`, by interface index."""
    net = settings.sysfs / "class" / "net"
    try:
        names = os.listdir(net)
    except OSError as exc:
        log.warning("cannot list network interfaces in %s: %s", net, exc)
        return []
    found = []
    for name in names:
        entry = net / name
        mac_text = _read(entry / "address")
        guid_text = _read(entry / "device" / "device_id")
        try:
            ifindex = socket.if_nametoindex(name)  # the live namespace decides
        except OSError:
            text = _read(entry / "ifindex")
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


# --------------------------------------------------------------------------- programs


def _env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


def _query(settings: NetSettings, argv: Sequence[str]) -> str | None:
    """Output of a read-only query of a running service, or None (not live, missing, failed)."""
    if not settings.live or shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=_QUERY_TIMEOUT, env=_env(), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s failed: %s", shlex.join(argv), exc)
        return None
    if done.returncode != 0:
        log.debug("%s exited %d: %s", shlex.join(argv), done.returncode, done.stderr.strip())
        return None
    return done.stdout


def _run(settings: NetSettings, argv: Sequence[str], timeout: float | None = None) -> bool:
    """Run a program that changes the system; True on exit status 0."""
    command = shlex.join(argv)
    if not settings.run_commands:
        log.info("not running (network changes disabled here): %s", command)
        return True
    if shutil.which(argv[0]) is None:
        log.error("cannot run %s: %s is not installed", command, argv[0])
        return False
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout or settings.command_timeout,
                              env=_env(), check=False)
    except subprocess.TimeoutExpired:
        log.error("%s did not finish within %g s", command, timeout or settings.command_timeout)
        return False
    except OSError as exc:
        log.error("cannot run %s: %s", command, exc)
        return False
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        log.error("%s failed (exit status %d): %s", command, done.returncode,
                  " / ".join(detail) or "no output")
        return False
    log.info("ran %s", command)
    return True


# --------------------------------------------------------------------------- state files


def _key_values(text: str) -> dict[str, str]:
    """`KEY=value` lines (networkd link state, ifcfg); quotes around values removed."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key.strip()] = value
    return values


def _keyfile(text: str) -> configparser.ConfigParser:
    """A GKeyFile-style INI (NetworkManager): case-sensitive keys, `=` only, `#` comments."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",),
                                       comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def _systemd_values(paths: Sequence[Path], section: str, key: str) -> list[str]:
    """Every value of `key` in `[section]` across a unit file and its drop-ins, in order."""
    values = []
    for path in paths:
        text = _read(path)
        if text is None:
            continue
        current = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            name, sep, value = line.partition("=")
            if sep and current == section and name.strip() == key:
                values.append(value.strip())
    return values


@dataclass(frozen=True)
class Manager:
    """Who configures a link, and the handle to its configuration for that link."""

    name: str  # NETWORKMANAGER, NETWORKD, IFUPDOWN or NETWORK_SCRIPTS
    detail: str  # profile UUID, .network file, ifupdown stanza, or ifcfg path
    state: Mapping[str, str]


def _nm_state(settings: NetSettings, ifindex: int) -> dict[str, str] | None:
    """NetworkManager's per-device run state (/run/NetworkManager/devices/<ifindex>)."""
    text = _read(settings.at(f"/run/NetworkManager/devices/{ifindex}"))
    if text is None:
        return None
    try:
        parser = _keyfile(text)
    except configparser.Error:
        return None
    return dict(parser["device"]) if parser.has_section("device") else {}


def _networkd_state(settings: NetSettings, ifindex: int) -> dict[str, str] | None:
    text = _read(settings.at(f"/run/systemd/netif/links/{ifindex}"))
    return None if text is None else _key_values(text)


def _ifupdown_stanza(settings: NetSettings, name: str) -> str | None:
    """The stanza ifupdown brought `name` up with (`ifquery --state`), from /run/network."""
    text = _read(settings.at("/run/network/ifstate"))
    for line in (text or "").splitlines():
        iface, sep, stanza = line.strip().partition("=")
        if sep and iface == name:
            return stanza or name
    return None


def link_manager(settings: NetSettings, iface: Interface) -> Manager | None:
    """Which network manager configures `iface`, in the reference script's order."""
    nm = _nm_state(settings, iface.ifindex)
    if nm is not None and nm.get("managed", "").lower() in _TRUE:
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
        text = _read(settings.at(ifcfg))
        if text is not None:
            return Manager(NETWORK_SCRIPTS, ifcfg, _key_values(text))
    return None


# --------------------------------------------------------------------------- DHCP


def _nm_ipv4_method(settings: NetSettings, uuid: str) -> str | None:
    """ipv4.method of a NetworkManager profile: nmcli when live, else the keyfile itself."""
    if not uuid:
        return None
    answer = _query(settings, ["nmcli", "--get-values", "ipv4.method", "connection", "show",
                               "uuid", uuid])
    if answer is not None:
        return answer.strip()
    for directory in NM_DIRS:
        try:
            paths = sorted(settings.at(directory).glob("*.nmconnection"))
        except OSError:
            continue
        for path in paths:
            text = _read(path)
            if text is None or uuid not in text:
                continue
            try:
                parser = _keyfile(text)
            except configparser.Error:
                continue
            if parser.get("connection", "uuid", fallback="") == uuid:
                return parser.get("ipv4", "method", fallback="auto")
    return None


def _networkd_dhcp(settings: NetSettings, state: Mapping[str, str]) -> bool:
    """DHCP= of the link's .network file and its drop-ins (the last assignment wins)."""
    paths = [settings.at(state["NETWORK_FILE"])]
    paths += [settings.at(p) for p in shlex.split(state.get("NETWORK_FILE_DROPINS", ""))]
    values = _systemd_values(paths, "Network", "DHCP")
    return bool(values) and values[-1].lower() in _TRUE | {"ipv4", "both", "v4"}


def _ifupdown_files(settings: NetSettings) -> list[Path]:
    """/etc/network/interfaces and the files it pulls in with `source`/`source-directory`.

    `source-directory` takes only names made of letters, digits, `_` and `-`, as
    interfaces(5) says (so editor backups are skipped).
    """
    pending, seen = [settings.at("/etc/network/interfaces")], []
    while pending and len(seen) < 256:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.append(path)
        for raw in (_read(path) or "").splitlines():
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
        for raw in (_read(path) or "").splitlines():
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
                     name: str) -> list | None:
    answer = _query(settings, ["busctl", "--json=short", "get-property",
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
    for raw in (_read(settings.at("/etc/resolv.conf")) or "").splitlines():
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


# --------------------------------------------------------------------------- SET_IP_INFO


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text` (mode set before it appears): all or nothing on a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # replaces a symlink at `path`, never follows it
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    log.info("wrote %s (mode %04o)", path, mode)


@dataclass(frozen=True)
class Activation:
    """The programs that make a written configuration live, in order, each with its bound.

    Run after the host has its answer (`IpInfoService`): nmcli alone may take 25 s,
    and the kernel gives the whole request 30 s.
    """

    interface: str
    commands: tuple[tuple[tuple[str, ...], float], ...]

    @property
    def bound(self) -> float:
        return sum(timeout for _, timeout in self.commands)


def _apply_networkmanager(settings: NetSettings, iface: Interface, mac: str,
                          config: StaticConfig) -> tuple[int, Activation | None]:
    path = settings.out(NM_DIR) / f"hyperv-{iface.name}.nmconnection"
    _write_atomically(path, render_nm_keyfile(iface.name, mac, config), 0o600)
    uuid = nm_connection_uuid(mac)
    wait = settings.activation_wait
    return Status.S_OK, Activation(iface.name, (
        (("nmcli", "connection", "load", str(path)), settings.command_timeout),
        (("nmcli", "--wait", str(wait), "connection", "up", "uuid", uuid, "ifname",
          iface.name), wait + 5),
    ))


def _apply_networkd(settings: NetSettings, iface: Interface, mac: str, config: StaticConfig,
                    manager: Manager | None) -> tuple[int, Activation | None]:
    name = f"00-hyperv-{iface.name}.network"
    current = Path(manager.detail).name if manager and manager.name == NETWORKD else None
    if current is not None and current != name and current < name:
        # networkd uses the first matching file in lexical order.
        log.error("SET_IP_INFO: %s is configured by %s, which sorts before %s and would"
                  " keep precedence; not changing it", iface.name, manager.detail, name)
        return Status.E_FAIL, None
    path = settings.out(NETWORKD_DIR) / name
    _write_atomically(path, render_networkd(iface.name, mac, config), 0o644)
    return Status.S_OK, Activation(iface.name, (
        (("networkctl", "reload"), settings.command_timeout),
        (("networkctl", "reconfigure", iface.name), settings.command_timeout),
    ))


def _apply_script(settings: NetSettings, iface: Interface, mac: str, config: StaticConfig,
                  script: Path) -> tuple[int, Activation | None]:
    """The reference's interface: ifcfg-<if> and <if>.nmconnection, then the helper."""
    state = settings.out(STATE_DIR)
    ifcfg = state / f"ifcfg-{iface.name}"
    keyfile = state / f"{iface.name}.nmconnection"
    _write_atomically(ifcfg, render_ifcfg(iface.name, mac, config), 0o600)
    _write_atomically(keyfile, render_nm_keyfile(iface.name, mac, config), 0o600)
    return Status.S_OK, Activation(iface.name, (
        ((str(script), str(ifcfg), str(keyfile)), settings.command_timeout),
    ))


def _find_guid(settings: NetSettings, adapter_id: str) -> Interface | None:
    guid = normalize_guid(adapter_id)
    if guid is None:
        return None
    for iface in list_interfaces(settings):
        if iface.device_id == guid:
            return iface
    return None


def set_ip_info(settings: NetSettings, request: protocol.IpInfoRequest) -> int:
    """Apply a SET_IP_INFO and wait for its activation; the status of both.

    `IpInfoService` answers the host before activating instead (`prepare_set_ip_info`).
    """
    status, activation = prepare_set_ip_info(settings, request)
    if status != Status.S_OK or activation is None:
        return status
    return Status.S_OK if activate(settings, activation) else Status.E_FAIL


def activate(settings: NetSettings, activation: Activation) -> bool:
    """Run the activation's programs in order, stopping at the first failure (blocking)."""
    return all(_run(settings, argv, timeout) for argv, timeout in activation.commands)


async def activate_async(settings: NetSettings, activation: Activation) -> bool:
    """`activate` on the trio loop: a cancelled activation kills the program it runs."""
    for argv, timeout in activation.commands:
        if not await _run_async(settings, argv, timeout):
            return False
    return True


async def _run_async(settings: NetSettings, argv: Sequence[str], timeout: float) -> bool:
    """`_run` as a trio subprocess, so that cancellation (shutdown) terminates it."""
    command = shlex.join(argv)
    if not settings.run_commands:
        log.info("not running (network changes disabled here): %s", command)
        return True
    if await trio.to_thread.run_sync(shutil.which, argv[0]) is None:
        log.error("cannot run %s: %s is not installed", command, argv[0])
        return False
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(list(argv), stdin=subprocess.DEVNULL,
                                          capture_stdout=True, capture_stderr=True,
                                          env=_env(), check=False)
    except trio.TooSlowError:
        log.error("%s did not finish within %g s", command, timeout)
        return False
    except OSError as exc:
        log.error("cannot run %s: %s", command, exc)
        return False
    if done.returncode != 0:
        output = (done.stderr or done.stdout).decode("utf-8", "replace")
        detail = output.strip().splitlines()[-3:]
        log.error("%s failed (exit status %d): %s", command, done.returncode,
                  " / ".join(detail) or "no output")
        return False
    log.info("ran %s", command)
    return True


def prepare_set_ip_info(settings: NetSettings, request: protocol.IpInfoRequest
                        ) -> tuple[int, Activation | None]:
    """Validate a SET_IP_INFO and write its configuration; the status for the host and
    what is left to run to make it live (None when nothing is)."""
    iface = _find_guid(settings, request.adapter_id)
    if iface is None:
        log.warning("SET_IP_INFO: no network interface has VMBus id %r", request.adapter_id)
        return Status.GUID_NOTFOUND, None
    try:
        config = parse_set(request.ip_addr, request.sub_net, request.gate_way,
                           request.dns_addr, request.dhcp_enabled)
    except InvalidArgument as exc:
        log.warning("SET_IP_INFO for %s refused (HV_INVALIDARG): %s", iface.name, exc)
        return Status.INVALIDARG, None
    for note in config.notes:
        log.info("SET_IP_INFO for %s: %s", iface.name, note)
    if not safe_ifname(iface.name) or iface.mac is None or iface.mac == ZERO_MAC:
        log.error("SET_IP_INFO: interface %r (MAC %s) cannot be configured safely",
                  iface.name, iface.mac)
        return Status.E_FAIL, None
    manager = link_manager(settings, iface)
    script = settings.at(SET_IFCONFIG)
    log.info("SET_IP_INFO for %s (%s, managed by %s): dhcp=%s addresses=%s gateways=%s dns=%s",
             iface.name, iface.mac, manager.name if manager else "nothing", config.dhcp,
             [a.with_prefixlen for a in config.addresses],
             [str(g) for g in config.gateways], [str(d) for d in config.dns])
    if manager is not None and manager.name == NETWORKMANAGER:
        return _apply_networkmanager(settings, iface, iface.mac, config)
    if manager is not None and manager.name == NETWORKD:
        return _apply_networkd(settings, iface, iface.mac, config, manager)
    if os.access(script, os.X_OK):
        return _apply_script(settings, iface, iface.mac, config, script)
    log.error("SET_IP_INFO for %s: it is managed by %s, and kvpfs only configures"
              " NetworkManager and systemd-networkd links (or runs %s, not installed);"
              " answered HV_ERROR_NOT_SUPPORTED", iface.name,
              manager.name if manager else "no network manager", SET_IFCONFIG)
    return Status.ERROR_NOT_SUPPORTED, None


# --------------------------------------------------------------------------- the handler


class IpInfoService:
    """`DeviceServer`'s `ip_info=` handler: blocking work in worker threads.

    SET_IP_INFO is answered once the configuration is validated and written; making
    it live (nmcli, networkctl, hv_set_ifconfig: up to 25 s and more) runs afterwards
    in the nursery of `run`, one activation at a time in arrival order, and its
    outcome is logged. An answer that waited for it could reach the kernel after its
    30 s timeout and be taken as the reply to the host's next request.
    """

    def __init__(self, settings: NetSettings) -> None:
        self.settings = settings
        self._set_lock = trio.Lock()
        self._activation_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.activations_started = 0
        self.activations_succeeded = 0
        self.activations_failed = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own background activations until cancelled (which stops the one running)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def get_reply(self, request: protocol.IpInfoRequest) -> bytes:
        try:
            status, info = get_ip_info(self.settings, request.adapter_id)
        except OSError as exc:
            log.error("GET_IP_INFO for %s failed: %s", request.adapter_id, exc)
            return protocol.encode_status(Status.E_FAIL)
        if info is None:
            return protocol.encode_status(status)
        return build_get_reply(request.adapter_id, info)

    def prepare(self, request: protocol.IpInfoRequest) -> tuple[int, Activation | None]:
        try:
            return prepare_set_ip_info(self.settings, request)
        except OSError as exc:
            log.error("SET_IP_INFO for %s failed: %s", request.adapter_id, exc)
            return Status.E_FAIL, None

    async def __call__(self, request: protocol.IpInfoRequest) -> bytes:
        if request.op == Op.GET_IP_INFO:
            return await compat.to_thread_run_sync(self.get_reply, request,
                                                    abandon_on_cancel=True)
        async with self._set_lock:
            status, activation = await trio.to_thread.run_sync(self.prepare, request)
            if status == Status.S_OK and activation is not None:
                if self._nursery is None:
                    # Nobody runs `run` (a direct caller): activate before answering.
                    ok = await self._activate(activation)
                    status = Status.S_OK if ok else Status.E_FAIL
                else:
                    self._nursery.start_soon(self._activate, activation)
        return protocol.encode_status(status)

    async def _activate(self, activation: Activation) -> bool:
        self.activations_started += 1
        async with self._activation_lock:
            log.info("SET_IP_INFO for %s: activating (at most %g s)", activation.interface,
                     activation.bound)
            try:
                ok = await activate_async(self.settings, activation)
            except trio.Cancelled:
                log.warning("SET_IP_INFO for %s: activation cancelled by shutdown; the"
                            " configuration is written and applies at the next start of"
                            " its network manager", activation.interface)
                raise
        if ok:
            self.activations_succeeded += 1
            log.info("SET_IP_INFO for %s: configuration active", activation.interface)
        else:
            self.activations_failed += 1
            log.error("SET_IP_INFO for %s: the configuration was written but activating it"
                      " failed (see above); the host was already told S_OK",
                      activation.interface)
        return ok
