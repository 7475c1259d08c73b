"""The five KVP pools: how users name them, and where their files live.

The pools themselves, with their numbers and directory names, are
`kvpfs.wire.protocol.Pool`.
"""

from __future__ import annotations

from pathlib import Path

from kvpfs.wire.protocol import Pool

POOL_COUNT = len(Pool)

# Where hv_kvp_daemon keeps its pool files, and so where every tool looks for them.
SYSTEM_POOL_DIR = Path("/var/lib/hyperv")


def pool_number(text: str | int) -> Pool:
    """A pool given by number (0-4) or by directory name; ValueError otherwise."""
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
        number = int(text)
        if 0 <= number < POOL_COUNT:
            return Pool(number)
    else:
        for pool in Pool:
            if text == pool.dirname:
                return pool
    names = ", ".join(pool.dirname for pool in Pool)
    raise ValueError(f"unknown pool {text!r}: use 0-4 or one of {names}")
