"""Parse NetworkManager keyfiles with NetworkManager's own reader (libnm), for the tests.

Run by the *system* Python (`/usr/bin/python3`, which has PyGObject and libnm's typelib from
the Debian packages python3-gi and gir1.2-nm-1.0) because the venv has no GObject bindings.
Reads a JSON list of keyfile texts on stdin; prints one JSON object per text: whether
`nm_keyfile_read` + `nm_connection_verify` accept it, every warning the reader emitted
(NetworkManager logs these and drops the offending value), and the settings as parsed.
"""

from __future__ import annotations

import json
import sys


def parse(text: str) -> dict:
    import gi

    gi.require_version("NM", "1.0")
    from gi.repository import NM, GLib

    warnings: list[str] = []

    def handler(_keyfile, _connection, kind, data, *_user) -> bool:
        if kind == NM.KeyfileHandlerType.WARN:
            warnings.append(data.warn_get()[0])
        return False

    keyfile = GLib.KeyFile()
    keyfile.load_from_data(text, len(text.encode()), GLib.KeyFileFlags.NONE)
    out: dict = {"warnings": warnings}
    try:
        connection = NM.keyfile_read(keyfile, "/etc/NetworkManager/system-connections",
                                     NM.KeyfileHandlerFlags.NONE, handler, None)
        connection.verify()
    except Exception as exc:  # GLib.Error: the reader or verify() refused the profile
        out.update(ok=False, error=str(exc))
        return out
    out.update(ok=True, id=connection.get_id(), uuid=connection.get_uuid(),
               type=connection.get_connection_type(),
               interface_name=connection.get_interface_name(),
               mac=connection.get_setting_wired().get_mac_address(),
               autoconnect=connection.get_setting_connection().get_autoconnect())
    for name, setting in (("ipv4", connection.get_setting_ip4_config()),
                          ("ipv6", connection.get_setting_ip6_config())):
        addresses = [setting.get_address(i) for i in range(setting.get_num_addresses())]
        routes = [setting.get_route(i) for i in range(setting.get_num_routes())]
        out[name] = {
            "method": setting.get_method(),
            "addresses": [f"{a.get_address()}/{a.get_prefix()}" for a in addresses],
            "gateway": setting.get_gateway(),
            "dns": [setting.get_dns(i) for i in range(setting.get_num_dns())],
            "routes": [(f"{r.get_dest()}/{r.get_prefix()}", r.get_next_hop(), r.get_metric())
                       for r in routes],
        }
    return out


if __name__ == "__main__":
    print(json.dumps([parse(text) for text in json.load(sys.stdin)]))
