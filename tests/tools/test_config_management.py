"""Puppet and Salt manage guest keys through the mount (issue 16.1, 16.2, 16.7).

Each tool runs for real: `puppet apply` (Debian's puppet) and `salt-call --local` (PyPI's
salt, in its own venv). For every run: the tool's exit code and what it reports changed,
what reads back through the mount, and what the host saw while it ran (the pool file,
polled every few ms: a temporary name there for a moment is caught). Then kvpfs restarts
and the tool runs again: a converged key must stay converged (value with its newline,
mode, owner), so the run is a no-op.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

from tests.support.hostview import HostWatch, read_pool
from tests.tools.conftest import salt_call, tool

NOBODY = pwd.getpwnam("nobody").pw_uid


# ---------------------------------------------------------------- Puppet

def puppet_apply(base: Path, manifest: str) -> subprocess.CompletedProcess[str]:
    """`puppet apply --detailed-exitcodes` with its state under `base`: 0 no change,
    2 changes, 4 or 6 failures."""
    puppet = tool("puppet", "puppet")
    state = base / "puppet"
    for sub in ("conf", "var", "code", "log", "run"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    path = base / "site.pp"
    path.write_text(manifest)
    return subprocess.run(
        [puppet, "apply", "--detailed-exitcodes", "--color=false",
         f"--confdir={state / 'conf'}", f"--vardir={state / 'var'}",
         f"--codedir={state / 'code'}", f"--logdir={state / 'log'}",
         f"--rundir={state / 'run'}", str(path)],
        capture_output=True, text=True, timeout=300)


def puppet_run(kvp, tmp_path: Path, manifest: str, expected_rc: int,
               allowed: set[str]) -> HostWatch:
    with HostWatch(kvp.pools) as watch:
        result = puppet_apply(tmp_path, manifest)
    assert result.returncode == expected_rc, result.stdout[-3000:] + result.stderr[-3000:]
    assert watch.unexpected(allowed) == set(), (watch.names, result.stdout[-2000:])
    return watch


def test_puppet_file_resources_create_change_noop_restart_absent(kvp, tmp_path):
    guest = kvp.path("guest")
    manifest = f"""
file {{ '{guest}/Role': content => "web\\n", mode => '0640' }}
file {{ '{guest}/Secret': content => "s3cret\\n", mode => '0600', owner => 'nobody' }}
"""
    allowed = {"Role", "Secret"}
    # Create: the lock directory and temporary file Puppet makes beside each key stay private.
    puppet_run(kvp, tmp_path, manifest, 2, allowed)
    assert (guest / "Role").read_bytes() == b"web\n"
    assert stat.S_IMODE((guest / "Role").stat().st_mode) == 0o640
    assert stat.S_IMODE((guest / "Secret").stat().st_mode) == 0o600
    assert (guest / "Secret").stat().st_uid == NOBODY
    assert read_pool(kvp.pools) == {"Role": "web", "Secret": "s3cret"}
    assert sorted(os.listdir(guest)) == ["Role", "Secret"]  # nothing left behind

    # A second run changes nothing.
    puppet_run(kvp, tmp_path, manifest, 0, allowed)

    # Change one value.
    changed = manifest.replace('"web\\n"', '"db\\n"')
    puppet_run(kvp, tmp_path, changed, 2, allowed)
    assert (guest / "Role").read_bytes() == b"db\n"
    assert read_pool(kvp.pools) == {"Role": "db", "Secret": "s3cret"}

    # After a restart (as after a reboot) the converged keys are still converged.
    kvp.stop()
    kvp.start()
    assert stat.S_IMODE((guest / "Secret").stat().st_mode) == 0o600
    assert (guest / "Secret").stat().st_uid == NOBODY
    assert (guest / "Role").read_bytes() == b"db\n"
    puppet_run(kvp, tmp_path, changed, 0, allowed)

    # ensure => absent removes the key from the host too.
    absent = changed.replace("content => \"db\\n\", mode => '0640'", "ensure => absent")
    puppet_run(kvp, tmp_path, absent, 2, allowed)
    assert not (guest / "Role").exists()
    assert read_pool(kvp.pools) == {"Secret": "s3cret"}
    puppet_run(kvp, tmp_path, absent, 0, allowed)


# ---------------------------------------------------------------- Salt

def salt_apply(base: Path, state: str) -> tuple[int, dict[str, dict]]:
    """`salt-call --local state.apply` of one state file; exit code and per-state results."""
    root = base / "salt"
    (root / "states").mkdir(parents=True, exist_ok=True)
    (root / "cache").mkdir(exist_ok=True)
    (root / "states" / "kvp.sls").write_text(state)
    (root / "minion").write_text(
        f"file_client: local\nfile_roots:\n  base:\n    - {root / 'states'}\n"
        f"cachedir: {root / 'cache'}\npki_dir: {root / 'pki'}\nlog_file: {root / 'log'}\n"
        f"sock_dir: {root / 'sock'}\n")
    result = subprocess.run(
        [salt_call(), "--local", "-c", str(root), "--out=json", "--retcode-passthrough",
         "--log-level=quiet", "state.apply", "kvp"],
        capture_output=True, text=True, timeout=300)
    try:
        states = json.loads(result.stdout)["local"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"salt-call printed no result ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}") from None
    return result.returncode, states


def salt_run(kvp, tmp_path: Path, state: str, allowed: set[str]) -> dict[str, bool]:
    """Run the state while watching the host; each state's name -> whether it changed."""
    with HostWatch(kvp.pools) as watch:
        rc, states = salt_apply(tmp_path, state)
    assert rc == 0, json.dumps(states, indent=1)[-3000:]
    assert all(s["result"] for s in states.values()), states
    assert watch.unexpected(allowed) == set(), watch.names
    return {s["name"]: bool(s["changes"]) for s in states.values()}


def test_salt_file_managed_create_noop_restart_absent(kvp, tmp_path):
    guest = kvp.path("guest")
    state = f"""
{guest}/Role:
  file.managed:
    - contents: web
    - mode: '0640'
{guest}/Secret:
  file.managed:
    - contents: s3cret
    - mode: '0600'
    - user: nobody
{guest}/Plain:
  file.managed:
    - contents: plain
"""
    allowed = {"Role", "Secret", "Plain"}
    changed = salt_run(kvp, tmp_path, state, allowed)
    assert all(changed.values()), changed
    assert (guest / "Role").read_bytes() == b"web\n"  # Salt adds the newline itself
    # No mode given: as on any filesystem, the default (not its temporary file's 0600).
    assert stat.S_IMODE((guest / "Plain").stat().st_mode) == 0o644
    assert stat.S_IMODE((guest / "Secret").stat().st_mode) == 0o600
    assert (guest / "Secret").stat().st_uid == NOBODY
    assert read_pool(kvp.pools) == {"Role": "web", "Secret": "s3cret", "Plain": "plain"}
    assert sorted(os.listdir(guest)) == ["Plain", "Role", "Secret"]

    assert not any(salt_run(kvp, tmp_path, state, allowed).values())

    kvp.stop()
    kvp.start()
    assert not any(salt_run(kvp, tmp_path, state, allowed).values())

    absent = state.replace("""  file.managed:
    - contents: web
    - mode: '0640'""", "  file.absent")
    assert salt_run(kvp, tmp_path, absent, allowed)[f"{guest}/Role"]
    assert read_pool(kvp.pools) == {"Secret": "s3cret", "Plain": "plain"}
