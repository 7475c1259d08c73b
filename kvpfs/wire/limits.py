"""What a guest key and value may be, so that the host receives them whole.

The pool file has room for 511/2047 bytes plus a NUL, but the kernel converts
what the guest sends to at most 254/1022 UTF-16 units and silently drops the
rest (drivers/hv/hv_kvp.c). The mount, the command line and the store all
refuse values beyond these limits instead of letting them be cut.
"""

from __future__ import annotations

import errno

from kvpfs.wire.kernelconv import GUEST_KEY_MAX_UNITS, GUEST_VALUE_MAX_UNITS, utf16_units
from kvpfs.wire.protocol import KEY_FIELD, VALUE_FIELD

KEY_MAX_UNITS = GUEST_KEY_MAX_UNITS  # 254
VALUE_MAX_UNITS = GUEST_VALUE_MAX_UNITS  # 1022
KEY_MAX_BYTES = KEY_FIELD - 1  # 511: the field keeps its NUL
VALUE_MAX_BYTES = VALUE_FIELD - 1  # 2047


class LimitError(ValueError):
    """A key or value the host could not receive whole; `errno` for the filesystem."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


def _text(data: bytes, what: str) -> str:
    if b"\0" in data:
        raise LimitError(f"the {what} contains a NUL byte (at byte {data.index(0)}); NUL ends"
                         f" a {what} in the pool file", errno.EINVAL)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LimitError(f"the {what} is not valid UTF-8 (byte {exc.start})",
                         errno.EILSEQ) from None


def check_key(key: bytes) -> None:
    if not key:
        raise LimitError("a key cannot be empty", errno.EINVAL)
    units = utf16_units(_text(key, "key"))
    if units > KEY_MAX_UNITS or len(key) > KEY_MAX_BYTES:
        raise LimitError(
            f"the key is {units} UTF-16 units / {len(key)} bytes; the host takes at most "
            f"{KEY_MAX_UNITS} units (and a pool file {KEY_MAX_BYTES} bytes)", errno.ENAMETOOLONG)


def check_value(value: bytes) -> None:
    units = utf16_units(_text(value, "value"))
    if units > VALUE_MAX_UNITS or len(value) > VALUE_MAX_BYTES:
        raise LimitError(
            f"the value is {units} UTF-16 units / {len(value)} bytes; the host takes at most "
            f"{VALUE_MAX_UNITS} units (and a pool file {VALUE_MAX_BYTES} bytes). Split it "
            "into several keys", errno.EFBIG)

# What the mount holds in memory before publishing. An open file or a scratch file never
# holds more than a value plus the one trailing newline kvpfs drops: offsets and sizes
# beyond it are refused (EFBIG) before anything is allocated. The sum over all open write
# buffers, append drafts and scratch files is bounded too (ENOSPC), as is their number.
FILE_MAX_BYTES = VALUE_MAX_BYTES + 1  # 2048
# A scratch file may hold more than a value: editors keep their swap files beside the file
# they edit (vim's: 4 KiB blocks, 12 KiB for a small file). Renaming it into a key still
# checks the value's limit (EFBIG); its size stays bounded here and by the total below.
SCRATCH_FILE_MAX_BYTES = 64 << 10  # 64 KiB
# Each bound holds per user and for all users together, with headroom only root (and the
# user kvpfs runs as) may use: no user, nor all of them, can take what root needs.
UNPUBLISHED_MAX_BYTES = 8 << 20  # 8 MiB: some 4,000 values at their largest
UNPUBLISHED_PER_USER_BYTES = 4 << 20  # ... any one unprivileged user
UNPUBLISHED_ROOT_BYTES = 1 << 20  # ... kept for root
SCRATCH_MAX_FILES = 1024  # scratch files and created-but-unstored keys in guest/, per user
SCRATCH_ROOT_FILES = 64  # ... and as many more kept for root
OPEN_FILES_MAX = 65536  # open value files and directories, all users together (ENFILE)
OPEN_FILES_PER_USER = 4096  # ... any one unprivileged user (EMFILE beyond)
OPEN_FILES_ROOT = 4096  # ... kept for root
