"""What /proc says about the threads that read /.events: were they interrupted?

The change feed (events.py) asks this while reads wait; the kernel keeps an
interrupted reader of a FUSE request in state D until the filesystem answers,
and pyfuse3 does not pass FUSE_INTERRUPT on, so the signal is read from /proc.
"""

from __future__ import annotations

import os
import signal

# Signals that stop or continue a process: the reader should resume its read,
# not fail, so they do not end a waiting read.
_STOP_SIGNALS = sum(1 << (sig - 1) for sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN,
                                                signal.SIGTTOU, signal.SIGCONT))
_WAIT_CHANNEL = "request_wait_answer"


class ProcView:
    """What /proc says about the threads that read the feed (run in a worker thread).

    Cheap on purpose, as it runs often while reads wait: for a single-threaded
    opener, two small reads (its stat and wchan), a third only once it is in D.
    """

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def _read(self, path: str) -> str | None:
        try:
            with open(f"{self.root}/{path}", "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:  # gone, or not ours to see
            return None

    def _stat(self, path: str) -> tuple[str, int, int, str] | None:
        """(state, parent pid, number of threads, start time) from a stat file."""
        text = self._read(f"{path}/stat")
        if text is None:
            return None
        fields = text[text.rfind(")") + 2:].split()
        try:
            return fields[0], int(fields[1]), int(fields[17]), fields[19]
        except (IndexError, ValueError):
            return None

    def _thread(self, path: str, state: str) -> tuple[bool, bool]:
        """(in one of our reads, interrupted there) for the thread at `path`."""
        if state not in ("S", "D"):
            return False, False
        channel = self._read(f"{path}/wchan")
        if channel is None or channel.strip() != _WAIT_CHANNEL:
            return False, False
        if state != "D":
            return True, False  # still in the interruptible wait: no signal yet
        values = {}
        for line in (self._read(f"{path}/status") or "").splitlines():
            key, _, value = line.partition(":")
            values[key] = value.strip()
        try:
            pending = int(values["SigPnd"], 16) | int(values["ShdPnd"], 16)
            blocked = int(values["SigBlk"], 16)
        except (KeyError, ValueError):
            return True, False
        return True, bool(pending & ~blocked & ~_STOP_SIGNALS)

    def _tgid(self, tid: int) -> int | None:
        for line in (self._read(f"{tid}/status") or "").splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
        return None

    def _all_threads(self, pid: int) -> tuple[bool, bool]:
        found = hit = False
        try:
            tids = os.listdir(f"{self.root}/{pid}/task")
        except OSError:
            return False, False
        for tid in tids:
            path = f"{pid}/task/{tid}"
            stat = self._stat(path)
            if stat is not None:
                reading, interrupted = self._thread(path, stat[0])
                found, hit = found or reading, hit or interrupted
        return found, hit

    def interrupted(
        self, openers: set[tuple[int, str | None]], descendants: bool
    ) -> tuple[dict[int, str], set[tuple[int, str | None]]]:
        """Start times of new openers, and the openers whose reader was interrupted.

        An opener is the thread that opened the feed; its process's threads are
        looked at, and with `descendants`, the processes below one whose own
        threads are not in our read (the reader inherited the descriptor)."""
        starts: dict[int, str] = {}
        hits: set[tuple[int, str | None]] = set()
        unfound: dict[int, tuple[int, str | None]] = {}  # process -> opener
        for opener, start in openers:
            stat = self._stat(str(opener))
            if stat is None:
                continue
            state, _parent, threads, started = stat
            if start is None:
                starts[opener] = start = started
            elif started != start:
                continue  # the opener is gone and its id taken by another thread
            if threads == 1:
                found, hit = self._thread(str(opener), state)
                pid: int | None = opener
            else:
                pid = self._tgid(opener)
                found, hit = self._all_threads(pid) if pid is not None else (False, False)
            if hit:
                hits.add((opener, start))
            elif not found and pid is not None:
                unfound[pid] = (opener, start)
        if descendants and unfound:
            for pid in self._interrupted_descendants(set(unfound), openers):
                hits.add(unfound[pid])
        return starts, hits

    def _interrupted_descendants(self, ancestors: set[int],
                                 openers: set[tuple[int, str | None]]) -> set[int]:
        """The ancestors with a descendant interrupted in our read. Descendants that
        opened a waiting feed themselves are left to that feed."""
        skip = {opener for opener, _ in openers}
        parent: dict[int, int] = {}
        try:
            names = os.listdir(self.root)
        except OSError:
            return set()
        for name in names:
            if name.isdigit():
                stat = self._stat(name)
                if stat is not None:
                    parent[int(name)] = stat[1]
        result: set[int] = set()
        for pid in parent:
            if pid in skip or pid in ancestors:
                continue
            ancestor, hops = parent.get(pid), 0
            while ancestor and ancestor not in ancestors and hops < 64:
                ancestor, hops = parent.get(ancestor), hops + 1
            if ancestor in ancestors and ancestor not in result and self._all_threads(pid)[1]:
                result.add(ancestor)
        return result
