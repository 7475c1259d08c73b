"""GET_IP_INFO / SET_IP_INFO on real interfaces, in network namespaces.

One namespace holds veth interfaces configured with `ip`:

* kv0: two IPv4 addresses (one with an alias label), a global IPv6 address, IPv4 and IPv6
  default routes, and one next hop of a multipath default route (bug #10 of the reference);
* kv1: no address at all (no link-local either);
* kv10: a decoy whose name starts with "kv1" and which has its own default route (the
  reference's `strncmp` and unfiltered gateways);
* kv2vf + kv2: one MAC shared like an SR-IOV virtual function and its synthetic NIC;
* kv3: "managed by NetworkManager" through fake /run state and a DHCP profile.

A whole `kvpfs mount --simulate` runs inside it (`ip netns exec`), and the tests act as
the host through its control socket, checking each reply field by field against what
was configured (and against `ip -json`).  Its sysfs view is a tree of symlinks into the
namespace's /sys plus fake VMBus `device_id` files; /etc and /run come from a fake root.
A second namespace applies a SET_IP_INFO with the real systemd-networkd and reads it back.
The differential test runs the Debian reference daemon and kvpfs on the emulated device in
the first namespace and checks that they differ exactly where intended.

Namespaces are deleted even when a test fails, and left-overs of killed runs are removed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from kvpfs import control
from kvpfs.wire import ipinfo
from kvpfs.wire.protocol import Status
from tests.conftest import skip_unless_ci
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
NS_PREFIX = "kvpfs-ip"
NETWORKD = "/lib/systemd/systemd-networkd"
SYSTEM_PYTHON = "/usr/bin/python3"

MACS = {
    "kv0": "00:15:5d:00:10:01",
    "kv1": "00:15:5d:00:10:02",
    "kv10": "00:15:5d:00:10:0a",
    "kv2vf": "00:15:5d:00:10:03",
    "kv2": "00:15:5d:00:10:03",
    "kv3": "00:15:5d:00:10:04",
    "kv4": "00:15:5d:00:10:05",
}
GUIDS = {"kv0": "{5d1c0000-0000-4000-8000-000000000000}",
         "kv1": "{5d1c0000-0000-4000-8000-000000000001}",
         "kv3": "{5d1c0000-0000-4000-8000-000000000003}",
         "kv4": "{5d1c0000-0000-4000-8000-000000000004}"}
NM_UUID = "3a4b5c6d-0000-4000-8000-00000000e301"

TOPOLOGY = """\
link add kv2vf address 00:15:5d:00:10:03 type veth peer name kv2vfp
link add kv0 address 00:15:5d:00:10:01 type veth peer name kv0p
link add kv1 address 00:15:5d:00:10:02 type veth peer name kv1p
link add kv10 address 00:15:5d:00:10:0a type veth peer name kv10p
link add kv2 address 00:15:5d:00:10:03 type veth peer name kv2p
link add kv3 address 00:15:5d:00:10:04 type veth peer name kv3p
link set kv1 addrgenmode none
link set kv2vf addrgenmode none
link set lo up
link set kv0 up
link set kv0p up
link set kv1 up
link set kv1p up
link set kv10 up
link set kv10p up
link set kv2vf up
link set kv2vfp up
link set kv2 up
link set kv2p up
link set kv3 up
link set kv3p up
addr add 192.0.2.10/24 dev kv0
addr add 198.51.100.7/25 dev kv0 label kv0:1
addr add 2001:db8:1::10/64 dev kv0 nodad
route add default via 192.0.2.1 dev kv0
route add ::/0 via 2001:db8:1::1 dev kv0
addr add 203.0.113.5/24 dev kv10
route add default via 203.0.113.1 dev kv10 metric 50
route add default metric 70 nexthop via 192.0.2.3 dev kv0 nexthop via 203.0.113.3 dev kv10
addr add 10.20.0.2/24 dev kv2
addr add 10.40.0.4/24 dev kv3
"""
RESOLV_CONF = "nameserver 192.0.2.53\nnameserver 2001:db8:1::53\n"


def eui64_link_local(mac: str) -> str:
    raw = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([raw[0] ^ 2]) + raw[1:3] + b"\xff\xfe" + raw[3:]
    groups = [f"{int.from_bytes(iid[i:i + 2], 'big'):x}" for i in range(0, 8, 2)]
    return "fe80::" + ":".join(groups)


# --------------------------------------------------------------------------- namespaces


def run(*argv: str, check: bool = True, timeout: float = 20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check,
                          timeout=timeout, **kw)


def netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    return None


pytestmark = pytest.mark.skipif(
    netns_missing() is not None and os.environ.get("CI") != "true", reason=str(netns_missing()))


def remove_stale_namespaces() -> None:
    """Namespaces of earlier runs that were killed before they could clean up."""
    listing = run("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NS_PREFIX}[a-z]-(\d+)", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            run("ip", "netns", "del", name, check=False)


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> str:
        return run("ip", "-n", self.name, *args).stdout

    def ip_json(self, *args: str) -> list[dict]:
        return json.loads(self.ip("-json", *args))

    def batch(self, commands: str) -> None:
        run("ip", "-n", self.name, "-batch", "-", input=commands)

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def ifindex(self, name: str) -> int:
        return self.ip_json("link", "show", "dev", name)[0]["ifindex"]

    def links(self) -> list[str]:
        return [link["ifname"] for link in self.ip_json("link", "show")]


@contextlib.contextmanager
def namespace(tag: str) -> Iterator[Namespace]:
    remove_stale_namespaces()
    name = f"{NS_PREFIX}{tag}-{os.getpid()}"
    run("ip", "netns", "del", name, check=False)
    run("ip", "netns", "add", name)
    try:
        yield Namespace(name)
    finally:
        run("ip", "netns", "del", name, check=False)


def fake_sysfs(ns: Namespace, base: Path, guids: dict[str, str]) -> Path:
    """class/net/<if>/{address,ifindex} linked into the namespace's own /sys (it is
    remounted for the namespace by `ip netns exec`), plus a fake VMBus device_id."""
    for name in ns.links():
        entry = base / "class" / "net" / name
        entry.mkdir(parents=True)
        for item in ("address", "ifindex"):
            (entry / item).symlink_to(f"/sys/class/net/{name}/{item}")
        if name in guids:
            (entry / "device").mkdir()
            (entry / "device" / "device_id").write_text(guids[name] + "\n")
    return base


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- helper mode
# `ip netns exec NS python -m tests.process.test_ipinfo_netns ...` runs these inside a namespace.


def _helper_call(argv: list[str]) -> object:
    from kvpfs.host import netstate, netwriters
    from kvpfs.host.netsettings import NetSettings
    from kvpfs.wire import protocol
    from kvpfs.wire.protocol import Op

    kind, settings_json, arg = argv
    raw = json.loads(settings_json)
    settings = NetSettings(sysfs=Path(raw["sysfs"]), root=Path(raw["root"]),
                           output=Path(raw["output"]) if raw.get("output") else None,
                           run_commands=raw.get("run", False))
    if kind == "get":
        status, info = netstate.get_ip_info(settings, arg)
        return [status, asdict(ipinfo.ip_fields(info)) if info else None]
    request = protocol.IpInfoRequest(Op.SET_IP_INFO, 0, **json.loads(arg))
    return netwriters.set_ip_info(settings, request)


def _helper_diff(argv: list[str]) -> object:
    """GET_IP_INFO for each MAC from the reference daemon, then from kvpfs, same device."""
    from emulation.kvphost import run_emulated_device
    from emulation.refdaemon import run_reference_daemon
    from kvpfs.wire.protocol import Op

    work, macs = Path(argv[0]), json.loads(argv[1])
    answers: dict[str, dict] = {"reference": {}, "kvpfs": {}}
    with run_emulated_device(work / "emu", timeout=20) as (device, host):
        with run_reference_daemon(device, work / "refpools", host):
            for mac in macs:
                answers["reference"][mac] = asdict(host.ip_info(Op.GET_IP_INFO, mac))
        before = host.state()["handshakes"]
        (work / "mnt").mkdir()
        with open(work / "kvpfs.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvpfs", "mount", str(work / "mnt"), "--device", device,
                 "--pool-dir", str(work / "pools"), "--control", str(work / "c.sock")],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            host.wait_registered(timeout=15, min_handshakes=before + 1)
            for mac in macs:
                answers["kvpfs"][mac] = asdict(host.ip_info(Op.GET_IP_INFO, mac))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return answers


def in_namespace(ns: Namespace, mode: str, *args: str, timeout: float = 60) -> object:
    done = run(*ns.exec_argv(sys.executable, "-m", "tests.process.test_ipinfo_netns", mode, *args),
               check=False, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, f"{mode} helper failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- kvpfs in the ns


class NamespacedKvpfs:
    """`kvpfs mount --simulate` inside the namespace; the host is played from outside."""

    def __init__(self, ns: Namespace, base: Path) -> None:
        self.ns = ns
        self.base = base
        self.control = base / "c.sock"
        self.sysfs = fake_sysfs(ns, base / "sys", {k: GUIDS[k] for k in ("kv0", "kv1", "kv3")})
        self.root = base / "root"
        self.out = base / "out"
        self.bin = base / "bin"
        self.calls = base / "calls.log"
        self.log = base / "kvpfs.log"
        write(self.root / "etc/resolv.conf", RESOLV_CONF)
        kv3 = ns.ifindex("kv3")
        write(self.root / f"run/NetworkManager/devices/{kv3}",
              f"[device]\nmanaged=true\nconnection-uuid={NM_UUID}\n")
        write(self.root / "etc/NetworkManager/system-connections/Wired kv3.nmconnection",
              f"[connection]\nid=Wired kv3\nuuid={NM_UUID}\ntype=ethernet\n"
              "interface-name=kv3\n\n[ipv4]\nmethod=auto\n", 0o600)
        write(self.bin / "nmcli", textwrap.dedent(f"""\
            #!/usr/bin/python3
            import json, sys
            with open({str(self.calls)!r}, "a") as log:
                log.write(json.dumps(["nmcli", *sys.argv[1:]]) + "\\n")
            """), 0o755)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> NamespacedKvpfs:
        (self.base / "mnt").mkdir()
        env = {**os.environ, "KVPFS_SYSFS_ROOT": str(self.sysfs),
               "KVPFS_NET_ROOT": str(self.root), "KVPFS_NET_OUTPUT": str(self.out),
               "KVPFS_NET_COMMANDS": "1", "PATH": f"{self.bin}:{os.environ['PATH']}"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.ns.exec_argv(sys.executable, "-m", "kvpfs", "mount",
                                  str(self.base / "mnt"), "--simulate",
                                  "--pool-dir", str(self.base / "pools"),
                                  "--control", str(self.control)),
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvpfs exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, control.ControlError, ValueError):
                if self.control.exists() and control.call(self.control, {"op": "status"},
                                                          timeout=2)["registrations"]:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"kvpfs did not start in the namespace:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ip netns exec` execs: this is kvpfs
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def get(self, mac: str) -> dict:
        return control.call(self.control, {"op": "ip_get", "mac": mac})

    def set(self, guid: str, ip: str = "", mask: str = "", gw: str = "", dns: str = "",
            dhcp: bool = False) -> int:
        return control.call(self.control, {"op": "ip_set", "guid": guid, "ip_addr": ip,
                                           "sub_net": mask, "gate_way": gw, "dns_addr": dns,
                                           "dhcp": dhcp})["status"]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run(sys.executable, "-m", "kvpfs", "host", "--control", str(self.control),
                   *args, check=False, cwd=REPO)

    def recorded(self) -> list[list[str]]:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]


@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    with namespace("t") as namespace_:
        namespace_.batch(TOPOLOGY)
        wait_for_link_locals(namespace_)
        yield namespace_


def wait_for_link_locals(ns: Namespace, timeout: float = 10.0) -> None:
    """The kernel adds link-local addresses a moment after a link comes up (link watch);
    compare nothing before they are all there, or answers taken a moment apart differ."""
    no_link_local = set(re.findall(r"link set (\S+) addrgenmode none", TOPOLOGY))
    deadline = time.monotonic() + timeout
    while True:
        missing = [link["ifname"] for link in ns.ip_json("addr", "show")
                   if link["ifname"] != "lo" and link["ifname"] not in no_link_local
                   and not any(a["family"] == "inet6" and a["local"].startswith("fe80:")
                               and "tentative" not in a for a in link["addr_info"])]
        if not missing:
            return
        assert time.monotonic() < deadline, f"no link-local address yet on {missing}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def kvpfs_ns(ns: Namespace) -> Iterator[NamespacedKvpfs]:
    base = Path(tempfile.mkdtemp(prefix="kvpip-"))  # short: sun_path is 108 bytes
    instance = NamespacedKvpfs(ns, base)
    try:
        yield instance.start()
    finally:
        instance.stop()
        if os.environ.get("KVPFS_KEEP_TMP") != "1":
            shutil.rmtree(base, ignore_errors=True)


def fields(answer: dict) -> dict:
    keys = ("status", "addr_family", "dhcp_enabled", "ip_addr", "sub_net", "gate_way",
            "dns_addr")
    return {k: answer[k] for k in keys}


# --------------------------------------------------------------------------- GET_IP_INFO


def test_get_configured_interface(ns: Namespace, kvpfs_ns: NamespacedKvpfs) -> None:
    link_local = eui64_link_local(MACS["kv0"])
    oracle = [a["local"] for a in ns.ip_json("addr", "show", "dev", "kv0")[0]["addr_info"]]
    assert oracle == ["192.0.2.10", "198.51.100.7", "2001:db8:1::10", link_local]
    answer = kvpfs_ns.get("00:15:5D:00:10:01")
    assert answer["adapter_id"] == "00:15:5D:00:10:01"
    assert fields(answer) == {
        "status": Status.S_OK,
        "addr_family": 3,
        "dhcp_enabled": 0,
        "ip_addr": f"192.0.2.10;198.51.100.7;2001:db8:1::10;{link_local}",
        "sub_net": "255.255.255.0;255.255.255.128;/64;/64",
        # kv0's own default routes, including its next hop of the multipath route; none of
        # kv10's (203.0.113.x).
        "gate_way": "192.0.2.1;192.0.2.3;2001:db8:1::1;",
        "dns_addr": "192.0.2.53;2001:db8:1::53;",
    }


def test_get_interface_without_addresses(kvpfs_ns: NamespacedKvpfs) -> None:
    answer = kvpfs_ns.get("00:15:5D:00:10:02")
    assert fields(answer) == {"status": Status.S_OK, "addr_family": 0, "dhcp_enabled": 0,
                              "ip_addr": "", "sub_net": "", "gate_way": "", "dns_addr": ""}


def test_get_accepts_either_case_and_rejects_junk(kvpfs_ns: NamespacedKvpfs) -> None:
    upper = kvpfs_ns.get("00:15:5D:00:10:01")
    lower = kvpfs_ns.get("00:15:5d:00:10:01")
    assert fields(lower) == fields(upper) and lower["adapter_id"] == "00:15:5d:00:10:01"
    assert kvpfs_ns.get("00:15:5D:00:10:99")["status"] == Status.E_FAIL
    assert kvpfs_ns.get("00:15:5D:00:10")["status"] == Status.INVALIDARG


def test_get_shared_mac_reports_the_interface_with_addresses(ns: Namespace,
                                                             kvpfs_ns: NamespacedKvpfs) -> None:
    assert ns.ifindex("kv2vf") < ns.ifindex("kv2")  # the address-less one comes first
    answer = kvpfs_ns.get("00:15:5D:00:10:03")
    assert answer["ip_addr"] == f"10.20.0.2;{eui64_link_local(MACS['kv2'])}"
    assert answer["sub_net"] == "255.255.255.0;/64"


def test_get_dhcp_from_the_managing_network_manager(kvpfs_ns: NamespacedKvpfs) -> None:
    answer = kvpfs_ns.get("00:15:5D:00:10:04")
    assert (answer["dhcp_enabled"], answer["ip_addr"].split(";")[0]) == (1, "10.40.0.4")


def test_get_through_the_command_line(kvpfs_ns: NamespacedKvpfs) -> None:
    done = kvpfs_ns.cli("ip", "get", "00:15:5D:00:10:01", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gate_way"] == "192.0.2.1;192.0.2.3;2001:db8:1::1;"
    text = kvpfs_ns.cli("ip", "get", "00:15:5D:00:10:02")
    assert text.returncode == 0 and "addr_family\t0\n" in text.stdout
    missing = kvpfs_ns.cli("ip", "get", "00:15:5D:00:10:99")
    assert missing.returncode == 1 and "E_FAIL" in missing.stderr


def test_get_with_the_real_sysfs(ns: Namespace, kvpfs_ns: NamespacedKvpfs) -> None:
    """The same answer from the namespace's own /sys (no fake tree) and the real root."""
    settings = json.dumps({"sysfs": "/sys", "root": str(kvpfs_ns.root)})
    status, got = in_namespace(ns, "call", "get", settings, "00:15:5D:00:10:01")
    assert status == Status.S_OK
    answer = kvpfs_ns.get("00:15:5D:00:10:01")
    assert {k: got[k] for k in ("ip_addr", "sub_net", "gate_way", "dns_addr")} == {
        k: answer[k] for k in ("ip_addr", "sub_net", "gate_way", "dns_addr")}


