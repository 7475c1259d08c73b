"""Wire format of the emulated device's control socket (shared by server and client).

Kept free of trio/pyfuse3 so the synchronous host client and the namespace helper can import
it cheaply.  Every frame is a little-endian u32 length followed by that many payload bytes;
the first payload byte says what the frame is:

``Q`` + 7432 bytes
    host -> emulator: one kernel-format request (what ``kvp_send_key`` hands the daemon).
    Answered by one ``A`` frame once the transaction ends.  Requests wait (like the VMBus
    ring) while no daemon is registered; closing the connection withdraws a waiting request.
``A`` + u32 status + u8 source + reply
    emulator -> host: ``status`` is what the kernel puts in ``icmsg_hdr.status``; ``reply`` is
    the daemon's 7432-byte write when ``source`` is :attr:`ReplySource.DAEMON`, else empty
    (the kernel answered E_FAIL on its own and sends the host no data).
``J`` + UTF-8 JSON object
    control commands (``{"cmd": ...}``) and their answers (``{"ok": bool, ...}``).
``E`` + UTF-8 text
    emulator -> host: the frame could not be handled (bad size, unknown kind).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from kvpfs.wire.kernelmodel import Source

__all__ = [
    "KIND_ANSWER",
    "KIND_ERROR",
    "KIND_JSON",
    "KIND_REQUEST",
    "MAX_FRAME",
    "ReplySource",
    "decode_answer",
    "encode_answer",
    "frame",
    "json_frame",
    "split_length",
]

KIND_REQUEST = b"Q"
KIND_ANSWER = b"A"
KIND_JSON = b"J"
KIND_ERROR = b"E"

# Generous bound so a corrupt length cannot make either side allocate gigabytes.
MAX_FRAME = 1 << 20

_LEN = struct.Struct("<I")
_ANSWER = struct.Struct("<IB")


ReplySource = Source
"""Who answered the host (`kvpfs.wire.kernelmodel.Source`): DAEMON, TIMEOUT, RESET,
SEND_FAILED, DESTROYED, SUSPENDED."""


def frame(payload: bytes) -> bytes:
    """Length-prefix one payload."""
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(payload)) + payload


def json_frame(obj: dict[str, Any]) -> bytes:
    """A ``J`` frame carrying ``obj``."""
    return frame(KIND_JSON + json.dumps(obj, separators=(",", ":")).encode())


def encode_answer(status: int, source: ReplySource, reply: bytes | None) -> bytes:
    """Payload of an ``A`` frame (without the length prefix)."""
    return KIND_ANSWER + _ANSWER.pack(status & 0xFFFF_FFFF, source) + (reply or b"")


def decode_answer(payload: bytes) -> tuple[int, ReplySource, bytes | None]:
    """Inverse of :func:`encode_answer`; ``payload`` includes the kind byte."""
    if payload[:1] != KIND_ANSWER or len(payload) < 1 + _ANSWER.size:
        raise ValueError(f"not an answer frame: {payload[:16]!r}")
    status, source = _ANSWER.unpack_from(payload, 1)
    reply = payload[1 + _ANSWER.size :]
    return status, ReplySource(source), (reply if reply else None)


def split_length(header: bytes) -> int:
    """Length from a 4-byte frame header, refusing absurd values."""
    (length,) = _LEN.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"frame length {length} exceeds {MAX_FRAME}")
    return length
