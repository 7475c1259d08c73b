"""GET_IP_INFO / SET_IP_INFO without a network: tokens, reply layout, configuration files.

`kvpfs.wire.ipinfo` is pure and tested directly.  `kvpfs.host.netconfig` and the net*
modules it uses are tested against fake sysfs trees and a fake root (/etc, /run,
/usr/libexec), with fake nmcli/networkctl/busctl/hv_set_ifconfig programs on PATH that
record their argument lists -- interface names here (hv0...) do not exist in the test's
namespace, so nothing real is touched.  Generated
NetworkManager keyfiles are parsed by libnm itself (tests/support/nmkeyfile.py, system
Python).  The service run by a DeviceServer against the simulated host is tested in
tests/store/test_ipinfo_service.py; the namespace tests with real interfaces are in
tests/process/test_ipinfo_netns.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import textwrap
from ipaddress import ip_address, ip_interface
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpfs.host import (
    netconfig,
    netfiles,
    netlinks,
    netprograms,
    netsettings,
    netstate,
    netwriters,
)
from kvpfs.host.netsettings import NetSettings
from kvpfs.wire import ipconfigfiles, ipinfo, kernelside, protocol
from kvpfs.wire.ipinfo import InvalidArgument, LinkInfo, StaticConfig, parse_set
from kvpfs.wire.protocol import Status
from tests.support.fakenet import GUIDS, NM_UUID, FakeSystem, set_request, write

SYSTEM_PYTHON = "/usr/bin/python3"
NMKEYFILE = Path(__file__).resolve().parents[1] / "support" / "nmkeyfile.py"
MAC = "00:15:5d:00:20:01"


def libnm_missing() -> str | None:
    """Why libnm's keyfile reader cannot be used, or None."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('NM', '1.0');"
                              " from gi.repository import NM; NM.keyfile_read"],
        capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return "libnm for Python missing (Debian packages python3-gi gir1.2-nm-1.0)"
    return None


_LIBNM_MISSING = libnm_missing()
requires_libnm = pytest.mark.skipif(
    _LIBNM_MISSING is not None and os.environ.get("CI") != "true",
    reason=str(_LIBNM_MISSING))


def nm_parse(*texts: str) -> list[dict]:
    """NetworkManager's verdict on each keyfile text (see tests/support/nmkeyfile.py)."""
    done = subprocess.run([SYSTEM_PYTHON, str(NMKEYFILE)], input=json.dumps(list(texts)),
                          capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("text", "expected"), [
    ("00:15:5D:0A:0B:0C", "00:15:5d:0a:0b:0c"),
    ("00:15:5d:0a:0b:0c", "00:15:5d:0a:0b:0c"),
    (" 00-15-5D-0A-0B-0C ", "00:15:5d:0a:0b:0c"),
    ("00:15:5D:0A:0B", None),
    ("00:15:5D:0A:0B:0C:0D", None),
    ("00:15-5D:0A:0B:0C", None),
    ("00155D0A0B0C", None),
    ("00:15:5D:0A:0B:0G", None),
    ("", None),
])
def test_normalize_mac(text: str, expected: str | None) -> None:
    assert ipinfo.normalize_mac(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("{F8615163-DF3E-46C5-913F-F2D2F965ED0E}", "{f8615163-df3e-46c5-913f-f2d2f965ed0e}"),
    ("f8615163-df3e-46c5-913f-f2d2f965ed0e", "{f8615163-df3e-46c5-913f-f2d2f965ed0e}"),
    ("{f8615163-df3e-46c5-913f-f2d2f965ed0}", None),
    ("{f8615163df3e46c5913ff2d2f965ed0e}", None),
    ("../../etc/passwd", None),
])
def test_normalize_guid(text: str, expected: str | None) -> None:
    assert ipinfo.normalize_guid(text) == expected


def test_safe_ifname() -> None:
    for good in ("eth0", "enP12345s1", "ens33", "vlan.100", "br-lan", "wg@x"):
        assert ipinfo.safe_ifname(good)
    for bad in ("", "a" * 16, "-x", "eth0\n", "a b", "a/b", "e*", "e[0]", "a\\b", "é"):
        assert not ipinfo.safe_ifname(bad)


# --------------------------------------------------------------------------- GET replies

FULL = LinkInfo(
    addresses=(ip_interface("192.0.2.10/24"), ip_interface("198.51.100.7/25"),
               ip_interface("2001:db8::10/64"), ip_interface("fe80::215:5dff:fe00:2001/64")),
    gateways=(ip_address("192.0.2.1"), ip_address("2001:db8::1")),
    dns=(ip_address("192.0.2.53"), ip_address("2001:db8::53")),
    dhcp=True,
)


