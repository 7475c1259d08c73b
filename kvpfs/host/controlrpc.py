"""What the control socket's requests do: the instance's status, and the simulated host's
commands (`kvpfs host ...`), carried out through the simulated kernel's real byte protocol.
The socket itself is `kvpfs.control`."""

from __future__ import annotations

from typing import Any

from kvpfs import __version__
from kvpfs.host.server import DeviceServer
from kvpfs.host.simulator import SimulatedHost
from kvpfs.storage.store import Store
from kvpfs.wire.pools import pool_number


async def answer(host: SimulatedHost | None, server: DeviceServer, store: Store,
                 request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request on the control socket."""
    op = request.get("op")
    if op == "status":
        return {
            "version": __version__,
            "simulated": host is not None,
            "registrations": server.registrations,
            "requests": server.requests,
            "lic_version": server.version,
            "pool_dir": str(store.pool_dir),
            "host_data_pushed": host.host_data_pushed if host is not None else None,
        }
    if host is None:
        return {"error": "this kvpfs serves a real Hyper-V device; `kvpfs host` commands need"
                         " a kvpfs started with --simulate"}
    if op in ("ip_get", "ip_set"):
        return await _host_ip(host, request)
    pool = pool_number(request["pool"])
    if op == "set":
        result = await host.set(pool, str(request["key"]), str(request["value"]))
    elif op == "delete":
        result = await host.delete(pool, str(request["key"]))
    elif op == "get":
        result = await host.get(pool, str(request["key"]))
    elif op == "list":
        items = await host.list(pool)
        return {"items": [[k, v] for k, v in items]}
    else:
        return {"error": f"unknown op {op!r}"}
    return {"status": result.status, "status_name": result.status_name, "key": result.key,
            "value": result.value}


async def _host_ip(host: SimulatedHost, request: dict[str, Any]) -> dict[str, Any]:
    """`kvpfs host ip get|set`: GET_IP_INFO / SET_IP_INFO through the simulated kernel."""
    if request["op"] == "ip_get":
        info = await host.ip_get(str(request["mac"]))
        return {"status": info.status, "status_name": info.status_name,
                "adapter_id": info.adapter_id, "addr_family": info.addr_family,
                "dhcp_enabled": info.dhcp_enabled, "ip_addr": info.ip_addr,
                "sub_net": info.sub_net, "gate_way": info.gate_way, "dns_addr": info.dns_addr}
    result = await host.ip_set(
        str(request["guid"]), str(request.get("ip_addr", "")), str(request.get("sub_net", "")),
        str(request.get("gate_way", "")), str(request.get("dns_addr", "")),
        dhcp=bool(request.get("dhcp", False)))
    return {"status": result.status, "status_name": result.status_name}
