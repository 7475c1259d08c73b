"""The Linux kernel's UTF-16 <-> UTF-8 conversions, as they shape KVP strings.

The host speaks UTF-16LE, the daemon UTF-8; ``drivers/hv/hv_kvp.c`` converts in between with
``utf16s_to_utf8s``/``utf8s_to_utf16s`` from ``fs/nls/nls_base.c``, and their quirks (silent
truncation, dropped lone surrogates, invalid UTF-8 only noticed if reached) decide what each
side really sees.  These pure functions re-implement those two routines step by step so the
simulated host and the tests see the same strings a real guest would.
"""

from __future__ import annotations

__all__ = [
    "GUEST_KEY_MAX_UNITS",
    "GUEST_VALUE_MAX_UNITS",
    "HOST_KEY_MAX_BYTES",
    "HOST_VALUE_MAX_BYTES",
    "ConversionError",
    "guest_to_host",
    "host_to_guest",
    "utf16_units",
]

# kvp_send_key: maxout = HV_KVP_EXCHANGE_MAX_{KEY,VALUE}_SIZE - 1 (room for the NUL).
HOST_KEY_MAX_BYTES = 511
HOST_VALUE_MAX_BYTES = 2047
# kvp_respond_to_host: maxout = HV_KVP_EXCHANGE_MAX_{KEY,VALUE}_SIZE / 2 - 2 (UTF-16 units).
GUEST_KEY_MAX_UNITS = 254
GUEST_VALUE_MAX_UNITS = 1022

_UNICODE_MAX = 0x10FFFF
_PLANE_SIZE = 0x10000

# fs/nls utf8_table: (cmask, cval, lmask, lval) for 1..6-byte sequences.
_UTF8_TABLE = (
    (0x80, 0x00, 0x7F, 0),
    (0xE0, 0xC0, 0x7FF, 0x80),
    (0xF0, 0xE0, 0xFFFF, 0x800),
    (0xF8, 0xF0, 0x1FFFFF, 0x10000),
    (0xFC, 0xF8, 0x3FFFFFF, 0x200000),
    (0xFE, 0xFC, 0x7FFFFFFF, 0x4000000),
)


class ConversionError(ValueError):
    """``utf8s_to_utf16s`` returned -EINVAL; the kernel then answers the host HV_E_FAIL."""


def utf16_units(text: str) -> int:
    """Length of ``text`` in UTF-16 code units (what the host's limits count)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def host_to_guest(text: str, max_bytes: int, *, skip_oversized: bool = False) -> bytes:
    """What the daemon receives for a host string: ``utf16s_to_utf8s(..., maxout=max_bytes)``.

    Stops at the first U+0000; drops unpaired surrogates (a high surrogate as the very last
    unit ends the string); never splits a character.  A character that no longer fits ends
    the string -- kernel behaviour since "fs/nls: Fix utf16 to utf8 conversion" (upstream
    25524b619029, in 6.1.y stable from January 2026).  Older kernels instead skipped such a
    character and kept going, so a later, shorter one could still be copied; pass
    ``skip_oversized=True`` to emulate them.  The caller appends the NUL (size = len + 1).
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes {max_bytes} is negative")
    raw = text.encode("utf-16-le", "surrogatepass")
    units = [int.from_bytes(raw[i:i + 2], "little") for i in range(0, len(raw), 2)]
    out = bytearray()
    room = max_bytes
    i, n = 0, len(units)
    while i < n and room > 0:
        u = units[i]
        if u == 0:
            break
        i += 1
        if u <= 0x7F:
            out.append(u)
            room -= 1
            continue
        if 0xD800 <= u <= 0xDFFF:
            if u >= 0xDC00:
                continue  # unpaired low surrogate: ignored
            if i >= n:
                break  # high surrogate with no unit after it
            v = units[i]
            if not 0xDC00 <= v <= 0xDFFF:
                continue  # unpaired high surrogate: ignored, v is processed next
            u = _PLANE_SIZE + ((u & 0x3FF) << 10) + (v & 0x3FF)
            i += 1
        encoded = chr(u).encode("utf-8")
        if len(encoded) > room:
            if skip_oversized:
                continue
            break
        out += encoded
        room -= len(encoded)
    return bytes(out)


def _utf8_to_utf32(data: bytes, pos: int) -> tuple[int, int]:
    """fs/nls ``utf8_to_utf32``: one sequence at ``pos`` -> (code point, length).

    Rejects exactly what strict UTF-8 rejects (stray continuation bytes, truncation,
    overlong forms, surrogates, > U+10FFFF), but only for the bytes it is asked to look at.
    """
    inlen = len(data) - pos
    c0 = data[pos]
    value = c0
    for nc, (cmask, cval, lmask, lval) in enumerate(_UTF8_TABLE, start=1):
        if c0 & cmask == cval:
            value &= lmask
            if value < lval or value > _UNICODE_MAX or 0xD800 <= value <= 0xDFFF:
                break
            return value, nc
        if inlen <= nc:
            break
        c = data[pos + nc] ^ 0x80
        if c & 0xC0:
            break
        value = (value << 6) | c
    raise ConversionError(f"invalid UTF-8 at byte {pos}")


def guest_to_host(data: bytes, max_units: int) -> str:
    """What the host receives for a daemon string: ``utf8s_to_utf16s(s, strlen(s), max_units)``.

    Reads up to the first NUL; silently stops once ``max_units`` UTF-16 units are used, and a
    character needing a surrogate pair when only one unit is left ends the string.  Invalid
    UTF-8 raises :class:`ConversionError` -- but only if the kernel gets that far: bytes
    after the truncation point are never examined.
    """
    if max_units < 0:
        raise ValueError(f"max_units {max_units} is negative")
    data = bytes(data)
    end = data.find(b"\0")
    if end >= 0:
        data = data[:end]
    chars: list[str] = []
    room = max_units
    pos, n = 0, len(data)
    while pos < n and room > 0:
        if data[pos] < 0x80:
            chars.append(chr(data[pos]))
            pos += 1
            room -= 1
            continue
        code, size = _utf8_to_utf32(data, pos)
        pos += size
        need = 2 if code >= _PLANE_SIZE else 1
        if need > room:
            break
        chars.append(chr(code))
        room -= need
    return "".join(chars)