def test_reply_fields_follow_the_reference_layout() -> None:
    fields = ipinfo.ip_fields(FULL)
    assert fields == ipinfo.IpFields(
        addr_family=3, dhcp_enabled=1,
        ip_addr="192.0.2.10;198.51.100.7;2001:db8::10;fe80::215:5dff:fe00:2001",
        sub_net="255.255.255.0;255.255.255.128;/64;/64",
        gate_way="192.0.2.1;2001:db8::1;",
        dns_addr="192.0.2.53;2001:db8::53;",
    )


def test_reply_fields_family_bits_and_empty() -> None:
    assert ipinfo.ip_fields(LinkInfo()) == ipinfo.IpFields(0, 0, "", "", "", "")
    v6 = ipinfo.ip_fields(LinkInfo(addresses=(ip_interface("2001:db8::1/48"),)))
    assert (v6.addr_family, v6.sub_net) == (2, "/48")
    v4 = ipinfo.ip_fields(LinkInfo(addresses=(ip_interface("10.1.2.3/8"),)))
    assert (v4.addr_family, v4.sub_net) == (1, "255.0.0.0")


def test_reply_fields_never_overflow_and_stay_aligned() -> None:
    many = tuple(ip_interface(f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}/128")
                 for i in range(1, 200))
    gateways = tuple(ip_address(f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}") for i in range(40))
    fields = ipinfo.ip_fields(LinkInfo(addresses=many, gateways=gateways, dns=gateways * 2))
    assert len(fields.ip_addr) <= ipinfo.IP_ADDR_LIMIT
    assert len(fields.sub_net) <= ipinfo.SUB_NET_LIMIT
    assert len(fields.gate_way) <= ipinfo.GATE_WAY_LIMIT
    assert len(fields.dns_addr) <= ipinfo.DNS_ADDR_LIMIT
    ips, masks = fields.ip_addr.split(";"), fields.sub_net.split(";")
    assert len(ips) == len(masks) and masks == ["/128"] * len(ips)
    assert all(ip_address(ip) in {a.ip for a in many} for ip in ips)  # whole entries only
    assert fields.gate_way.endswith(";") and all(fields.gate_way[:-1].split(";"))
    assert fields.dropped > 0
    # What does fit is kept, in order.
    assert ips == [str(a.ip) for a in many[:len(ips)]]


def test_get_reply_bytes_round_trip() -> None:
    buf = ipinfo.build_get_reply("00:15:5D:00:20:01", FULL)
    reply = kernelside.decode_ip_info_reply(buf)
    assert reply == kernelside.IpInfoReply(
        status=0, adapter_id=b"00:15:5D:00:20:01", addr_family=3, dhcp_enabled=1,
        ip_addr=b"192.0.2.10;198.51.100.7;2001:db8::10;fe80::215:5dff:fe00:2001",
        sub_net=b"255.255.255.0;255.255.255.128;/64;/64",
        gate_way=b"192.0.2.1;2001:db8::1;", dns_addr=b"192.0.2.53;2001:db8::53;")


def test_decode_ip_info_reply_of_a_status() -> None:
    reply = kernelside.decode_ip_info_reply(protocol.encode_status(Status.E_FAIL))
    assert reply.status == Status.E_FAIL and reply.ip_addr == b""


# --------------------------------------------------------------------------- SET parsing


def test_parse_set_full() -> None:
    config = parse_set(" 192.0.2.10; 2001:DB8::10 ;198.51.100.7;", "255.255.255.0;64;/25",
                       "192.0.2.1;2001:db8::1;192.0.2.1", "192.0.2.53;2001:db8::53", 0)
    assert config == StaticConfig(
        dhcp=False,
        addresses=(ip_interface("192.0.2.10/24"), ip_interface("2001:db8::10/64"),
                   ip_interface("198.51.100.7/25")),
        gateways=(ip_address("192.0.2.1"), ip_address("2001:db8::1")),  # duplicate folded
        dns=(ip_address("192.0.2.53"), ip_address("2001:db8::53")),
    )


@pytest.mark.parametrize(("mask", "prefix"), [
    ("255.255.255.0", 24), ("24", 24), ("/24", 24), ("255.255.255.255", 32),
    ("128.0.0.0", 1), ("255.255.254.0", 23),
])
def test_parse_set_ipv4_mask_forms(mask: str, prefix: int) -> None:
    config = parse_set("10.1.2.3", mask, "", "", 0)
    assert config.addresses[0].network.prefixlen == prefix


@pytest.mark.parametrize(("mask", "prefix"), [
    ("64", 64), ("/64", 64), ("128", 128), ("ffff:ffff:ffff:ffff::", 64), ("1", 1),
])
def test_parse_set_ipv6_mask_forms(mask: str, prefix: int) -> None:
    assert parse_set("2001:db8::5", mask, "", "", 0).addresses[0].network.prefixlen == prefix


def test_parse_set_dhcp_and_empty() -> None:
    assert parse_set("", "", "", "", 1) == StaticConfig(dhcp=True)
    assert parse_set(";;", " ; ", "", "", 0) == StaticConfig(dhcp=False)
    # With DHCP an IPv4 gateway/DNS without a static address is fine (extra routes/servers).
    config = parse_set("", "", "192.0.2.1", "192.0.2.53", 1)
    assert config.gateways == (ip_address("192.0.2.1"),)
    # An IPv6 gateway with SLAAC only is allowed but noted.
    assert parse_set("", "", "2001:db8::1", "", 0).notes


# Every entry: (ip_addr, sub_net, gate_way, dns_addr, dhcp, part of the message).
MALFORMED = {
    "bad octet": ("300.1.1.1", "255.255.255.0", "", "", 0, "not an IPv4 or IPv6"),
    "short IPv4": ("192.0.2", "255.255.255.0", "", "", 0, "not an IPv4 or IPv6"),
    "leading zero": ("192.0.2.010", "255.255.255.0", "", "", 0, "not an IPv4 or IPv6"),
    "word": ("localhost", "255.255.255.0", "", "", 0, "not an IPv4 or IPv6"),
    "cidr in address": ("192.0.2.10/24", "255.255.255.0", "", "", 0, "not an IPv4 or IPv6"),
    "zone id": ("fe80::1%eth0", "64", "", "", 0, "not an IPv4 or IPv6"),
    "bad IPv6": ("2001:db8:::1", "64", "", "", 0, "not an IPv4 or IPv6"),
    "shell": ("192.0.2.10$(touch /tmp/kvpfs-pwned)", "24", "", "", 0, "not an IPv4 or IPv6"),
    "newline": ("192.0.2.10\nIPADDR1=1.1.1.1", "24", "", "", 0, "not an IPv4 or IPv6"),
    "unspecified": ("0.0.0.0", "255.0.0.0", "", "", 0, "not a unicast"),
    "unspecified6": ("::", "64", "", "", 0, "not a unicast"),
    "loopback": ("127.0.0.1", "255.0.0.0", "", "", 0, "not a unicast"),
    "multicast": ("224.0.0.1", "255.255.255.0", "", "", 0, "not a unicast"),
    "multicast6": ("ff02::1", "64", "", "", 0, "not a unicast"),
    "broadcast": ("255.255.255.255", "255.255.255.0", "", "", 0, "not a unicast"),
    "class E": ("240.0.0.1", "255.255.255.0", "", "", 0, "not a unicast"),
    "mapped": ("::ffff:192.0.2.1", "64", "", "", 0, "IPv4-mapped"),
    "mask holes": ("192.0.2.10", "255.0.255.0", "", "", 0, "not contiguous"),
    "mask zero": ("192.0.2.10", "0.0.0.0", "", "", 0, "outside 1..32"),
    "prefix 33": ("192.0.2.10", "33", "", "", 0, "outside 1..32"),
    "prefix 129": ("2001:db8::1", "/129", "", "", 0, "outside 1..128"),
    "prefix 0": ("2001:db8::1", "0", "", "", 0, "outside 1..128"),
    "mask word": ("192.0.2.10", "class-c", "", "", 0, "neither a mask nor"),
    "mask sign": ("192.0.2.10", "+24", "", "", 0, "neither a mask nor"),
    "v6 mask on v4": ("192.0.2.10", "ffff::", "", "", 0, "not an IPv4 mask"),
    "v4 mask on v6": ("2001:db8::1", "255.255.255.0", "", "", 0, "not an IPv6 mask"),
    "mask missing": ("192.0.2.10;192.0.2.11", "255.255.255.0", "", "", 0, "2 address(es)"),
    "extra mask": ("192.0.2.10", "255.255.255.0;64", "", "", 0, "1 address(es) but 2"),
    "mask without address": ("", "255.255.255.0", "", "", 0, "0 address(es)"),
    "address twice": ("192.0.2.10;192.0.2.10", "24;25", "", "", 0, "given twice"),
    "bad gateway": ("192.0.2.10", "24", "192.0.2.256", "", 0, "gateway '192.0.2.256'"),
    "gateway word": ("192.0.2.10", "24", "router", "", 0, "gateway 'router'"),
    "gateway multicast": ("192.0.2.10", "24", "224.0.0.1", "", 0, "not a unicast"),
    "gateway is us": ("192.0.2.10", "24", "192.0.2.10", "", 0, "own addresses"),
    "v4 gw no v4": ("2001:db8::10", "64", "192.0.2.1", "", 0, "no IPv4 address and no DHCP"),
    "bad dns": ("192.0.2.10", "24", "", "8.8.8", 0, "DNS server '8.8.8'"),
    "dns hostname": ("192.0.2.10", "24", "", "dns.example", 0, "DNS server"),
    "dns loopback": ("192.0.2.10", "24", "", "127.0.0.53", 0, "not a unicast"),
    "v4 dns no v4": ("2001:db8::10", "64", "", "192.0.2.53", 0, "no IPv4 address and no"),
    "dhcp 2": ("", "", "", "", 2, "dhcp_enabled is 2"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_parse_set_refuses_malformed_tokens(case: str) -> None:
    *args, message = MALFORMED[case]
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_set(*args)


# --------------------------------------------------------------------------- rendering

EXAMPLE = parse_set("192.0.2.10;2001:db8::10;198.51.100.7", "255.255.255.0;64;25",
                    "192.0.2.1;2001:db8::1;203.0.113.1", "192.0.2.53;2001:db8::53", 0)


def test_render_ifcfg_is_the_reference_format() -> None:
    assert ipconfigfiles.render_ifcfg("eth0", MAC, EXAMPLE) == textwrap.dedent("""\
        HWADDR=00:15:5D:00:20:01
        DEVICE=eth0
        BOOTPROTO=none
        IPADDR0=192.0.2.10
        IPADDR1=198.51.100.7
        IPV6ADDR=2001:0db8:0000:0000:0000:0000:0000:0010
        NETMASK0=255.255.255.0
        NETMASK1=255.255.255.128
        IPV6NETMASK=64
        GATEWAY=192.0.2.1
        GATEWAY1=203.0.113.1
        IPV6_DEFAULTGW=2001:0db8:0000:0000:0000:0000:0000:0001
        DNS1=192.0.2.53
        DNS2=2001:0db8:0000:0000:0000:0000:0000:0053
        """)
    dhcp = ipconfigfiles.render_ifcfg("eth1", MAC, parse_set("", "", "", "", 1))
    assert dhcp == "HWADDR=00:15:5D:00:20:01\nDEVICE=eth1\nBOOTPROTO=dhcp\n"


def test_render_networkd() -> None:
    text = ipconfigfiles.render_networkd("eth0", MAC, EXAMPLE)
    assert text.split("\n", 1)[1] == textwrap.dedent("""\
        [Match]
        Name=eth0
        MACAddress=00:15:5d:00:20:01

        [Network]
        DHCP=no
        Address=192.0.2.10/24
        Address=2001:db8::10/64
        Address=198.51.100.7/25
        DNS=192.0.2.53
        DNS=2001:db8::53
        IPv6AcceptRA=no

        [Route]
        Gateway=192.0.2.1

        [Route]
        Gateway=2001:db8::1

        [Route]
        Gateway=203.0.113.1
        GatewayOnLink=yes
        Metric=30001
        """)
    assert text.startswith("# ")
    dhcp = ipconfigfiles.render_networkd("eth1", MAC, parse_set("", "", "", "", 1))
    assert "DHCP=ipv4\n" in dhcp and "[Route]" not in dhcp and "IPv6AcceptRA" not in dhcp


@requires_libnm
def test_nm_keyfile_is_accepted_by_libnm_as_is() -> None:
    (parsed,) = nm_parse(ipconfigfiles.render_nm_keyfile("eth0", MAC, EXAMPLE))
    assert parsed == {
        "warnings": [], "ok": True, "id": "hyperv-eth0", "uuid": ipinfo.nm_connection_uuid(MAC),
        "type": "802-3-ethernet", "interface_name": "eth0", "mac": "00:15:5D:00:20:01",
        "autoconnect": True,
        "ipv4": {"method": "manual", "addresses": ["192.0.2.10/24", "198.51.100.7/25"],
                 "gateway": "192.0.2.1", "dns": ["192.0.2.53"],
                 "routes": [["0.0.0.0/0", "203.0.113.1", 30001]]},
        "ipv6": {"method": "manual", "addresses": ["2001:db8::10/64"],
                 "gateway": "2001:db8::1", "dns": ["2001:db8::53"], "routes": []},
    }


VALID_SETS = {
    "v4 only": ("192.0.2.10", "255.255.255.0", "192.0.2.1", "192.0.2.53", 0),
    "v6 only": ("2001:db8::10", "64", "fe80::1", "2001:db8::53", 0),
    "dhcp": ("", "", "", "", 1),
    "dhcp + gateway + dns": ("", "", "192.0.2.1;192.0.2.2", "192.0.2.53", 1),
    "dhcp + static v6": ("2001:db8::10", "/64", "2001:db8::1", "2001:db8::53", 1),
    "nothing": ("", "", "", "", 0),
    "slaac gateway": ("", "", "2001:db8::1", "2001:db8::53", 0),
    "/32 off-link gw": ("192.0.2.10", "255.255.255.255", "198.51.100.1", "", 0),
    "many": (";".join(f"10.0.{i}.1" for i in range(20)), ";".join(["16"] * 20),
             "10.0.0.254;10.0.1.254", "10.0.0.53;10.0.0.54;10.0.0.55", 0),
}


@requires_libnm
def test_every_valid_set_gives_a_keyfile_libnm_accepts() -> None:
    configs = {name: parse_set(*args) for name, args in VALID_SETS.items()}
    texts = [ipconfigfiles.render_nm_keyfile("eth0", MAC, c) for c in configs.values()]
    for (name, config), parsed in zip(configs.items(), nm_parse(*texts), strict=True):
        assert parsed["ok"] and parsed["warnings"] == [], (name, parsed)
        got = [a for v in ("ipv4", "ipv6") for a in parsed[v]["addresses"]]
        assert sorted(got) == sorted(a.with_prefixlen for a in config.addresses), name
        routes = [r[1] for v in ("ipv4", "ipv6") for r in parsed[v]["routes"]]
        gateways = [parsed[v]["gateway"] for v in ("ipv4", "ipv6") if parsed[v]["gateway"]]
        assert sorted(gateways + routes) == sorted(str(g) for g in config.gateways), name
        dns = parsed["ipv4"]["dns"] + parsed["ipv6"]["dns"]
        assert sorted(dns) == sorted(str(d) for d in config.dns), name
        assert parsed["ipv4"]["method"] == (
            "auto" if config.dhcp else "manual" if config.addresses_v(4) else "disabled")


# --------------------------------------------------------------------------- fake system


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    system = FakeSystem(tmp_path)
    monkeypatch.setenv("PATH", f"{system.bin}{os.pathsep}{os.environ['PATH']}")
    return system


def iface(fake: FakeSystem, name: str) -> netlinks.Interface:
    return next(i for i in netlinks.list_interfaces(fake.settings()) if i.name == name)


def test_interfaces_from_sysfs(fake: FakeSystem) -> None:
    found = netlinks.list_interfaces(fake.settings())
    assert [(i.name, i.ifindex, i.mac, i.device_id) for i in found] == [
        ("lo", 1, "00:00:00:00:00:00", None),
        ("hv0", 101, "00:15:5d:00:20:01", GUIDS["hv0"]),
        ("hv1", 102, "00:15:5d:00:20:02", GUIDS["hv1"]),
        ("hv2", 103, "00:15:5d:00:20:03", GUIDS["hv2"]),
        ("hv3", 104, "00:15:5d:00:20:04", GUIDS["hv3"]),
    ]


def test_manager_and_dhcp_detection(fake: FakeSystem) -> None:
    settings = fake.settings()
    managers = {name: netlinks.link_manager(settings, iface(fake, name)) for name in GUIDS}
    assert {n: (m.name, m.detail) if m else None for n, m in managers.items()} == {
        "hv0": ("NetworkManager", NM_UUID),
        "hv1": ("systemd-networkd", "/etc/systemd/network/50-hv1.network"),
        "hv2": ("ifupdown", "hv2"),
        "hv3": None,
    }
    assert {n: netstate.dhcp_enabled(settings, m) for n, m in managers.items()} == {
        "hv0": True, "hv1": True, "hv2": True, "hv3": False}
    # A networkd drop-in has the last word; NetworkManager's manual method is not DHCP.
    write(fake.root / "etc/systemd/network/50-hv1.network.d/static.conf",
          "[Network]\nDHCP=no\n")
    state = fake.root / "run/systemd/netif/links/102"
    state.write_text(state.read_text() + 'NETWORK_FILE_DROPINS="/etc/systemd/network/'
                     '50-hv1.network.d/static.conf"\n')
    keyfile = fake.root / "etc/NetworkManager/system-connections/Wired.nmconnection"
    keyfile.write_text(keyfile.read_text().replace("method=auto", "method=manual"))
    write(fake.root / "etc/sysconfig/network-scripts/ifcfg-hv3", 'BOOTPROTO="dhcp"\n')
    managers = {name: netlinks.link_manager(settings, iface(fake, name)) for name in GUIDS}
    assert managers["hv3"] is not None and managers["hv3"].name == "network-scripts"
    assert {n: netstate.dhcp_enabled(settings, m) for n, m in managers.items()} == {
        "hv0": False, "hv1": False, "hv2": True, "hv3": True}


def test_dns_sources(fake: FakeSystem) -> None:
    settings = fake.settings()
    hv1, hv3 = iface(fake, "hv1"), iface(fake, "hv3")
    networkd = netlinks.link_manager(settings, hv1)
    assert netstate.dns_servers(settings, hv1, networkd, True) == [
        ip_address("192.0.2.54"), ip_address("2001:db8::54")]
    # resolv.conf: valid nameservers, zone ids dropped; only for a link with addresses.
    assert netstate.dns_servers(settings, hv3, None, True) == [
        ip_address("192.0.2.53"), ip_address("fe80::53")]
    assert netstate.dns_servers(settings, hv3, None, False) == []


def test_resolved_dns_per_link_then_global(fake: FakeSystem) -> None:
    live = NetSettings(sysfs=fake.sysfs)  # busctl is only asked about the real system
    link = json.dumps({"type": "a(iay)", "data": [[2, [192, 0, 2, 99]],
                                                   [10, [32, 1, 13, 184] + [0] * 11 + [1]]]})
    fake.fake_program("busctl", stdout=link)
    assert netstate.resolved_dns(live, 7) == [ip_address("192.0.2.99"),
                                                ip_address("2001:db8::1")]
    assert fake.recorded()[0] == [
        "busctl", "--json=short", "get-property", "org.freedesktop.resolve1",
        "/org/freedesktop/resolve1/link/_37", "org.freedesktop.resolve1.Link", "DNS"]
    fake.fake_program("busctl", stdout=json.dumps({"type": "a(iay)", "data": []}))
    assert netstate.resolved_dns(live, 12) == []
    fake.fake_program("busctl", status=1)
    assert netstate.resolved_dns(live, 12) is None


# --------------------------------------------------------------------------- SET_IP_INFO


def test_set_unknown_adapter(fake: FakeSystem) -> None:
    settings = fake.settings()
    for guid in ("{99999999-2222-3333-4444-000000000001}", "not-a-guid", ""):
        assert netwriters.set_ip_info(settings, set_request(guid, "192.0.2.10", "24")) \
            == Status.GUID_NOTFOUND
    assert fake.written() == [] and fake.recorded() == []


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_set_malformed_writes_nothing(fake: FakeSystem, case: str) -> None:
    fake.fake_program("nmcli")
    ip, mask, gw, dns, dhcp, _ = MALFORMED[case]
    request = set_request(GUIDS["hv0"], ip, mask, gw, dns, dhcp)
    assert netwriters.set_ip_info(fake.settings(), request) == Status.INVALIDARG
    assert fake.written() == [] and fake.recorded() == []
    assert not Path("/tmp/kvpfs-pwned").exists()


def test_set_networkmanager(fake: FakeSystem) -> None:
    fake.fake_program("nmcli")
    request = set_request(GUIDS["hv0"].upper(), "192.0.2.10;2001:db8::10", "255.255.255.0;64",
                          "192.0.2.1", "192.0.2.53")
    assert netwriters.set_ip_info(fake.settings(), request) == Status.S_OK
    path = fake.out / "etc/NetworkManager/system-connections/hyperv-hv0.nmconnection"
    assert fake.written() == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = parse_set("192.0.2.10;2001:db8::10", "255.255.255.0;64", "192.0.2.1",
                       "192.0.2.53", 0)
    assert path.read_text() == ipconfigfiles.render_nm_keyfile("hv0", "00:15:5d:00:20:01",
                                                               config)
    uuid = ipinfo.nm_connection_uuid("00:15:5d:00:20:01")
    assert fake.recorded() == [
        ["nmcli", "connection", "load", str(path)],
        ["nmcli", "--wait", "3", "connection", "up", "uuid", uuid, "ifname", "hv0"],
    ]
    # A second SET replaces the same profile (same file, same UUID).
    assert netwriters.set_ip_info(fake.settings(), set_request(GUIDS["hv0"], dhcp=1)) == 0
    assert fake.written() == [path] and "method=auto" in path.read_text()
    assert f"uuid={uuid}\n" in path.read_text()


@pytest.mark.log_errors('nmcli connection load')
def test_set_networkmanager_failures(fake: FakeSystem) -> None:
    request = set_request(GUIDS["hv0"], "192.0.2.10", "24")
    fake.fake_program("nmcli", status=4)
    assert netwriters.set_ip_info(fake.settings(), request) == Status.E_FAIL
    fake.fake_program("nmcli", sleep=5)
    assert netwriters.set_ip_info(fake.settings(timeout=0.3), request) == Status.E_FAIL
    (fake.bin / "nmcli").unlink()
    monkey_path = os.environ["PATH"]
    try:
        os.environ["PATH"] = str(fake.bin)
        assert netwriters.set_ip_info(fake.settings(), request) == Status.E_FAIL  # no nmcli
    finally:
        os.environ["PATH"] = monkey_path
    # Without permission to run programs the file is written and the run only logged.
    calls = len(fake.recorded())
    assert netwriters.set_ip_info(fake.settings(run=False), request) == Status.S_OK
    assert len(fake.recorded()) == calls


def test_set_networkd(fake: FakeSystem) -> None:
    fake.fake_program("networkctl")
    request = set_request(GUIDS["hv1"], "192.0.2.20", "255.255.255.0", "192.0.2.1",
                          "192.0.2.53", 0)
    assert netwriters.set_ip_info(fake.settings(), request) == Status.S_OK
    path = fake.out / "etc/systemd/network/00-hyperv-hv1.network"
    assert fake.written() == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "Address=192.0.2.20/24\n" in path.read_text()
    assert fake.recorded() == [["networkctl", "reload"], ["networkctl", "reconfigure", "hv1"]]


@pytest.mark.log_errors('would keep precedence')
def test_set_networkd_refuses_when_another_file_wins(fake: FakeSystem) -> None:
    fake.fake_program("networkctl")
    state = fake.root / "run/systemd/netif/links/102"
    state.write_text(state.read_text().replace("50-hv1", "00-aaa"))
    request = set_request(GUIDS["hv1"], "192.0.2.20", "24")
    assert netwriters.set_ip_info(fake.settings(), request) == Status.E_FAIL
    assert fake.written() == [] and fake.recorded() == []


@pytest.mark.log_errors('SET_IP_INFO for hv2', 'hv_set_ifconfig')
def test_set_script_compatibility(fake: FakeSystem) -> None:
    request = set_request(GUIDS["hv2"], "192.0.2.30;2001:db8::30", "255.255.255.0;64",
                          "192.0.2.1", "192.0.2.53")
    # ifupdown manages hv2 and there is no hv_set_ifconfig: kvpfs says so.
    assert netwriters.set_ip_info(fake.settings(), request) == Status.ERROR_NOT_SUPPORTED
    assert fake.written() == []
    fake.install_script()
    assert netwriters.set_ip_info(fake.settings(), request) == Status.S_OK
    ifcfg = fake.out / "var/lib/hyperv/ifcfg-hv2"
    keyfile = fake.out / "var/lib/hyperv/hv2.nmconnection"
    assert fake.written() == [keyfile, ifcfg]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (ifcfg, keyfile))
    assert ifcfg.read_text().startswith("HWADDR=00:15:5D:00:20:03\nDEVICE=hv2\nBOOTPROTO=none\n")
    assert fake.recorded() == [["hv_set_ifconfig", str(ifcfg), str(keyfile)]]
    fake.install_script(status=1)
    assert netwriters.set_ip_info(fake.settings(), request) == Status.E_FAIL


@pytest.mark.log_errors('cannot be configured safely')
def test_set_refuses_an_unsafe_interface_name(fake: FakeSystem) -> None:
    net = fake.sysfs / "class/net/odd*name"
    write(net / "address", "00:15:5d:00:20:09\n")
    write(net / "ifindex", "109\n")
    write(net / "device/device_id", "{11111111-2222-3333-4444-000000000009}\n")
    fake.install_script()
    request = set_request("{11111111-2222-3333-4444-000000000009}", "192.0.2.30", "24")
    assert netwriters.set_ip_info(fake.settings(), request) == Status.E_FAIL
    assert fake.written() == [] and fake.recorded() == []


def test_settings_from_env(tmp_path: Path) -> None:
    real = NetSettings.from_env(environ={})
    assert (real.sysfs, real.root, real.output, real.run_commands) == (
        Path("/sys"), Path("/"), None, True)
    assert real.out("/etc/x") == Path("/etc/x")
    sim = NetSettings.from_env(simulate=True, sandbox=tmp_path, environ={})
    assert (sim.root, sim.output, sim.run_commands) == (Path("/"), tmp_path, False)
    assert sim.out("/etc/x") == tmp_path / "etc/x" and sim.live
    env = {netsettings.ENV_SYSFS: "/s", netsettings.ENV_ROOT: "/r", netsettings.ENV_OUTPUT: "/o",
           netsettings.ENV_COMMANDS: "1"}
    custom = NetSettings.from_env(simulate=True, sandbox=tmp_path, environ=env)
    assert (custom.sysfs, custom.root, custom.output, custom.run_commands) == (
        Path("/s"), Path("/r"), Path("/o"), True)
    assert not custom.live


def test_no_shell_anywhere() -> None:
    """Host strings never reach a shell: no shell=True, os.system or popen in the modules."""
    for module in (netconfig, netfiles, netlinks, netprograms, netsettings, netstate,
                   netwriters, ipinfo, ipconfigfiles):
        source = Path(module.__file__).read_text()
        for needle in ("shell=True", "os.system", "os.popen", "/bin/sh"):
            assert needle not in source, (module.__name__, needle)


# --------------------------------------------------------------------------- property

_TOKENS = ["192.0.2.10", "198.51.100.1", "2001:db8::10", "fe80::1", "255.255.255.0", "24",
           "/64", "64", "0", "300.1.1.1", "::", "1.2.3", "x", "$(id)", "a\nb=c", "[ipv4]",
           "10.0.0.1/8", "%", " ", "", "ffff:ffff::", "::ffff:1.2.3.4", "224.0.0.1"]
_LINE = re.compile(r"(#[^\n]*|\[[A-Za-z0-9]+\]|[A-Za-z0-9_-]+=[0-9A-Za-z.:/;,_-]*|)")


@st.composite
def _field(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=12)),
                          max_size=5))
    return ";".join(parts)


