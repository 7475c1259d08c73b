"""contrib/examples/ as a user copies them (issue 11.4), each run for real.

- The systemd path units, under the namespaced systemd of test_contrib.py, beside the
  shipped kvpfs.service (its sandbox: no CAP_DAC_OVERRIDE): the host sets a key, the path
  unit fires, its service answers in the guest pool, and the host reads the answer.
- The Ansible task file, run twice by a real ansible-playbook against a real mount.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, KvpfsProcess, fuse_missing, skip_unless_ci
from tests.process.test_contrib import systemd  # noqa: F401  (the namespaced systemd fixture)
from tests.support.waiting import wait_for

EXAMPLES = REPO / "contrib" / "examples"


def host_list(systemd, pool: str) -> dict[str, str]:  # noqa: F811
    out = systemd.run("kvpfs", "host", "--mount", "/run/kvp", "list", pool, "--json").stdout
    return {item["key"]: item["value"] for item in json.loads(out)}


def install(systemd, *names: str) -> None:  # noqa: F811
    for name in names:
        systemd.run("cp", str(EXAMPLES / name), "/run/units/")
    systemd.run("systemctl", "daemon-reload")


def test_systemd_path_units_fire_on_host_changes(systemd):  # noqa: F811
    wait_for(lambda: systemd.state("kvpfs.service") in ("active", "failed"), timeout=30,
             what="kvpfs.service to start")
    assert systemd.state("kvpfs.service") == "active", systemd.log()
    install(systemd, "kvp-ready.path", "kvp-ready.service", "kvp-config.path",
            "kvp-config.service")
    systemd.run("systemctl", "start", "kvp-ready.path", "kvp-config.path")
    assert systemd.state("kvp-ready.path") == "active"
    assert systemd.state("kvp-ready.service") == "inactive"  # nothing set yet

    # A new key nobody has looked at: PathExists= sees it (IN_CREATE).
    systemd.run("kvpfs", "host", "--mount", "/run/kvp", "set", "external", "Ready", "go")
    wait_for(lambda: host_list(systemd, "guest").get("ReadyAck") == "go", timeout=20,
             what=f"kvp-ready.service to answer ({systemd.log()})")
    assert systemd.state("kvp-ready.service") == "active"  # once: RemainAfterExit

    # PathChanged=: a new key, then each change of its value (IN_CLOSE_WRITE).
    systemd.run("kvpfs", "host", "--mount", "/run/kvp", "set", "external", "Config", "v1")
    wait_for(lambda: host_list(systemd, "guest").get("ConfigSeen") == "v1", timeout=20,
             what="kvp-config.service to see v1")
    systemd.run("kvpfs", "host", "--mount", "/run/kvp", "set", "external", "Config", "v2, longer")
    wait_for(lambda: host_list(systemd, "guest").get("ConfigSeen") == "v2, longer",
             timeout=20, what="kvp-config.service to see v2")
    # The host's view holds what it set and what the services wrote, nothing else.
    assert host_list(systemd, "external") == {"Ready": "go", "Config": "v2, longer"}
    assert set(host_list(systemd, "guest")) == {"ReadyAck", "ConfigSeen"}


# ---------------------------------------------------------------- Ansible

PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    kvp_guest_dir: {guest}
    kvp_role: web
    kvp_datacenter: west-2
  tasks:
    - ansible.builtin.import_tasks: {tasks}
"""


@pytest.fixture
def kvpfs_for_ansible(tmp_path):
    if fuse_missing():
        skip_unless_ci(fuse_missing())
    playbook = shutil.which("ansible-playbook", path=os.path.dirname(sys.executable))
    if playbook is None:
        skip_unless_ci("ansible-playbook is missing (pip install -e '.[test]': ansible-core)")
    proc = KvpfsProcess(tmp_path / "kvp").start()
    try:
        yield proc, playbook
    finally:
        proc.cleanup()


def run_playbook(playbook: str, path) -> tuple[dict[str, int], dict[str, bool], str]:
    """Run it; the recap's counts, and task name -> whether it reported a change."""
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "default", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    result = subprocess.run([playbook, "-i", "localhost,", str(path)], capture_output=True,
                            text=True, timeout=300, env=env)
    output = result.stdout
    assert result.returncode == 0, output[-4000:] + result.stderr[-4000:]
    recap = re.search(r"^localhost\s*:\s*(.*)$", output, re.M)
    assert recap, output
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap[1])}
    changes, task = {}, None
    for line in output.splitlines():
        if m := re.match(r"TASK \[(.*)\]", line):
            task = m[1]
        elif task and (m := re.match(r"(ok|changed): \[localhost\]", line)):
            changes[task] = m[1] == "changed"
            task = None
    return counts, changes, output


NEEDS_NEWLINE = {  # their value ends with a newline: idempotent once it reads back (11.2)
    "Publish the guest's role (copy, content with a newline as usual)",
    "Publish a message of the day (template)",
    "Publish the owning team (lineinfile)",  # it rewrites a last line without its newline
}


def test_ansible_guest_keys_twice_second_run_changes_nothing(kvpfs_for_ansible, tmp_path):
    kvpfs, playbook_bin = kvpfs_for_ansible
    path = tmp_path / "site.yml"
    path.write_text(PLAYBOOK.format(guest=kvpfs.path("guest"),
                                    tasks=EXAMPLES / "ansible-guest-keys.yml"))
    first, _, output = run_playbook(playbook_bin, path)
    assert first["changed"] == 4 and first["failed"] == 0, output[-4000:]
    expected = {"Role": "web", "Datacenter": "west-2", "Owner": "ops-team",
                "Motd": "Managed by Ansible: web in west-2"}
    # What the host sees: the values without their trailing newline, and nothing the user
    # did not write (no temporary file of copy/template ever reached it).
    assert dict(kvpfs.host("list", "guest")["items"]) == expected

    second, changed, output = run_playbook(playbook_bin, path)
    assert second["failed"] == 0
    assert set(changed) == NEEDS_NEWLINE | {"Publish the datacenter (copy, exact bytes)"}
    assert not any(changed[name] for name in set(changed) - NEEDS_NEWLINE), changed
    assert dict(kvpfs.host("list", "guest")["items"]) == expected  # nothing more reached it
    assert not any(changed.values()), changed  # copy, template and lineinfile: all no-ops
    assert second["changed"] == 0
