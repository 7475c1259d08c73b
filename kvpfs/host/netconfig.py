"""The system side of GET_IP_INFO and SET_IP_INFO, as `DeviceServer`'s `ip_info=` handler.

The work is done elsewhere, one job per module: `netsettings` (where the system is and
what may change), `netlinks` (links and their managers), `netstate` (GET_IP_INFO's
answer), `netwriters` (SET_IP_INFO's files and activation commands), `netprograms`
(bounded program runs) and `netfiles` (the managers' file formats). This module runs
that work off the trio loop and decides when the host is answered: once the
configuration is validated and written, with the activation afterwards in the
background, because nmcli alone may take longer than the kernel's 30 s per request.
"""

from __future__ import annotations

import logging

import trio

from kvpfs import compat
from kvpfs.host.netsettings import NetSettings
from kvpfs.host.netstate import get_ip_info
from kvpfs.host.netwriters import Activation, activate_async, prepare_set_ip_info
from kvpfs.wire import protocol
from kvpfs.wire.ipinfo import build_get_reply
from kvpfs.wire.protocol import Op, Status

log = logging.getLogger(__name__)

__all__ = ["IpInfoService", "NetSettings"]  # NetSettings: what the composition root builds


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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
