"""Which new names in guest/ are temporary files that must never reach the host.

Tools that replace a file write a temporary one beside it and rename it over the target;
some close it first (sed, Salt), some fsync it (Puppet), so neither close nor fsync tells a
temporary file from a key. Its name does: each tool names its temporary files in a way of
its own, listed here (docs/tools.md keeps the same list for users). Such a file is private
to the guest (a scratch file: listed and readable through the mount, never stored in the
pool) until it is renamed to a name that is not temporary, which publishes it at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Whatever the open: names no key is expected to have.
_ALWAYS = [
    re.compile(rb"\..*", re.S),  # dot-files: rsync, Ansible, vim's .swp, editors' locks
    re.compile(rb".*~", re.S),  # editor backups (vim, nano, emacs)
    re.compile(rb"#.*#", re.S),  # emacs auto-save
    re.compile(rb".*\.(?:tmp|temp|swp|swx|dpkg-new|dpkg-tmp)", re.S | re.I),
    re.compile(rb"sed[A-Za-z0-9]{6}"),  # GNU sed -i
    re.compile(rb".*\d{8}-\d+-[0-9a-z]+(?:\.lock)?", re.S),  # Ruby's Tempfile (Puppet)
    re.compile(rb"tmp\.[A-Za-z0-9]{10}"),  # mktemp(1)
    re.compile(rb"tmp[a-z0-9_]{8}"),  # Python's tempfile without a prefix
]
# Python's mkstemp(prefix=TARGET, dir=guest) (Salt's file.managed): the target's name and
# 8 random characters. Only for an exclusive create of mode 0600 beside an existing key, as
# mkstemp makes it: `Role_version` written by `echo` stays a key.
_MKSTEMP_SUFFIX = re.compile(rb"(.+)[a-z0-9_]{8}", re.S)
_VIM_PROBE_FIRST, _VIM_PROBE_STEP = 4913, 123  # vim's "can I create files here" probe


def is_temporary(name: bytes) -> bool:
    """Names that are temporary whoever creates them (also the target of a rename)."""
    if any(pattern.fullmatch(name) for pattern in _ALWAYS):
        return True
    if name.isdigit() and len(name) < 10:
        number = int(name)
        return number >= _VIM_PROBE_FIRST and (number - _VIM_PROBE_FIRST) % _VIM_PROBE_STEP == 0
    return False


def is_temporary_create(name: bytes, *, exclusive: bool, mode: int,
                        exists: Callable[[bytes], bool]) -> bool:
    """Whether a file created now under `name` is a temporary file (see the module doc)."""
    if is_temporary(name):
        return True
    if exclusive and mode & 0o777 == 0o600:
        match = _MKSTEMP_SUFFIX.fullmatch(name)
        if match is not None and exists(match[1]):
            return True
    return False
