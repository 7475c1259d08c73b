"""SET_IP_INFO: the configuration files each network manager takes, and making them live.

The adapter is found by VMBus instance GUID, the host's tokens are validated
(`kvpfs.wire.ipinfo.parse_set`), and the configuration goes to the network manager that
owns the link: a NetworkManager keyfile loaded and activated with nmcli, or a
systemd-networkd .network file followed by `networkctl reload`; otherwise, like the
reference, `ifcfg-<if>` plus `<if>.nmconnection` handed to hv_set_ifconfig if installed.
Writing (`prepare_set_ip_info`) and activating (`activate`, `activate_async`) are separate
so that the host can be answered in between (`kvpfs.host.netconfig.IpInfoService`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kvpfs.host.netfiles import StagedFile, stage_file
from kvpfs.host.netlinks import (
    NETWORKD,
    NETWORKD_DIR,
    NETWORKMANAGER,
    NM_DIR,
    ZERO_MAC,
    Interface,
    Manager,
    find_by_guid,
    link_manager,
)
from kvpfs.host.netprograms import run, run_async
from kvpfs.host.netsettings import NetSettings
from kvpfs.wire import protocol
from kvpfs.wire.ipconfigfiles import render_ifcfg, render_networkd, render_nm_keyfile
from kvpfs.wire.ipinfo import (
    InvalidArgument,
    StaticConfig,
    nm_connection_uuid,
    parse_set,
    safe_ifname,
)
from kvpfs.wire.protocol import Status

log = logging.getLogger(__name__)

STATE_DIR = "/var/lib/hyperv"  # where the reference writes ifcfg-<if> (KVP_CONFIG_LOC)
SET_IFCONFIG = "/usr/libexec/hypervkvpd/hv_set_ifconfig"


@dataclass(frozen=True)
class Activation:
    """The programs that make a written configuration live, in order, each with its bound.

    Run after the host has its answer (`IpInfoService`): nmcli alone may take 25 s,
    and the kernel gives the whole request 30 s.
    """

    interface: str
    commands: tuple[tuple[tuple[str, ...], float], ...]
    files: tuple[StagedFile, ...] = ()

    def publish(self) -> None:
        """Put the staged files in place (blocking); first step of making it live."""
        for staged in self.files:
            staged.publish()

    def discard(self) -> None:
        """The host's answer was not delivered: leave the guest as it was (blocking)."""
        for staged in self.files:
            staged.discard()

    @property
    def bound(self) -> float:
        return sum(timeout for _, timeout in self.commands)


def _apply_networkmanager(settings: NetSettings, iface: Interface, mac: str,
                          config: StaticConfig) -> tuple[int, Activation | None]:
    path = settings.out(NM_DIR) / f"hyperv-{iface.name}.nmconnection"
    staged = stage_file(path, render_nm_keyfile(iface.name, mac, config), 0o600)
    uuid = nm_connection_uuid(mac)
    wait = settings.activation_wait
    return Status.S_OK, Activation(iface.name, (
        (("nmcli", "connection", "load", str(path)), settings.command_timeout),
        (("nmcli", "--wait", str(wait), "connection", "up", "uuid", uuid, "ifname",
          iface.name), wait + 5),
    ), (staged,))


def _apply_networkd(settings: NetSettings, iface: Interface, mac: str, config: StaticConfig,
                    manager: Manager | None) -> tuple[int, Activation | None]:
    name = f"00-hyperv-{iface.name}.network"
    if manager is not None and manager.name == NETWORKD and Path(manager.detail).name < name:
        # networkd uses the first matching file in lexical order.
        log.error("SET_IP_INFO: %s is configured by %s, which sorts before %s and would"
                  " keep precedence; not changing it", iface.name, manager.detail, name)
        return Status.E_FAIL, None
    path = settings.out(NETWORKD_DIR) / name
    staged = stage_file(path, render_networkd(iface.name, mac, config), 0o644)
    return Status.S_OK, Activation(iface.name, (
        (("networkctl", "reload"), settings.command_timeout),
        (("networkctl", "reconfigure", iface.name), settings.command_timeout),
    ), (staged,))


def _apply_script(settings: NetSettings, iface: Interface, mac: str, config: StaticConfig,
                  script: Path) -> tuple[int, Activation | None]:
    """The reference's interface: ifcfg-<if> and <if>.nmconnection, then the helper."""
    state = settings.out(STATE_DIR)
    ifcfg = state / f"ifcfg-{iface.name}"
    keyfile = state / f"{iface.name}.nmconnection"
    staged = (stage_file(ifcfg, render_ifcfg(iface.name, mac, config), 0o600),
              stage_file(keyfile, render_nm_keyfile(iface.name, mac, config), 0o600))
    return Status.S_OK, Activation(iface.name, (
        ((str(script), str(ifcfg), str(keyfile)), settings.command_timeout),
    ), staged)


def set_ip_info(settings: NetSettings, request: protocol.IpInfoRequest) -> int:
    """Apply a SET_IP_INFO and wait for its activation; the status of both.

    `IpInfoService` answers the host before activating instead (`prepare_set_ip_info`).
    """
    status, activation = prepare_set_ip_info(settings, request)
    if status != Status.S_OK or activation is None:
        return status
    activation.publish()
    return Status.S_OK if activate(settings, activation) else Status.E_FAIL


def activate(settings: NetSettings, activation: Activation) -> bool:
    """Run the activation's programs in order, stopping at the first failure (blocking)."""
    return all(run(settings, argv, timeout) for argv, timeout in activation.commands)


async def activate_async(settings: NetSettings, activation: Activation) -> bool:
    """`activate` on the trio loop: a cancelled activation kills the program it runs."""
    for argv, timeout in activation.commands:
        if not await run_async(settings, argv, timeout):
            return False
    return True


def prepare_set_ip_info(settings: NetSettings, request: protocol.IpInfoRequest
                        ) -> tuple[int, Activation | None]:
    """Validate a SET_IP_INFO and stage its configuration files; the status for the host
    and what is left to do to make it live (None when nothing is): publish the files,
    then run the programs."""
    iface = find_by_guid(settings, request.adapter_id)
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

