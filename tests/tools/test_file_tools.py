"""Everyday file tools on the mount (issue 16.2, 16.3, 16.4, 16.7).

sed -i, rsync -a both ways, cp -r / cp -p, install, tar, find -exec cat, grep -r, vim and
nano, each run for real: its exit code, what reads back, what the host saw while it ran
(the pool file polled every few ms, so a temporary name there for a moment is caught), and
what is left after a kvpfs restart. Every run has a timeout: a tool trapped by /.events
fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import stat
import subprocess
import time
from pathlib import Path

from tests.support.hostview import HostWatch, read_pool
from tests.support.waiting import wait_for
from tests.tools.conftest import tool

WALK_TIMEOUT = 60  # a walker that takes longer is stuck (it takes well under a second)


def run(*argv: str | Path, timeout: float = WALK_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, **kw)


def ok(*argv: str | Path, **kw) -> subprocess.CompletedProcess:
    result = run(*argv, **kw)
    assert result.returncode == 0, (argv, result.returncode, result.stdout[-2000:],
                                    result.stderr[-2000:])
    return result


def test_sed_in_place_never_shows_its_temp_file(kvp):
    guest = kvp.path("guest")
    (guest / "Sed").write_text("a=7\n")
    with HostWatch(kvp.pools) as watch:
        for value in range(8, 14):
            ok("sed", "-i", f"s/={value - 1}/={value}/", guest / "Sed")
    assert (guest / "Sed").read_text() == "a=13\n"
    assert watch.names == {"Sed"}, watch.names
    assert read_pool(kvp.pools) == {"Sed": "a=13"}
    assert os.listdir(guest) == ["Sed"]


def test_rsync_into_and_out_of_guest(kvp, tmp_path):
    rsync = tool("rsync", "rsync")
    src = tmp_path / "src"
    src.mkdir()
    (src / "Alpha").write_text("one\n")
    (src / "Beta").write_text("two")
    old = time.time() - 86400 * 30
    for path in (src / "Alpha", src / "Beta", src):
        os.utime(path, (old, old))  # the source directory's mtime differs from guest/'s
    guest = kvp.path("guest")
    with HostWatch(kvp.pools) as watch:
        ok(rsync, "-a", f"{src}/", f"{guest}/")
        # A second run finds everything in place (size and mtime) and copies nothing.
        again = ok(rsync, "-a", "--itemize-changes", f"{src}/", f"{guest}/")
    assert watch.names == {"Alpha", "Beta"}, watch.names
    assert read_pool(kvp.pools) == {"Alpha": "one", "Beta": "two"}
    assert [line for line in again.stdout.splitlines() if not line.startswith(".d")] == []
    assert (guest / "Alpha").read_text() == "one\n"
    assert int((guest / "Alpha").stat().st_mtime) == int(old)

    out = tmp_path / "out"
    ok(rsync, "-a", f"{guest}/", f"{out}/")
    assert (out / "Alpha").read_text() == "one\n" and (out / "Beta").read_text() == "two"
    ok("touch", guest)  # times on a pool directory are accepted

    kvp.stop()
    kvp.start()
    assert (guest / "Alpha").read_text() == "one\n"
    assert int((guest / "Alpha").stat().st_mtime) == int(old)
    again = ok(rsync, "-a", "--itemize-changes", f"{src}/", f"{guest}/")
    assert [line for line in again.stdout.splitlines() if not line.startswith(".d")] == []


def test_cp_preserve_and_install_keep_mode_and_mtime(kvp, tmp_path):
    guest = kvp.path("guest")
    src = tmp_path / "Copied"
    src.write_text("copied\n")
    src.chmod(0o600)
    old = time.time() - 86400
    os.utime(src, (old, old))
    (tmp_path / "Installed").write_text("installed\n")
    with HostWatch(kvp.pools) as watch:
        ok("cp", "-p", src, guest / "Copied")
        ok("install", "-m", "0640", tmp_path / "Installed", guest / "Installed")
        ok("touch", "-d", "2020-01-02 03:04:05", guest / "Touched")
        with open(guest / "Touched", "a") as f:  # written after its mtime was set...
            f.write("x\n")
        ok("touch", "-d", "2020-01-02 03:04:05", guest / "Touched")  # ...and set again
    assert watch.names == {"Copied", "Installed", "Touched"}, watch.names
    assert read_pool(kvp.pools) == {"Copied": "copied", "Installed": "installed",
                                    "Touched": "x"}

    def check() -> None:
        copied = (guest / "Copied").stat()
        assert stat.S_IMODE(copied.st_mode) == 0o600
        assert int(copied.st_mtime) == int(old)
        assert stat.S_IMODE((guest / "Installed").stat().st_mode) == 0o640
        assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
            (guest / "Touched").stat().st_mtime)) == "2020-01-02 03:04:05"
        assert (guest / "Copied").read_text() == "copied\n"

    check()
    kvp.stop()
    kvp.start()
    check()


def test_tree_walkers_finish_and_skip_the_change_feed(kvp, tmp_path):
    (kvp.path("guest") / "Walked").write_text("findme\n")
    kvp.host("set", "external", "HostKey", "findme too")
    wait_for(lambda: kvp.path("external", "HostKey").exists())
    mnt = kvp.mnt
    assert ".events" not in os.listdir(mnt)
    assert (mnt / ".events").exists()  # still reachable by name (kvpfs wait, the feed)

    copy = tmp_path / "copy"
    ok("cp", "-r", mnt, copy)
    assert (copy / "guest" / "Walked").read_text() == "findme\n"
    assert not (copy / ".events").exists()

    found = ok("find", mnt, "-type", "f", "-exec", "cat", "{}", "+")
    assert "findme" in found.stdout
    grep = ok("grep", "-r", "findme", mnt)
    assert f"{mnt}/guest/Walked:findme" in grep.stdout
    assert f"{mnt}/external/HostKey:findme too" in grep.stdout
    archive = ok("tar", "-cf", tmp_path / "kvp.tar", "-C", mnt, ".")
    listing = ok("tar", "-tf", tmp_path / "kvp.tar").stdout.split()
    assert "./guest/Walked" in listing and "./.events" not in listing, archive.stderr
    ok("du", "-s", mnt)
    ok("ls", "-laR", mnt)
    # updatedb (plocate) indexes the mount as it would at night, nothing pruned.
    database = tmp_path / "locate.db"
    ok(tool("updatedb", "plocate"), "--output", database, "--database-root", mnt,
       "--prunefs", "", "--prunepaths", "", "--prunenames", "", "--require-visibility", "no")
    located = ok("locate", "--database", database, "Walked").stdout.split()
    assert located == [f"{mnt}/guest/Walked"], located


def test_guest_directories_are_private_and_bounded(kvp):
    guest = kvp.path("guest")
    with HostWatch(kvp.pools) as watch:
        (guest / "Lock.lock").mkdir()
        assert (guest / "Lock.lock").is_dir()
        (guest / "Lock.lock").rmdir()
    assert watch.names == set()
    assert os.listdir(guest) == []


def test_vim_edits_a_key(kvp):
    vim = tool("vim", "vim-tiny")
    guest = kvp.path("guest")
    (guest / "Vim").write_text("old value\n")
    with HostWatch(kvp.pools) as watch:
        # Debian's defaults (-u DEFAULTS): swap file, write backup, the 4913 probe.
        ok(vim, "-u", "DEFAULTS", "-N", "-es", "-c", "s/old/new/", "-c", "wq",
           guest / "Vim", timeout=60)
    assert (guest / "Vim").read_text() == "new value\n"
    assert watch.names == {"Vim"}, watch.names
    assert read_pool(kvp.pools) == {"Vim": "new value"}
    assert os.listdir(guest) == ["Vim"]


def test_nano_edits_a_key(kvp):
    nano = tool("nano", "nano")
    guest = kvp.path("guest")
    (guest / "Nano").write_text("first\n")
    with HostWatch(kvp.pools) as watch:
        screen = Terminal([nano, "--ignorercfiles", str(guest / "Nano")])
        try:
            screen.wait_for(b"first")
            screen.send(b"\x1b\\")  # top of the file
            screen.send(b"X")  # "Xfirst"
            screen.send(b"\x0f")  # ^O write out
            screen.wait_for(b"File Name to Write")
            screen.send(b"\r")
            screen.wait_for(b"Wrote")
            screen.send(b"\x18")  # ^X exit
            assert screen.wait_exit() == 0
        finally:
            screen.close()
    assert (guest / "Nano").read_text() == "Xfirst\n"
    assert watch.names == {"Nano"}, watch.names
    assert read_pool(kvp.pools) == {"Nano": "Xfirst"}
    assert os.listdir(guest) == ["Nano"]


class Terminal:
    """A program on a pseudo-terminal, for editors; everything it printed so far in `seen`."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.environ["TERM"] = "xterm"
            os.execv(argv[0], argv)
        self.seen = b""

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait_for(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not shown; screen so far: {self.seen[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 65536)
                except OSError:  # EIO: the program ended
                    raise AssertionError(f"ended before showing {text!r}: "
                                         f"{self.seen[-500:]!r}") from None

    def wait_exit(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 65536)
        raise AssertionError(f"did not exit: {self.seen[-500:]!r}")

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_tar_and_cp_a_extract_into_guest(kvp, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    src.chmod(0o755)  # guest/'s own mode: a tool may set it again
    (src / "FromTar").write_text("tarred\n")
    (src / "FromTar").chmod(0o640)
    old = time.time() - 3600
    os.utime(src / "FromTar", (old, old))
    ok("tar", "-cf", tmp_path / "keys.tar", "-C", src, ".")
    guest = kvp.path("guest")
    with HostWatch(kvp.pools) as watch:
        ok("tar", "-xf", tmp_path / "keys.tar", "-C", guest)
        ok("cp", "-a", f"{src}/.", f"{guest}/")
    assert watch.names == {"FromTar"}, watch.names
    assert read_pool(kvp.pools) == {"FromTar": "tarred"}
    assert (guest / "FromTar").read_text() == "tarred\n"
    assert stat.S_IMODE((guest / "FromTar").stat().st_mode) == 0o640
    assert int((guest / "FromTar").stat().st_mtime) == int(old)
