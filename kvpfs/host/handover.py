"""How the server's device thread hands a request to the trio thread and learns it is done."""

from __future__ import annotations

import queue

import trio

from kvpfs.host.replytiming import Stamp

STOP = object()
"""The outcome that tells the device thread to stop."""


class Handover:
    """How the device thread passes a request to the trio thread and learns it is done.

    `run_sync_soon` wakes the trio loop without the per-call task and context
    switches of `trio.from_thread.run`; the outcome (None, the device's
    OSError, or `STOP`) comes back through a plain queue.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._send, self.requests = trio.open_memory_channel[tuple[bytes, Stamp]](1)
        self.outcomes: queue.SimpleQueue[object] = queue.SimpleQueue()

    def answer_in_trio(self, request: tuple[bytes, Stamp]) -> object:
        try:
            self._token.run_sync_soon(self._deliver, request)
        except trio.RunFinishedError:
            return STOP
        return self.outcomes.get()

    def _deliver(self, request: tuple[bytes, Stamp]) -> None:
        # Runs inside the trio loop, where an exception would be fatal; one request
        # at a time, so the buffer of 1 is never full while someone receives.
        try:
            self._send.send_nowait(request)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.outcomes.put(STOP)
