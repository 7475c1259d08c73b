"""mount.serve sets up store, services, mount and tasks, and tears them down in reverse.

* a start-up failure after the pool files were opened closes them (in-process, no mount);
* a shutdown under a stream of host changes leaves no pool file open once `serve` returns:
  the store is closed only after every task that could queue a pool-file change ended
  (a real mount, in a child process that runs `serve` again and again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from kvpfs import mount
from kvpfs.mount import MountConfig, StartupError
from tests.conftest import REPO, requires_fuse


def open_fds_under(directory: Path) -> list[str]:
    """What this process has open below `directory`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


@pytest.mark.parametrize("failure", ["control socket", "mount"])
def test_a_failed_start_leaves_no_pool_file_open(tmp_path, failure):
    pools = tmp_path / "pools"
    if failure == "control socket":  # refused before anything is created
        (tmp_path / "not-a-dir").write_text("")
        config = MountConfig(tmp_path / "mnt", simulate=True, pool_dir=pools,
                             control_path=tmp_path / "not-a-dir" / "control.sock")
        expected = "cannot use .* for the control socket"
    else:  # later still: device served and control socket up, the mount itself fails
        config = MountConfig(tmp_path / "no-such-mnt", simulate=True, pool_dir=pools,
                             control_path=tmp_path / "control.sock")
        expected = "cannot mount on"
    pools.mkdir(mode=0o700)
    with pytest.raises(StartupError, match=expected):
        try:
            trio.run(mount.serve, config)
        except BaseExceptionGroup as group:  # what mount.run unwraps
            startup, _ = group.split(StartupError)
            assert startup is not None, group
            raise startup.exceptions[0] from None
    if failure == "mount":  # the store had opened every pool file, and closed them
        assert {f".kvp_pool_{i}" for i in range(5)} <= {p.name for p in pools.iterdir()}
    else:
        assert list(pools.iterdir()) == []
    assert open_fds_under(pools) == []
    assert not (tmp_path / "control.sock").exists()


SHUTDOWN_UNDER_LOAD = r"""
import json, os, signal, sys, threading, time
from pathlib import Path
import trio
from kvpfs import control
from kvpfs.mount import MountConfig, serve

base = Path(sys.argv[1])
rounds = int(sys.argv[2])

def open_pool_fds():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(base / "pools") + "/"):
            found.append(target)
    return found

results = []
for n in range(rounds):
    stop = threading.Event()
    acked = []

    def hammer(worker):
        i = 0
        while not stop.is_set():
            i += 1
            key = f"w{worker}k{i % 7}"
            try:
                reply = control.call(base / "control.sock",
                                     {"op": "set", "pool": "external", "key": key,
                                      "value": f"{n}-{i}"})
            except (control.ControlError, OSError):
                return
            if reply.get("status") == 0:
                acked.append((key, f"{n}-{i}"))

    def ready():
        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        def terminate():
            time.sleep(0.05 + 0.03 * (n % 5))
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=terminate).start()
        ready.threads = threads

    config = MountConfig(base / "mnt", simulate=True, pool_dir=base / "pools",
                         control_path=base / "control.sock", on_ready=ready)
    trio.run(serve, config)
    still_open = open_pool_fds()
    stop.set()
    for t in ready.threads:
        t.join()
    last = {}
    for key, value in acked:
        last[key] = value
    results.append({"open": still_open, "acked": len(acked), "last": last})
print(json.dumps(results))
"""


@requires_fuse
def test_shutdown_under_load_leaves_no_pool_file_open(tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "pools").mkdir(mode=0o700)
    rounds = 40
    done = subprocess.run([sys.executable, "-c", SHUTDOWN_UNDER_LOAD, str(tmp_path),
                           str(rounds)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert len(results) == rounds
    assert [r["open"] for r in results] == [[]] * rounds
    assert sum(r["acked"] for r in results) > 0
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-3000:]
