"""Which new names in guest/ are temporary files (kvpfs.fuse.tempnames, docs/tools.md §1):
the names real tools were seen to make, and ordinary key names that must stay keys."""

from __future__ import annotations

import pytest

from kvpfs.fuse.tempnames import is_temporary, is_temporary_create


@pytest.mark.parametrize("name", [
    b".Role.Xy12Ab",  # rsync
    b".ansible_tmpabc123Role",  # Ansible
    b".Role.swp", b"Role~", b"#Role#", b"Role.tmp", b"Role.TMP", b"Role.dpkg-new",
    b"sedzcBspL",  # GNU sed -i
    b"Role20261205-12564-1868vhf", b"Role20261205-12564-1868vhf.lock",  # Puppet
    b"tmp.AbCdEf1234",  # mktemp
    b"tmpa1b2_c3d",  # Python's tempfile
    b"4913", b"5036", b"5159",  # vim's probe
])
def test_tools_temporary_names(name):
    assert is_temporary(name)
    assert is_temporary_create(name, exclusive=False, mode=0o644, exists=lambda n: False)


@pytest.mark.parametrize("name", [
    b"Role", b"Status", b"sed", b"sedimentary", b"4914", b"2026", b"Role_version",
    b"tmp", b"Network.Address", b"Backup-2026-12-05",
])
def test_key_names_stay_keys(name):
    assert not is_temporary(name)
    assert not is_temporary_create(name, exclusive=False, mode=0o644, exists=lambda n: True)


def test_mkstemp_beside_a_key_is_temporary_only_as_mkstemp_makes_it():
    exists = {b"Role"}.__contains__
    # Salt: mkstemp(prefix="Role", dir=guest) -> O_EXCL, mode 0600, beside Role.
    assert is_temporary_create(b"Role5rowfap_", exclusive=True, mode=0o600, exists=exists)
    # The same name written by `echo` (no O_EXCL), or with another mode, or with no Role
    # beside it, is a key.
    assert not is_temporary_create(b"Role5rowfap_", exclusive=False, mode=0o600,
                                   exists=exists)
    assert not is_temporary_create(b"Role5rowfap_", exclusive=True, mode=0o644, exists=exists)
    assert not is_temporary_create(b"Other5rowfap", exclusive=True, mode=0o600, exists=exists)
    assert not is_temporary_create(b"Role_version", exclusive=False, mode=0o644, exists=exists)
