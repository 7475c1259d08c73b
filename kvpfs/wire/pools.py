"""The five KVP pools: numbers, directory names, and what each is for."""

from __future__ import annotations

# Index = pool number (enum hv_kvp_exchg_pool); the name is its directory in the mount.
POOL_NAMES = ("external", "guest", "auto", "auto_external", "auto_internal")
POOL_COUNT = len(POOL_NAMES)
EXTERNAL, GUEST, AUTO, AUTO_EXTERNAL, AUTO_INTERNAL = range(POOL_COUNT)


def pool_number(text: str | int) -> int:
    """A pool given by number (0-4) or by directory name; ValueError otherwise."""
    if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
        number = int(text)
        if 0 <= number < len(POOL_NAMES):
            return number
    elif text in POOL_NAMES:
        return POOL_NAMES.index(text)
    raise ValueError(f"unknown pool {text!r}: use 0-4 or one of {', '.join(POOL_NAMES)}")
