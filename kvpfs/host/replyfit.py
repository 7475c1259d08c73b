"""Records cut to what one reply message can carry."""

from __future__ import annotations

import logging

from kvpfs.wire import protocol

log = logging.getLogger("kvpfs.host.server")


def _cut_utf8(data: bytes, limit: int) -> bytes:
    """At most `limit` bytes of `data`, never ending inside a UTF-8 sequence."""
    if len(data) <= limit:
        return data
    data = data[:limit]
    return data.decode("utf-8", errors="ignore").encode("utf-8")


def fit_record(key: bytes, value: bytes, where: object) -> tuple[bytes, bytes]:
    """Key and value cut to what one message can carry (511/2047 bytes + NUL).

    Only records written by other tools without a terminator (a 512-byte key
    packed by cloud-init) or intrinsic values longer than a field get here;
    the host would truncate them further anyway (254/1022 UTF-16 units).
    """
    if len(key) > protocol.KEY_FIELD - 1 or len(value) > protocol.VALUE_FIELD - 1:
        log.warning("record in pool %s longer than a message field; sent truncated", where)
        key = _cut_utf8(key, protocol.KEY_FIELD - 1)
        value = _cut_utf8(value, protocol.VALUE_FIELD - 1)
    return key, value