# --------------------------------------------------------------------------- SET_IP_INFO


def test_set_static_through_networkmanager(kvpfs_ns: NamespacedKvpfs) -> None:
    done = kvpfs_ns.cli("ip", "set", GUIDS["kv3"].upper(), "--ip", "192.0.2.40",
                        "--ip", "2001:db8:1::40", "--mask", "255.255.255.0;64",
                        "--gateway", "192.0.2.1", "--gateway", "2001:db8:1::1",
                        "--dns", "192.0.2.53;2001:db8:1::53")
    assert done.returncode == 0, done.stderr + kvpfs_ns.output()
    path = kvpfs_ns.out / "etc/NetworkManager/system-connections/hyperv-kv3.nmconnection"
    assert (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert "interface-name=kv3\n" in text and "mac-address=00:15:5D:00:10:04\n" in text
    assert "address1=192.0.2.40/24\n" in text and "address1=2001:db8:1::40/64\n" in text
    uuid = ipinfo.nm_connection_uuid(MACS["kv3"])
    # The host has its answer once the keyfile is written; activation follows it.
    expected = [["nmcli", "connection", "load", str(path)],
                ["nmcli", "--wait", "15", "connection", "up", "uuid", uuid, "ifname", "kv3"]]
    wait_for(lambda: kvpfs_ns.recorded()[-2:] == expected, 10,
             what=f"the activation's nmcli calls {expected}")
    wait_for(lambda: "SET_IP_INFO for kv3: configuration active" in kvpfs_ns.output(), 10,
             what="the activation's outcome in the log")
    if os.access(SYSTEM_PYTHON, os.X_OK):  # NetworkManager's own reader, when available
        parsed = subprocess.run([SYSTEM_PYTHON, str(REPO / "tests/support/nmkeyfile.py")],
                                input=json.dumps([text]), capture_output=True, text=True,
                                check=False)
        if parsed.returncode == 0:
            (result,) = json.loads(parsed.stdout)
            assert result["ok"] and result["warnings"] == [], result
            assert result["ipv4"]["gateway"] == "192.0.2.1"
            assert result["ipv6"]["dns"] == ["2001:db8:1::53"]


MALFORMED_SETS = [
    ("999.0.2.40", "255.255.255.0", "", ""),
    ("192.0.2.40", "255.255.0.255", "", ""),
    ("192.0.2.40", "", "", ""),
    ("192.0.2.40", "255.255.255.0", "gateway", ""),
    ("192.0.2.40", "255.255.255.0", "", "1.1.1.1;dns.example"),
    ("192.0.2.40;`reboot`", "24;24", "", ""),
    ("2001:db8::40%kv3", "64", "", ""),
    ("2001:db8::40", "129", "", ""),
    ("224.1.1.1", "24", "", ""),
    ("192.0.2.40", "24", "192.0.2.40", ""),
    ("", "", "192.0.2.1", ""),
    ("192.0.2.40 192.0.2.41", "24", "", ""),
]


def test_set_malformed_is_invalidarg_and_writes_nothing(kvpfs_ns: NamespacedKvpfs) -> None:
    before = sorted(p for p in kvpfs_ns.out.rglob("*")) if kvpfs_ns.out.exists() else []
    snapshot = {p: p.read_bytes() for p in before if p.is_file()}
    calls = len(kvpfs_ns.recorded())
    for ip, mask, gw, dns in MALFORMED_SETS:
        for guid in (GUIDS["kv0"], GUIDS["kv3"]):
            assert kvpfs_ns.set(guid, ip, mask, gw, dns) == Status.INVALIDARG, (ip, mask, gw)
    after = sorted(p for p in kvpfs_ns.out.rglob("*")) if kvpfs_ns.out.exists() else []
    assert after == before
    assert {p: p.read_bytes() for p in after if p.is_file()} == snapshot
    assert len(kvpfs_ns.recorded()) == calls
    bad = kvpfs_ns.cli("ip", "set", GUIDS["kv3"], "--ip", "192.0.2.40", "--mask", "255.0.255.0")
    assert bad.returncode == 1 and "INVALIDARG" in bad.stderr


def test_set_unknown_adapter(kvpfs_ns: NamespacedKvpfs) -> None:
    for guid in ("{5d1c0000-0000-4000-8000-0000000000ff}", "00:15:5D:00:10:01", "x"):
        assert kvpfs_ns.set(guid, "192.0.2.40", "24") == Status.GUID_NOTFOUND
    # kv10 exists but is not a VMBus NIC (no device_id).
    done = kvpfs_ns.cli("ip", "set", "{5d1c0000-0000-4000-8000-00000000000a}", "--dhcp")
    assert done.returncode == 1 and "GUID_NOTFOUND" in done.stderr


def test_set_on_an_unmanaged_link_is_not_supported(kvpfs_ns: NamespacedKvpfs) -> None:
    """kv0 is configured by hand (`ip`): nothing to hand the configuration to."""
    assert kvpfs_ns.set(GUIDS["kv0"], "192.0.2.10", "24") == Status.ERROR_NOT_SUPPORTED
    assert "managed by no network manager" in kvpfs_ns.output()


# --------------------------------------------------------------------------- networkd


def test_set_applied_by_systemd_networkd_and_read_back(tmp_path: Path) -> None:
    """SET_IP_INFO writes a .network file; the real networkd applies it; GET reports it."""
    if not os.access(NETWORKD, os.X_OK):
        skip_unless_ci("systemd-networkd not installed (Debian package systemd)")
    with namespace("n") as ns2:
        ns2.batch("link add kv4 address 00:15:5d:00:10:05 type veth peer name kv4p\n"
                  "link set kv4 up\nlink set kv4p up\nlink set lo up\n")
        index = ns2.ifindex("kv4")
        sysfs = fake_sysfs(ns2, tmp_path / "sys", {"kv4": GUIDS["kv4"]})
        root = tmp_path / "root"
        write(root / f"run/systemd/netif/links/{index}",
              "ADMIN_STATE=configured\nNETWORK_FILE=/etc/systemd/network/50-kv4.network\n")
        write(root / "etc/systemd/network/50-kv4.network",
              "[Match]\nName=kv4\n\n[Network]\nDHCP=yes\n")
        settings = json.dumps({"sysfs": str(sysfs), "root": str(root), "output": str(root)})
        status, before = in_namespace(ns2, "call", "get", settings, MACS["kv4"])
        assert (status, before["dhcp_enabled"]) == (0, 1)  # what networkd is told now
        request = {"adapter_id": GUIDS["kv4"], "addr_family": 0, "dhcp_enabled": 0,
                   "ip_addr": "192.0.2.44;2001:db8:4::44", "sub_net": "255.255.255.0;64",
                   "gate_way": "192.0.2.1;2001:db8:4::1", "dns_addr": "192.0.2.53;2001:db8:4::53"}
        assert in_namespace(ns2, "call", "set", settings, json.dumps(request)) == Status.S_OK
        network = root / "etc/systemd/network/00-hyperv-kv4.network"
        assert network.exists()
        # networkd with this root's /etc/systemd/network and /run/systemd, /sys read-only
        # (it then configures links without waiting for udev).
        (root / "run/systemd").chmod(0o755)
        shutil.chown(root / "run/systemd", "systemd-network", "systemd-network")
        shutil.chown(root / "run/systemd/netif", "systemd-network", "systemd-network")
        shutil.chown(root / "run/systemd/netif/links", "systemd-network", "systemd-network")
        script = ("set -e; mount --bind \"$1/etc/systemd/network\" /etc/systemd/network;"
                  " mount --bind \"$1/run/systemd\" /run/systemd; mount -o remount,ro /sys;"
                  " exec " + NETWORKD)
        log = tmp_path / "networkd.log"
        with open(log, "wb") as out:
            networkd = subprocess.Popen(
                ns2.exec_argv("unshare", "--mount", "--propagation", "private", "sh", "-c",
                              script, "sh", str(root)),
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ,
                                                          "SYSTEMD_LOG_LEVEL": "info"})
        try:
            deadline = time.monotonic() + 15
            while True:
                addresses = [a["local"] for a in
                             ns2.ip_json("addr", "show", "dev", "kv4")[0]["addr_info"]]
                routes = ns2.ip("route", "show", "default") + ns2.ip("-6", "route", "show",
                                                                     "default")
                state = (root / f"run/systemd/netif/links/{index}").read_text()
                if ("192.0.2.44" in addresses and "2001:db8:4::44" in addresses
                        and "2001:db8:4::1" in routes and "00-hyperv-kv4" in state):
                    break
                assert networkd.poll() is None, log.read_text()
                assert time.monotonic() < deadline, (addresses, routes, log.read_text())
                time.sleep(0.1)
            assert "via 192.0.2.1 dev kv4" in routes
            status, after = in_namespace(ns2, "call", "get", settings, MACS["kv4"])
        finally:
            networkd.send_signal(signal.SIGTERM)
            try:
                networkd.wait(10)
            except subprocess.TimeoutExpired:
                networkd.kill()
                networkd.wait(10)
        assert status == Status.S_OK
        assert after["ip_addr"].split(";")[:2] == ["192.0.2.44", "2001:db8:4::44"]
        assert after["sub_net"].split(";")[:2] == ["255.255.255.0", "/64"]
        assert after["gate_way"] == "192.0.2.1;2001:db8:4::1;"
        assert after["dns_addr"] == "192.0.2.53;2001:db8:4::53;"  # networkd's link state
        assert after["dhcp_enabled"] == 0


