"""The three files a validated SET_IP_INFO is written as, rendered as pure text.

NetworkManager keyfile, systemd-networkd `.network`, and the reference daemon's `ifcfg-<if>`
for `hv_set_ifconfig`.  Only `StaticConfig` values reach this module, so every address in
the text was parsed by `kvpfs.wire.ipinfo` first.  Pure text, so tests feed it straight to
the real parsers (libnm's keyfile reader, systemd-networkd); writing the files and running
the managers is `kvpfs.host.netwriters`.
"""

from __future__ import annotations

from kvpfs.wire.ipinfo import StaticConfig, nm_connection_uuid

__all__ = ["EXTRA_GATEWAY_METRIC", "render_ifcfg", "render_networkd", "render_nm_keyfile"]

# Metric of the second, third... default gateway of one family.  Above NetworkManager's and
# systemd-networkd's defaults (100/20100, 0/1024), so the first gateway stays preferred.
EXTRA_GATEWAY_METRIC = 30000

_HEADER = "Written by kvpfs: the configuration the Hyper-V host injected (SET_IP_INFO)."


def _keyfile_value(text: str) -> str:
    """GKeyFile string escaping (only backslash can occur in the values written here)."""
    return text.replace("\\", "\\\\")


def render_nm_keyfile(ifname: str, mac: str, config: StaticConfig) -> str:
    """A NetworkManager keyfile profile bound to this interface name and MAC.

    IPv4 method: `auto` with DHCP, `manual` with addresses, else `disabled`; IPv6: `manual`
    with addresses, else `auto` (SLAAC) -- the reference's rules.  Unlike the reference,
    `gateway=` holds one address (a keyfile cannot hold more); further gateways become
    default routes with a higher metric.  DNS lists use the keyfile `;` separator.
    """
    lines = [
        f"# {_HEADER}",
        "[connection]",
        f"id=hyperv-{_keyfile_value(ifname)}",
        f"uuid={nm_connection_uuid(mac)}",
        "type=ethernet",
        f"interface-name={_keyfile_value(ifname)}",
        "autoconnect=true",
        "autoconnect-priority=100",
        "",
        "[ethernet]",
        f"mac-address={mac.upper()}",
    ]
    for version in (4, 6):
        addresses = config.addresses_v(version)
        gateways = config.gateways_v(version)
        dns = config.dns_v(version)
        if version == 4:
            method = "auto" if config.dhcp else ("manual" if addresses else "disabled")
        else:
            method = "manual" if addresses else "auto"
        lines += ["", f"[ipv{version}]", f"method={method}"]
        lines += [f"address{i}={a.with_prefixlen}" for i, a in enumerate(addresses, 1)]
        routes = gateways
        if gateways and addresses:
            lines.append(f"gateway={gateways[0]}")
            routes = gateways[1:]
        # NetworkManager refuses `gateway=` without a static address of its family (DHCP,
        # SLAAC): such a gateway becomes an explicit default route instead.
        default = "0.0.0.0/0" if version == 4 else "::/0"
        first = 1 if routes is not gateways else 0
        for i, gw in enumerate(routes, 1):
            rank = i - 1 + first
            lines.append(f"route{i}={default},{gw}"
                         + (f",{EXTRA_GATEWAY_METRIC + rank}" if rank else ""))
        if dns:
            lines.append("dns=" + "".join(f"{d};" for d in dns))
    return "\n".join(lines) + "\n"


def render_networkd(ifname: str, mac: str, config: StaticConfig) -> str:
    """A systemd-networkd .network file matching this interface by name and MAC.

    Matching on both keeps an SR-IOV virtual function (same MAC, other name) out.  Each
    gateway is a [Route]; one outside every configured subnet gets GatewayOnLink=yes, which
    networkd needs to install it (the other managers do this implicitly).
    """
    lines = [
        f"# {_HEADER}",
        "[Match]",
        f"Name={ifname}",
        f"MACAddress={mac.lower()}",
        "",
        "[Network]",
        f"DHCP={'ipv4' if config.dhcp else 'no'}",
    ]
    lines += [f"Address={a.with_prefixlen}" for a in config.addresses]
    lines += [f"DNS={d}" for d in config.dns]
    if config.addresses_v(6):
        lines.append("IPv6AcceptRA=no")  # static IPv6: the reference's `manual`
    seen: dict[int, int] = {}
    for gateway in config.gateways:
        rank = seen.get(gateway.version, 0)
        seen[gateway.version] = rank + 1
        lines += ["", "[Route]", f"Gateway={gateway}"]
        if not config.on_link(gateway):
            lines.append("GatewayOnLink=yes")
        if rank:
            lines.append(f"Metric={EXTRA_GATEWAY_METRIC + rank}")
    return "\n".join(lines) + "\n"


def render_ifcfg(ifname: str, mac: str, config: StaticConfig) -> str:
    """The reference's `ifcfg-<if>` for hv_set_ifconfig, key for key.

    Same names and numbering (IPADDR0.., NETMASK0.., GATEWAY, GATEWAY1.., IPV6ADDR,
    IPV6ADDR_1.., IPV6NETMASK.., IPV6_DEFAULTGW.., DNS1.. shared by both families) and IPv6
    written fully expanded, because existing hv_set_ifconfig scripts parse exactly this.
    Masks are normalised (dotted for IPv4, a prefix length for IPv6) whatever form the host
    used.
    """
    lines = [f"HWADDR={mac.upper()}", f"DEVICE={ifname}",
             f"BOOTPROTO={'dhcp' if config.dhcp else 'none'}"]

    def v6_suffix(index: int) -> str:
        return "" if index == 0 else f"_{index}"

    v4 = config.addresses_v(4)
    v6 = config.addresses_v(6)
    lines += [f"IPADDR{i}={a.ip}" for i, a in enumerate(v4)]
    lines += [f"IPV6ADDR{v6_suffix(i)}={a.ip.exploded}" for i, a in enumerate(v6)]
    lines += [f"NETMASK{i}={a.netmask}" for i, a in enumerate(v4)]
    lines += [f"IPV6NETMASK{v6_suffix(i)}={a.network.prefixlen}" for i, a in enumerate(v6)]
    lines += [f"GATEWAY{'' if i == 0 else i}={g}"
              for i, g in enumerate(config.gateways_v(4))]
    lines += [f"IPV6_DEFAULTGW{v6_suffix(i)}={g.exploded}"
              for i, g in enumerate(config.gateways_v(6))]
    lines += [f"DNS{i}={d.exploded if d.version == 6 else d}"
              for i, d in enumerate(config.dns, 1)]
    return "\n".join(lines) + "\n"
