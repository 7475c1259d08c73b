"""The system side of GET_IP_INFO and SET_IP_INFO, as `DeviceServer`'s `ip_info=` handler.

The work is done elsewhere, one job per module: `netsettings` (where the system is and
what may change), `netlinks` (links and their managers), `netstate` (GET_IP_INFO's
answer), `netwriters` (SET_IP_INFO's files and activation commands), `netprograms`
(bounded program runs) and `netfiles` (the managers' file formats). This module runs
that work off the trio loop and decides when the host is answered: once the
configuration is validated and its files written (staged beside their place), with
the activation afterwards in the background, because nmcli alone may take longer
than the kernel's 30 s per request. The activation (files put in place, programs
run) starts only once the answer has reached the kernel in time (`Deferred`): a
dropped answer changes nothing on the guest.
"""

from __future__ import annotations

import logging
import threading

import trio

from kvpfs import compat
from kvpfs.host.netsettings import NetSettings
from kvpfs.host.netstate import get_ip_info
from kvpfs.host.netwriters import Activation, activate_async, prepare_set_ip_info
from kvpfs.host.server import Deferred
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

    async def __call__(self, request: protocol.IpInfoRequest) -> bytes | Deferred:
        if request.op == Op.GET_IP_INFO:
            return await compat.to_thread_run_sync(self.get_reply, request,
                                                    abandon_on_cancel=True)
        async with self._set_lock:
            status, activation = await self._prepare_cancellably(request)
            if status != Status.S_OK or activation is None:
                return protocol.encode_status(status)
            nursery = self._nursery
            if nursery is None:
                # Nobody runs `run` (a direct caller): activate before answering.
                await trio.to_thread.run_sync(activation.publish)
                ok = await self._activate(activation)
                return protocol.encode_status(Status.S_OK if ok else Status.E_FAIL)
            staged = activation
            return Deferred(
                protocol.encode_status(Status.S_OK),
                commit=lambda: nursery.start_soon(self._publish_and_activate, staged),
                discard=lambda: nursery.start_soon(self._discard, staged))

    async def _prepare_cancellably(self, request: protocol.IpInfoRequest
                                   ) -> tuple[int, Activation | None]:
        """`prepare` in a thread that a cancellation abandons: what it staged after
        being abandoned is discarded by the thread itself."""
        lock = threading.Lock()
        abandoned = False
        result: list[tuple[int, Activation | None]] = []

        def prepare() -> tuple[int, Activation | None]:
            outcome = self.prepare(request)
            with lock:
                result.append(outcome)
                late = abandoned
            if late and outcome[1] is not None:
                outcome[1].discard()
            return outcome

        try:
            return await compat.to_thread_run_sync(prepare, abandon_on_cancel=True)
        except trio.Cancelled:
            with lock:
                abandoned = True
                done = list(result)
            for _, activation in done:
                if activation is not None:
                    activation.discard()
            raise

    async def _publish_and_activate(self, activation: Activation) -> None:
        try:
            await trio.to_thread.run_sync(activation.publish)
        except OSError as exc:
            log.error("SET_IP_INFO for %s: putting the configuration in place failed after"
                      " the host was told S_OK: %s", activation.interface, exc)
            return
        await self._activate(activation)

    @staticmethod
    async def _discard(activation: Activation) -> None:
        log.warning("SET_IP_INFO for %s: the answer did not reach the kernel in time;"
                    " the configuration was not applied", activation.interface)
        await trio.to_thread.run_sync(activation.discard)

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