# --------------------------------------------------------------------------- reference


def address_fields(ns: Namespace, name: str, *, prefix: bool) -> tuple[str, str]:
    """ip_addr and sub_net built from `ip -json addr`, in getifaddrs order (every IPv4
    address, then every IPv6 one, by interface index), for the interface `name` -- or, with
    `prefix`, as the reference filters: `strncmp(ifa_name, name, strlen(name))`, i.e. every
    interface whose name starts with it."""
    links = [link for link in ns.ip_json("addr", "show")
             if (link["ifname"].startswith(name) if prefix else link["ifname"] == name)]
    found = []
    for family in ("inet", "inet6"):
        for link in links:
            for a in link["addr_info"]:
                if a["family"] == family:
                    iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
                    found.append((str(iface.ip), str(iface.netmask) if family == "inet"
                                  else f"/{a['prefixlen']}"))
    return ";".join(ip for ip, _ in found), ";".join(mask for _, mask in found)


def test_differences_from_the_reference_daemon(ns: Namespace) -> None:
    """GET_IP_INFO from hv_kvp_daemon and from kvpfs: same interfaces, same (emulated) device.

    Intended differences, each pinned below; everything else is equal:
    * addresses: the reference's `strncmp(ifa_name, if_name, strlen(if_name))` also takes
      every interface whose name merely starts with the adapter's (kv0p for kv0; kv1p,
      kv10, kv10p for the address-less kv1; kv2p, kv2vfp for kv2);
    * gateways: the reference misses kv0's next hop of the multipath default route;
    * DNS: the reference reports resolv.conf for kv1 because of the borrowed addresses,
      kvpfs reports none for an interface without addresses;
    * a lower-case MAC: E_FAIL from the reference, the normal answer from kvpfs.
    """
    if not os.access("/usr/sbin/hv_kvp_daemon", os.X_OK):
        skip_unless_ci("the reference daemon is not installed (Debian package hyperv-daemons)")
    work = Path(tempfile.mkdtemp(prefix="kvpdiff-"))
    kv0, kv1, kv2, kv0_lower = ("00:15:5D:00:10:01", "00:15:5D:00:10:02",
                                "00:15:5D:00:10:03", "00:15:5d:00:10:01")
    try:
        answers = in_namespace(ns, "diff", str(work), json.dumps([kv0, kv1, kv2, kv0_lower]),
                               timeout=120)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref, ours = answers["reference"], answers["kvpfs"]
    for mac, name in ((kv0, "kv0"), (kv1, "kv1"), (kv2, "kv2")):
        ours_fields = (ours[mac]["ip_addr"], ours[mac]["sub_net"])
        assert ours_fields == address_fields(ns, name, prefix=False), name
        # Debian's 6.1 daemon takes the first interface with the MAC in /sys/class/net's
        # order, which for kv2 may be its address-less "virtual function" kv2vf.
        candidates = [name, "kv2vf"] if name == "kv2" else [name]
        assert (ref[mac]["ip_addr"], ref[mac]["sub_net"]) in [
            address_fields(ns, candidate, prefix=True) for candidate in candidates], name
        assert ref[mac]["ip_addr"] != ours[mac]["ip_addr"], name  # kv0p, kv1p/kv10*, kv2p...
        assert {k: ref[mac][k] for k in ("status", "dhcp_enabled", "adapter_id")} == {
            k: ours[mac][k] for k in ("status", "dhcp_enabled", "adapter_id")}, name

    assert ref[kv0]["gate_way"] == "192.0.2.1;2001:db8:1::1;"
    assert ours[kv0]["gate_way"] == "192.0.2.1;192.0.2.3;2001:db8:1::1;"
    assert ref[kv0]["dns_addr"] == ours[kv0]["dns_addr"] != ""
    assert ref[kv0]["addr_family"] == ours[kv0]["addr_family"] == 3

    assert (ours[kv1]["ip_addr"], ours[kv1]["addr_family"], ours[kv1]["dns_addr"]) == ("", 0, "")
    assert "203.0.113.5" in ref[kv1]["ip_addr"] and ref[kv1]["addr_family"] == 3
    assert ref[kv1]["dns_addr"] == ours[kv0]["dns_addr"]
    assert ref[kv1]["gate_way"] == ours[kv1]["gate_way"] == ""

    assert ours[kv2]["ip_addr"] == f"10.20.0.2;{eui64_link_local(MACS['kv2'])}"
    # When the reference took kv2vf (see above), it saw only kv2vfp's IPv6 link-local.
    same = ("gate_way", "dns_addr") if "10.20.0.2" not in ref[kv2]["ip_addr"] else (
        "addr_family", "gate_way", "dns_addr")
    assert {k: ref[kv2][k] for k in same} == {k: ours[kv2][k] for k in same}

    assert ref[kv0_lower]["status"] == Status.E_FAIL
    assert {k: v for k, v in ours[kv0_lower].items() if k != "adapter_id"} == {
        k: v for k, v in ours[kv0].items() if k != "adapter_id"}


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    result = _helper_call(rest) if mode == "call" else _helper_diff(rest)
    print(json.dumps(result))
