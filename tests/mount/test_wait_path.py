"""`kvpfs wait PATH`: a path to a key's file in a kvpfs mount (issue 11.3), as a subprocess."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from tests.conftest import REPO


def run_wait(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpfs", "wait", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def later(kvpfs, *request: str) -> threading.Thread:
    def run() -> None:
        time.sleep(0.5)
        kvpfs.host(*request)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_wait_for_a_path_the_host_creates_later(kvpfs):
    thread = later(kvpfs, "set", "external", "Ready", "yes")
    result = run_wait(str(kvpfs.path("external", "Ready")), "--timeout", "10")
    thread.join()
    assert (result.returncode, result.stdout) == (0, "yes\n"), result.stderr


def test_path_through_the_pool_number_link_and_an_escaped_name(kvpfs):
    kvpfs.host("set", "guest", "a/b 100%", "there")
    result = run_wait(str(kvpfs.path("1", "a%2Fb 100%25")), "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, "there\n"), result.stderr
    # --changed: a value other than the one at its start. It may start after a change,
    # so the host keeps changing the value until it returns.
    waiter = subprocess.Popen([sys.executable, "-m", "kvpfs", "wait", "--changed",
                               str(kvpfs.path("guest", "a%2Fb 100%25")), "--timeout", "20"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO)
    for round_ in range(100):
        if waiter.poll() is not None:
            break
        kvpfs.host("set", "guest", "a/b 100%", f"changed {round_}")
        time.sleep(0.2)
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert out.startswith("changed ")


def test_a_shortened_name_is_read_from_the_files_xattr(kvpfs):
    key = "k" * 300  # longer than NAME_MAX once a file name: shown shortened
    kvpfs.host("set", "external", key, "long")
    name = next(p.name for p in kvpfs.path("external").iterdir() if p.name.startswith("kkk"))
    assert len(name) < 300
    result = run_wait(str(kvpfs.path("external", name)), "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, "long\n"), result.stderr


def test_same_options_and_timeout(kvpfs):
    result = run_wait(str(kvpfs.path("external", "Never")), "--timeout", "0.5")
    assert result.returncode == 124
    assert "timed out" in result.stderr


def test_paths_outside_a_mount_and_conflicting_options_are_refused(kvpfs, tmp_path):
    outside = run_wait(str(tmp_path / "Ready"), "--timeout", "1")
    assert outside.returncode == 2
    assert "not a key's file" in outside.stderr and str(kvpfs.mnt) in outside.stderr
    pool_dir = run_wait(str(kvpfs.path("external")), "--timeout", "1")
    assert pool_dir.returncode == 2
    both = run_wait(str(kvpfs.path("external", "Ready")), "--mount", str(kvpfs.mnt))
    assert both.returncode == 2 and "--mount" in both.stderr
    bad = run_wait(str(kvpfs.path("guest", "a%2fb")), "--timeout", "1")
    assert bad.returncode == 2 and "not a file name kvpfs gives a key" in bad.stderr
    # POOL KEY keeps working, and a bad pool is a usage error.
    assert run_wait("nopool", "key").returncode == 2
    kvpfs.host("set", "guest", "k", "v")
    assert run_wait("guest", "k", "--mount", str(kvpfs.mnt)).stdout == "v\n"
