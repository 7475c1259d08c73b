"""Saying a recurring problem once, not four times a second.

The store's watcher polls the pool files a few times a second; a pool file
replaced by a symlink, or kept locked by another program, would otherwise log
the same warning at every poll, forever. `QuietLog` logs a topic's message the
first time, then again only when its text changes or, for a problem that goes on,
once per `reminder` seconds with the number of repeats; when the problem ends
(`clear`), the repeats since the last line are counted in one summary line.

`RateLog` is for refusals a user can provoke at will, each with its own text (a name, a
size): at most a few lines per window, the rest counted in the next line logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass
class _Said:
    text: str
    level: int
    since: float  # when it was last logged
    repeats: int = 0  # times it recurred since then, unlogged


class QuietLog:
    """Rate-limited warnings keyed by topic (e.g. `("reload", pool)`)."""

    def __init__(self, logger: logging.Logger, *, reminder: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.reminder = reminder
        self.clock = clock
        self._said: dict[Hashable, _Said] = {}

    def say(self, topic: Hashable, level: int, msg: str, *args: object) -> None:
        """Log `msg % args` unless it is what `topic` said last (then count it)."""
        text = msg % args if args else msg
        now = self.clock()
        said = self._said.get(topic)
        if said is not None and said.text == text:
            said.repeats += 1
            if now - said.since >= self.reminder:
                self.logger.log(level, "%s (still so: %d more time(s) in the last %.0f s)",
                                text, said.repeats, now - said.since)
                said.since, said.repeats = now, 0
            return
        if said is not None:
            self._summarise(said)
        self.logger.log(level, "%s", text)
        self._said[topic] = _Said(text, level, now)

    def clear(self, topic: Hashable, msg: str | None = None, *args: object,
              summary: bool = True) -> bool:
        """The topic's problem is over: summarise its unlogged repeats (unless `summary`
        is False) and log `msg` (INFO) if it had said anything. True if it had."""
        said = self._said.pop(topic, None)
        if said is None:
            return False
        if summary:
            self._summarise(said)
        if msg is not None:
            self.logger.info(msg, *args)
        return True

    def _summarise(self, said: _Said) -> None:
        if said.repeats:
            self.logger.log(said.level, "%s (repeated %d more time(s) over %.0f s)",
                            said.text, said.repeats, self.clock() - said.since)


class RateLog:
    """At most `lines` log lines per `window` seconds; what is held back is counted and
    said with the first line of a later window."""

    def __init__(self, logger: logging.Logger, *, lines: int = 20, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.lines = lines
        self.window = window
        self.clock = clock
        self._start = -window
        self._logged = 0
        self._held_back = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._start >= self.window:
            if self._held_back:
                self.logger.log(level, "%d more refusal(s) like the above were not logged"
                                " (at most %d lines per %g s)", self._held_back, self.lines,
                                self.window)
            self._start, self._logged, self._held_back = now, 0, 0
        if self._logged < self.lines:
            self._logged += 1
            self.logger.log(level, msg, *args)
        else:
            self._held_back += 1

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)
