"""When a reply may still be written: the kernel's deadline, counted from its own clock.

The kernel arms its 30 s timer (`HV_UTIL_TIMEOUT`) in `hv_kvp_onchannelcallback`,
when the host's packet arrives, before the daemon reads it; once the timer has
fired, the daemon's next write is taken as the reply to whatever request is
outstanding then (there is no request id). So a daemon that counts from its own
read undercounts whenever it read late: after a stall, or when the previous
request overran.

`ReplyClock` counts from the earliest moment the kernel could have armed the
timer of the request read next: the last moment the daemon knew nothing was
queued. That is the start of a poll that found the device empty, the start of
the write of the previous reply (the kernel takes the next packet during that
write) or the start of the read of the registration echo (it starts serving
during that read). A request read after a stall is therefore counted from
before the stall. A reply is written only while `verdict` finds it in time;
otherwise the caller closes and reopens the device, which resets the kernel
(`kvp_on_reset`: DEVICE_INIT, the queued message freed) instead of letting a
late write answer another request.

A suspend stops CLOCK_MONOTONIC and the kernel's jiffies alike, but
`hv_kvp_pre_suspend` forces the kernel READY and keeps a queued message: a
request read across a suspend may be stale, and its reply may answer the
host's next request. CLOCK_BOOTTIME minus CLOCK_MONOTONIC grows by the time
suspended, so a change of it between the mark and the write means: reopen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

SUSPEND_TOLERANCE = 0.5
"""Growth of CLOCK_BOOTTIME - CLOCK_MONOTONIC (seconds) taken for a suspend."""


def suspended_seconds() -> float:
    """Time spent suspended since boot: CLOCK_BOOTTIME minus CLOCK_MONOTONIC."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True, slots=True)
class Stamp:
    """One request's timing: the earliest moment its kernel timer could have been armed."""

    armed_at: float  # on the ReplyClock's clock (time.monotonic by default)
    suspended: float  # suspended_seconds() then


class ReplyClock:
    """The deadline rule, shared by the device thread and the trio thread.

    They take turns (one request at a time), so the marks need no lock.
    """

    def __init__(self, kernel_timeout: float, reply_deadline: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 suspended: Callable[[], float] = suspended_seconds) -> None:
        self.kernel_timeout = kernel_timeout
        self.reply_deadline = reply_deadline
        # Replies are written until halfway between the work's deadline and the
        # kernel's: the rest covers the write itself and the kernel's work item
        # that passes the request down after arming the timer.
        self.write_limit = (reply_deadline + kernel_timeout) / 2
        self.clock = clock
        self.suspended = suspended
        self._mark = Stamp(clock(), suspended())

    def mark(self, at: float | None = None) -> None:
        """Nothing the kernel passes down from now on was armed before `at` (default now)."""
        self._mark = Stamp(self.clock() if at is None else at, self.suspended())

    def stamp(self) -> Stamp:
        """The timing of the request just read: counted from the last mark."""
        return self._mark

    def work_left(self, stamp: Stamp) -> float:
        """Seconds the request's work may still take (negative once overdue)."""
        return stamp.armed_at + self.reply_deadline - self.clock()

    def verdict(self, stamp: Stamp) -> str | None:
        """None while a reply to this request may be written; else why not."""
        now = self.clock()
        slept = self.suspended() - stamp.suspended
        if slept > SUSPEND_TOLERANCE:
            return (f"the guest was suspended for {slept:.1f} s since the request could have"
                    " arrived (the kernel keeps a request queued across a suspend)")
        age = now - stamp.armed_at
        if age < 0:
            return f"impossible age {age:.3f} s (the clock went backwards)"
        if age >= self.write_limit:
            return (f"the kernel may have armed its {self.kernel_timeout:g} s timer for it"
                    f" {age:.1f} s ago")
        return None
