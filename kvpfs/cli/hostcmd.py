"""`kvpfs host`: play the Hyper-V host's administrator against a simulated kvpfs.

Each command is one request on the running instance's control socket, answered through
the simulated kernel with the real byte protocol.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvpfs import control
from kvpfs.cli.results import EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE

IP_FIELDS = ("adapter_id", "addr_family", "dhcp_enabled", "ip_addr", "sub_net", "gate_way",
             "dns_addr")



def run_host(args: argparse.Namespace) -> int:
    if args.host_command == "ip":
        return run_host_ip(args)
    try:
        path = control.find_control(args.control, args.mount)
        command = args.host_command
        request = {"op": command, "pool": args.pool}
        if command in ("set", "delete", "get"):
            request["key"] = args.key
        if command == "set":
            request["value"] = args.value
        answer = control.call(path, request)
    except control.ControlError as exc:
        print(f"kvpfs host: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if command == "list":
        items = answer["items"]
        if args.json:
            # Always a list: pools may hold one key several times, in this order.
            print(json.dumps([{"key": k, "value": v} for k, v in items], ensure_ascii=False,
                             indent=1))
        else:
            for key, value in items:
                print(f"{key}\t{value}")
        return EXIT_OK
    if answer["status"] != 0:
        print(f"kvpfs host {command}: {answer['status_name']}"
              f" (0x{answer['status']:08X})", file=sys.stderr)
        return EXIT_NOT_FOUND
    if command == "get":
        print(answer["value"])
    return EXIT_OK


def run_host_ip(args: argparse.Namespace) -> int:
    if args.ip_command == "get":
        request: dict[str, object] = {"op": "ip_get", "mac": args.mac}
    else:
        request = {"op": "ip_set", "guid": args.guid, "ip_addr": ";".join(args.ip),
                   "sub_net": ";".join(args.mask), "gate_way": ";".join(args.gateway),
                   "dns_addr": ";".join(args.dns), "dhcp": args.dhcp}
    try:
        answer = control.call(control.find_control(args.control, args.mount), request)
    except control.ControlError as exc:
        print(f"kvpfs host: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if answer["status"] != 0:
        print(f"kvpfs host ip {args.ip_command}: {answer['status_name']}"
              f" (0x{answer['status']:08X})", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.ip_command == "get":
        fields = {name: answer[name] for name in IP_FIELDS}
        if args.json:
            print(json.dumps(fields, indent=1))
        else:
            for name, value in fields.items():
                print(f"{name}\t{value}")
    return EXIT_OK
