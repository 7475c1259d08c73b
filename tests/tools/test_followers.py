"""Programs that hold a key open or watch it while the host changes it (issue 16.6).

The rule (docs/tools.md): a host change replaces the file, as a rename over it would on
any filesystem. A descriptor opened before keeps the value it opened, with that value's
size; the name leads to the new value. So fstat and read through a held descriptor always
agree, `tail -F` prints each new value whole, and inotify watchers still hear of changes.
"""

from __future__ import annotations

import os
import subprocess
import threading

from tests.support.waiting import wait_for
from tests.tools.conftest import tool


def held_view(fd: int) -> tuple[int, bytes]:
    """What a held descriptor says now: its size (fstat) and its bytes (pread from 0)."""
    size = os.fstat(fd).st_size
    return size, os.pread(fd, 8192, 0)


def test_held_descriptor_never_mixes_old_bytes_and_new_size(kvp):
    kvp.host("set", "external", "Held", "short")
    path = kvp.path("external", "Held")
    wait_for(path.exists)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert held_view(fd) == (5, b"short")
        for value in ("a much longer value than before", "mid-length value", "x"):
            kvp.host("set", "external", "Held", value)
            wait_for(lambda v=value: path.read_text() == v, what=f"the name to show {value!r}")
            size, data = held_view(fd)
            assert len(data) == size, (size, data)  # never old bytes under the new size
            assert data == b"short"  # the held descriptor keeps the value it opened
    finally:
        os.close(fd)
    # A descriptor opened now reads the current value.
    assert path.read_bytes() == b"x"


def test_held_guest_key_changed_by_the_host(kvp):
    path = kvp.path("guest", "Mine")
    path.write_text("written by the guest\n")
    with open(path, "rb") as held:
        assert held.read() == b"written by the guest\n"
        kvp.host("set", "guest", "Mine", "host value")  # the host may write guest keys too
        wait_for(lambda: path.read_bytes() == b"host value")
        size, data = held_view(held.fileno())
        assert (size, data) == (21, b"written by the guest\n")


def test_held_descriptor_follows_writes_through_the_mount(kvp):
    """Another program writing the key through the mount changes it in place, as on any
    filesystem: the held descriptor reads the new value, with its size."""
    path = kvp.path("guest", "InPlace")
    path.write_text("aaaa\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert held_view(fd) == (5, b"aaaa\n")
        for value in ("bbbb\n", "cccccccccccc\n", "dd\n"):  # same size, longer, shorter
            path.write_text(value)
            size, data = held_view(fd)
            assert (size, data) == (len(value), value.encode())
    finally:
        os.close(fd)


class Follower:
    """`tail -F` on a path; everything it printed, collected by a thread."""

    def __init__(self, path) -> None:
        self.proc = subprocess.Popen(
            [tool("tail", "coreutils"), "-F", "-n", "+1", "-s", "0.1", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            self.out += chunk

    def close(self) -> str:
        self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


def test_tail_follow_name_prints_every_value_whole(kvp):
    values = ["first value\n", "second, a longer value\n", "third\n", "fourth\n",
              "fifth, same length?\n", "sixth, same length!\n"]
    kvp.host("set", "external", "Followed", values[0])
    path = kvp.path("external", "Followed")
    wait_for(path.exists)
    follower = Follower(path)
    try:
        expected = values[0]
        wait_for(lambda: follower.out.decode() == expected, timeout=20,
                 what=f"tail to print {expected!r} (got {follower.out!r})")
        for value in values[1:]:
            kvp.host("set", "external", "Followed", value)
            expected += value
            # Every value printed whole, in order, nothing from the one before it.
            wait_for(lambda e=expected: follower.out.decode() == e, timeout=20,
                     what=f"tail to print {value!r} (got {follower.out!r})")
    finally:
        follower.close()


def test_inotifywait_on_a_key_hears_each_host_change(kvp):
    inotifywait = tool("inotifywait", "inotify-tools")
    kvp.host("set", "external", "Watched", "v0")
    path = kvp.path("external", "Watched")
    wait_for(path.exists)
    for n in range(1, 4):
        proc = subprocess.Popen([inotifywait, "-e", "close_write", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            while "Watches established" not in proc.stderr.readline():
                pass
            kvp.host("set", "external", "Watched", f"v{n}")
            assert proc.wait(20) == 0
            assert "CLOSE_WRITE" in proc.stdout.read()  # type: ignore[union-attr]
        finally:
            proc.kill()
            proc.wait()
        assert path.read_text() == f"v{n}"
