"""A fake network for the IP-info tests: sysfs, a root with three network managers' state,
and programs on PATH that record their argument lists instead of touching the system.

Interface names here (hv0...) do not exist in the test's network namespace, so nothing real
is configured.  Used by tests/bytes/test_ipinfo.py, tests/store/test_ipinfo_service.py and
tests/process/test_device_faults.py.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from kvpfs.host.netsettings import NetSettings
from kvpfs.wire import protocol
from kvpfs.wire.protocol import Op

GUIDS = {name: f"{{11111111-2222-3333-4444-{i:012x}}}"
         for i, name in enumerate(("hv0", "hv1", "hv2", "hv3"), 1)}
NM_UUID = "0f5e6a1c-8d8e-4a3e-9b1b-2a6c0a1e2d01"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


class FakeSystem:
    """A sysfs tree and a root with NetworkManager, networkd and ifupdown state.

    hv0 is NetworkManager's (profile with ipv4.method=auto), hv1 networkd's (DHCP=yes, a
    drop-in may turn it off), hv2 ifupdown's (`iface hv2 inet dhcp` via source-directory),
    hv3 nobody's.  Interface indexes come from sysfs (the names do not exist here).
    """

    def __init__(self, base: Path) -> None:
        self.sysfs = base / "sys"
        self.root = base / "root"
        self.out = base / "out"
        self.bin = base / "bin"
        self.calls = base / "calls.log"
        for index, name in enumerate(GUIDS, 101):
            net = self.sysfs / "class" / "net" / name
            write(net / "address", f"00:15:5d:00:20:0{index - 100}\n")
            write(net / "ifindex", f"{index}\n")
            write(net / "device" / "device_id", GUIDS[name] + "\n")
        write(self.sysfs / "class/net/lo/address", "00:00:00:00:00:00\n")
        write(self.sysfs / "class/net/lo/ifindex", "1\n")
        write(self.root / "run/NetworkManager/devices/101",
              f"# state\n[device]\nmanaged=true\nconnection-uuid={NM_UUID}\n")
        write(self.root / "etc/NetworkManager/system-connections/Wired.nmconnection",
              f"[connection]\nid=Wired\nuuid={NM_UUID}\ntype=ethernet\n\n"
              "[ipv4]\nmethod=auto\ndns=192.0.2.53;\n", 0o600)
        write(self.root / "run/systemd/netif/links/102",
              "# This is private data. Do not parse.\nADMIN_STATE=configured\n"
              "NETWORK_FILE=/etc/systemd/network/50-hv1.network\nDNS=192.0.2.54 2001:db8::54\n")
        write(self.root / "etc/systemd/network/50-hv1.network",
              "[Match]\nName=hv1\n\n[Network]\nDHCP=yes\n")
        write(self.root / "run/network/ifstate", "hv2=hv2\nlo=lo\n")
        write(self.root / "etc/network/interfaces",
              "auto lo\niface lo inet loopback\nsource-directory interfaces.d\n")
        write(self.root / "etc/network/interfaces.d/hv2",
              "allow-hotplug hv2\niface hv2 inet dhcp\n")
        write(self.root / "etc/network/interfaces.d/hv2.dpkg-old", "iface hv2 inet static\n")
        write(self.root / "etc/resolv.conf", "# x\nnameserver 192.0.2.53\nnameserver bogus\n"
                                             "nameserver fe80::53%eth0\nsearch example\n")
        self.bin.mkdir()

    def settings(self, *, run: bool = True, timeout: float = 5.0) -> NetSettings:
        return NetSettings(sysfs=self.sysfs, root=self.root, output=self.out,
                           run_commands=run, command_timeout=timeout, activation_wait=3)

    def fake_program(self, name: str, *, status: int = 0, sleep: float = 0,
                     stdout: str = "") -> Path:
        """A program that records `name argv...` in calls.log (one JSON list per line)."""
        return write(self.bin / name, textwrap.dedent(f"""\
            #!/usr/bin/python3
            import json, sys, time
            with open({str(self.calls)!r}, "a") as log:
                log.write(json.dumps([{name!r}, *sys.argv[1:]]) + "\\n")
            time.sleep({sleep})
            sys.stdout.write({stdout!r})
            sys.exit({status})
            """), 0o755)

    def install_script(self, status: int = 0) -> Path:
        script = self.root / "usr/libexec/hypervkvpd/hv_set_ifconfig"
        write(script, textwrap.dedent(f"""\
            #!/usr/bin/python3
            import json, sys
            with open({str(self.calls)!r}, "a") as log:
                log.write(json.dumps(["hv_set_ifconfig", *sys.argv[1:]]) + "\\n")
            sys.exit({status})
            """), 0o755)
        return script

    def recorded(self) -> list[list[str]]:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]

    def written(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file()) if self.out.exists() else []


def set_request(guid: str, ip: str = "", mask: str = "", gw: str = "", dns: str = "",
                dhcp: int = 0) -> protocol.IpInfoRequest:
    return protocol.IpInfoRequest(Op.SET_IP_INFO, 0, guid, 0, dhcp, ip, mask, gw, dns)