@st.composite
def _mostly_valid(draw: st.DrawFn) -> tuple[str, str, str, str, int]:
    """Aligned address/mask lists of real addresses, so most inputs get through."""
    v4 = st.builds(lambda n: f"10.{n >> 8 & 255}.{n & 255}.{n % 250 + 1}", st.integers(0, 9999))
    v6 = st.builds(lambda n: f"2001:db8::{n:x}", st.integers(1, 0xFFFF))
    pairs = draw(st.lists(st.one_of(st.tuples(v4, st.sampled_from(["255.255.0.0", "/16"])),
                                    st.tuples(v6, st.sampled_from(["64", "/48"]))),
                          max_size=6, unique_by=lambda p: p[0]))
    extra = draw(st.lists(st.one_of(v4, v6), max_size=4))
    sep = draw(st.sampled_from([";", "; ", " ;"]))
    return (sep.join(p[0] for p in pairs), sep.join(p[1] for p in pairs),
            ";".join(extra[:2]), ";".join(extra[2:]), draw(st.integers(0, 1)))


@given(st.one_of(st.tuples(_field(), _field(), _field(), _field(), st.integers(0, 2)),
                 _mostly_valid()))
@settings(max_examples=400, deadline=None)
def test_any_host_input_is_refused_or_renders_clean_lines(
        request: tuple[str, str, str, str, int]) -> None:
    ip, mask, gw, dns, dhcp = request
    try:
        config = parse_set(ip, mask, gw, dns, dhcp)
    except InvalidArgument:
        return
    for render in (ipconfigfiles.render_nm_keyfile, ipconfigfiles.render_networkd,
                   ipconfigfiles.render_ifcfg):
        text = render("eth0", MAC, config)
        for line in text.splitlines():
            assert _LINE.fullmatch(line), (render.__name__, line)
    fields = ipinfo.ip_fields(LinkInfo(config.addresses, config.gateways, config.dns))
    assert len(fields.ip_addr.split(";")) == len(fields.sub_net.split(";"))
