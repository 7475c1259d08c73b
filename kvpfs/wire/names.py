"""File names for KVP keys: a reversible escaping, documented in docs/filesystem.md ("Names").

A KVP key is up to 511 bytes of UTF-8 and may contain anything but NUL: `/`,
`%`, newlines, a leading dot, or be exactly `.` or `..`. A file name may not.
The mapping below keeps ordinary keys as they are and is reversible:

* `%XX` (two upper-case hex digits) stands for one byte of the key. These bytes
  are always escaped: `/`, `%`, control characters (0x01-0x1F, 0x7F) and a
  leading `.` (so `.`/`..` and dot-files never come from a host key: in `guest`
  names starting with `.` are scratch files that never reach the host).
* A name longer than 255 bytes once escaped (many tools assume NAME_MAX) is
  shown shortened: the first bytes of the escaped name, then `%~` and 16 hex
  digits of a hash of the key. `%~` never occurs otherwise, so such a name is
  recognised; it maps back to its key through the keys the filesystem knows.

Every file also carries its raw key in the extended attribute `user.kvp.key`.
"""

from __future__ import annotations

import hashlib
import re

NAME_MAX = 255
LONG_MARK = b"%~"
_HASH_HEX = 16
_HEX = b"0123456789ABCDEF"


class InvalidName(ValueError):
    """A file name that is not the escaped form of any key."""


def _must_escape(byte: int, position: int) -> bool:
    return byte in (0x2F, 0x25) or byte < 0x20 or byte == 0x7F or (position == 0 and byte == 0x2E)


# Bytes that are escaped anywhere; a leading "." is escaped too (checked apart).
_ESCAPED = re.compile(rb"[\x00-\x1f\x7f/%]")


def _plain(data: bytes) -> bool:
    """True when `data` needs no escaping: the common case, decided without a loop."""
    return not data.startswith(b".") and _ESCAPED.search(data) is None


def escape_key(key: bytes) -> bytes:
    """The full escaped form of `key`, whatever its length."""
    if _plain(key):
        return key
    out = bytearray()
    for position, byte in enumerate(key):
        if _must_escape(byte, position):
            out += b"%" + bytes((_HEX[byte >> 4], _HEX[byte & 15]))
        else:
            out.append(byte)
    return bytes(out)


def key_to_name(key: bytes) -> bytes:
    """The directory entry shown for `key` (at most NAME_MAX bytes)."""
    escaped = escape_key(key)
    if len(escaped) <= NAME_MAX:
        return escaped
    digest = hashlib.blake2b(key, digest_size=_HASH_HEX // 2).hexdigest().encode()
    keep = NAME_MAX - len(LONG_MARK) - _HASH_HEX
    head = escaped[:keep]
    # Never cut through an escape or a UTF-8 sequence: the head must stay readable.
    pct = head.rfind(b"%", max(0, keep - 2))
    if pct != -1:
        head = head[:pct]
    while head and (head[-1] & 0xC0) == 0x80:
        head = head[:-1]
    if head and head[-1] >= 0xC0:
        head = head[:-1]
    return head + LONG_MARK + digest


def is_shortened(name: bytes) -> bool:
    return LONG_MARK in name


def name_to_key(name: bytes) -> bytes:
    """The key a (full, not shortened) escaped name stands for.

    Raises InvalidName for a shortened name, a malformed escape, an empty name
    or one that is not UTF-8: the caller turns that into EINVAL or ENOENT.
    """
    if not name:
        raise InvalidName("empty name")
    if is_shortened(name):
        raise InvalidName("a shortened name (with %~) only refers to an existing key")
    if _plain(name):
        try:
            name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidName(f"not valid UTF-8 at byte {exc.start}") from None
        return name
    out = bytearray()
    i = 0
    while i < len(name):
        byte = name[i]
        if byte == 0x25:
            pair = name[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in b"0123456789ABCDEFabcdef" for c in pair):
                raise InvalidName(
                    f"malformed escape at byte {i}: '%' must be followed by two hex digits"
                )
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    key = bytes(out)
    try:
        key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidName(f"not valid UTF-8 at byte {exc.start}") from None
    if b"\0" in key:
        raise InvalidName("a key cannot contain NUL")
    if escape_key(key) != name:
        # One name per key: `%61` and `a` must not be two files for one key.
        raise InvalidName(
            "not in canonical form: escape exactly '/', '%', control characters and a leading"
            f" '.' as %XX with upper-case hex (this key is written {escape_key(key)!r})"
        )
    return key
