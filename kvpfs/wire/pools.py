"""The five KVP pools: numbers, directory names, and what each is for."""

from __future__ import annotations

from pathlib import Path

from kvpfs.wire.protocol import Pool

# Index = pool number (enum hv_kvp_exchg_pool); the name is its directory in the mount.
POOL_NAMES = ("external", "guest", "auto", "auto_external", "auto_internal")
POOL_COUNT = len(Pool)
EXTERNAL, GUEST, AUTO, AUTO_EXTERNAL, AUTO_INTERNAL = (int(pool) for pool in Pool)

# Where hv_kvp_daemon keeps its pool files, and so where every tool looks for them.
SYSTEM_POOL_DIR = Path("/var/lib/hyperv")


def pool_number(text: str | int) -> int:
    """A pool given by number (0-4) or by directory name; ValueError otherwise."""
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
        number = int(text)
        if 0 <= number < len(POOL_NAMES):
            return number
    elif text in POOL_NAMES:
        return POOL_NAMES.index(text)
    raise ValueError(f"unknown pool {text!r}: use 0-4 or one of {', '.join(POOL_NAMES)}")
