"""Sans-I/O codec for ``struct hv_kvp_msg``, the 7432-byte message on ``/dev/vmbus/hv_kvp``.

Bytes in, typed values out; nothing here touches a file descriptor or imports the rest of
kvpfs.  This is the daemon's side: it decodes what the kernel sends (:func:`decode_request`)
and encodes replies (``encode_*_reply``, :func:`encode_status`, :func:`encode_register`).  The
kernel's side, for the simulated host and the tests, is `kvpfs.wire.kernelside`.

Layout (packed, little-endian).  The offsets below were computed with gcc 12.2 against
``/usr/include/linux/hyperv.h`` from Debian linux-libc-dev 6.1.192-2 (``offsetof`` on
``struct hv_kvp_msg``); sizeof = 7432, hv_kvp_exchg_msg_value 2572, hv_kvp_msg_enumerate 2576,
hv_kvp_msg_delete 516, hv_kvp_register 512, hv_kvp_ipaddr_value 7426::

    0    operation (u8) | pool (u8) | pad (u16)    -- union with ``int error``
    SET/GET     4 value_type  8 key_size  12 value_size  16 key[512]  528 value[2048]
    ENUMERATE   4 index  8 value_type  12 key_size  16 value_size  20 key[512]  532 value[2048]
    DELETE      4 key_size  8 key[512]
    REGISTER    4 version[512]
    IP info     4 adapter_id[256]  260 addr_family (u8)  261 dhcp_enabled (u8)
                262 ip_addr[2048]  2310 sub_net[2048]  4358 gate_way[1024]  5382 dns_addr[2048]
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

__all__ = [
    "KEY_FIELD",
    "LEGACY_REGISTER",
    "MESSAGE_SIZE",
    "VALUE_FIELD",
    "DeleteRequest",
    "EnumerateRequest",
    "GetRequest",
    "IpInfoRequest",
    "Op",
    "Pool",
    "ProtocolError",
    "RegisterReply",
    "Request",
    "SetRequest",
    "Status",
    "UnknownRequest",
    "ValueType",
    "decode_request",
    "encode_enumerate_reply",
    "encode_get_reply",
    "encode_ip_info_reply",
    "encode_register",
    "encode_status",
]

# --------------------------------------------------------------------------- sizes & offsets

MESSAGE_SIZE = 7432
KEY_FIELD = 512  # HV_KVP_EXCHANGE_MAX_KEY_SIZE
VALUE_FIELD = 2048  # HV_KVP_EXCHANGE_MAX_VALUE_SIZE

HEADER_SIZE = 4
BODY_OFFSET = 4
# 7428: the body union is not packed and hv_kvp_msg_delete gives it 4-byte alignment, so the
# largest member (hv_kvp_ipaddr_value, 7426) is padded by 2.
BODY_SIZE = MESSAGE_SIZE - HEADER_SIZE

OP_OFFSET = 0
POOL_OFFSET = 1
ERROR_OFFSET = 0  # ``int error`` overlays the whole 4-byte header

# SET and GET share struct hv_kvp_exchg_msg_value.
SET_BODY_SIZE = 2572
GET_BODY_SIZE = SET_BODY_SIZE
SET_VALUE_TYPE_OFFSET = 4
SET_KEY_SIZE_OFFSET = 8
SET_VALUE_SIZE_OFFSET = 12
SET_KEY_OFFSET = 16
SET_VALUE_OFFSET = 528

# ENUMERATE: u32 index, then the same exchg struct shifted by 4 bytes.
ENUM_BODY_SIZE = 2576
ENUM_INDEX_OFFSET = 4
ENUM_VALUE_TYPE_OFFSET = 8
ENUM_KEY_SIZE_OFFSET = 12
ENUM_VALUE_SIZE_OFFSET = 16
ENUM_KEY_OFFSET = 20
ENUM_VALUE_OFFSET = 532

DELETE_BODY_SIZE = 516
DELETE_KEY_SIZE_OFFSET = 4
DELETE_KEY_OFFSET = 8

REGISTER_BODY_SIZE = 512
REGISTER_VERSION_OFFSET = 4
REGISTER_VERSION_FIELD = 512

# struct hv_kvp_ipaddr_value; the uapi declares __u16 arrays, the daemon message carries UTF-8.
IP_BODY_SIZE = 7426
IP_ADAPTER_ID_OFFSET = 4
IP_ADAPTER_ID_FIELD = 256
IP_ADDR_FAMILY_OFFSET = 260
IP_DHCP_ENABLED_OFFSET = 261
IP_ADDR_OFFSET = 262
IP_ADDR_FIELD = 2048
IP_SUB_NET_OFFSET = 2310
IP_SUB_NET_FIELD = 2048
IP_GATE_WAY_OFFSET = 4358
IP_GATE_WAY_FIELD = 1024
IP_DNS_ADDR_OFFSET = 5382
IP_DNS_ADDR_FIELD = 2048

LEGACY_REGISTER = 4  # KVP_OP_REGISTER; collides with GET_IP_INFO, only meaningful in handshake

U32 = struct.Struct("<I")


class Op(enum.IntEnum):
    """``enum hv_kvp_exchg_op`` plus the REGISTER1 handshake op."""

    GET = 0
    SET = 1
    DELETE = 2
    ENUMERATE = 3
    GET_IP_INFO = 4
    SET_IP_INFO = 5
    REGISTER1 = 100


class Pool(enum.IntEnum):
    """``enum hv_kvp_exchg_pool``; each pool is a directory of the mount, `dirname`."""

    EXTERNAL = 0
    GUEST = 1
    AUTO = 2
    AUTO_EXTERNAL = 3
    AUTO_INTERNAL = 4

    @property
    def dirname(self) -> str:
        """Its directory in the mount, and its name in kvpfs's commands and /.events."""
        return self.name.lower()


class ValueType(enum.IntEnum):
    """Registry value types the host may use in a SET (host→kernel only)."""

    REG_SZ = 1
    REG_U32 = 4
    REG_U64 = 8


class Status(enum.IntEnum):
    """HRESULTs carried in ``error``; the kernel forwards non-zero ones to the host verbatim."""

    S_OK = 0x00000000
    E_FAIL = 0x80004005
    S_CONT = 0x80070103
    ERROR_NOT_SUPPORTED = 0x80070032
    ERROR_MACHINE_LOCKED = 0x800704F7
    ERROR_DEVICE_NOT_CONNECTED = 0x8007048F
    INVALIDARG = 0x80070057
    GUID_NOTFOUND = 0x80041002
    ERROR_ALREADY_EXISTS = 0x80070050
    ERROR_DISK_FULL = 0x80070070


_POOL_COUNT = len(Pool)
_STORE_OPS = frozenset({Op.GET, Op.SET, Op.DELETE, Op.ENUMERATE})


class ProtocolError(ValueError):
    """A message the daemon must not act on.

    ``op``/``pool`` carry whatever could be read from the header so a server can still send
    an error status for the right transaction instead of dropping it.
    """

    def __init__(self, message: str, *, op: int | None = None, pool: int | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.pool = pool


# --------------------------------------------------------------------------- decoded values


@dataclass(frozen=True, slots=True)
class RegisterReply:
    """The kernel's answer to our REGISTER write: its op echo and driver version ("3.1")."""

    op: int
    version: str


@dataclass(frozen=True, slots=True)
class GetRequest:
    pool: int
    key: bytes


@dataclass(frozen=True, slots=True)
class SetRequest:
    """``value_type`` is whatever sits at offset 4; Linux never fills it in (it is 0)."""

    pool: int
    key: bytes
    value: bytes
    value_type: int


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    pool: int
    key: bytes


@dataclass(frozen=True, slots=True)
class EnumerateRequest:
    pool: int
    index: int


@dataclass(frozen=True, slots=True)
class IpInfoRequest:
    """GET_IP_INFO (only adapter_id/addr_family filled) or SET_IP_INFO."""

    op: int
    pool: int
    adapter_id: str
    addr_family: int
    dhcp_enabled: int
    ip_addr: str
    sub_net: str
    gate_way: str
    dns_addr: str


@dataclass(frozen=True, slots=True)
class UnknownRequest:
    """An op this daemon does not implement; the reference daemon answers these with S_OK."""

    op: int
    pool: int


Request: TypeAlias = (
    GetRequest | SetRequest | DeleteRequest | EnumerateRequest | IpInfoRequest | UnknownRequest
)


# --------------------------------------------------------------------------- decoding helpers

Buffer: TypeAlias = bytes | bytearray | memoryview


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op {op}"


class _Reader:
    """Field access that turns every defect into a ProtocolError tagged with op and pool."""

    __slots__ = ("data", "op", "pool", "what")

    def __init__(self, data: bytes, op: int, pool: int, what: str) -> None:
        self.data = data
        self.op = op
        self.pool = pool
        self.what = what

    def fail(self, message: str) -> NoReturn:
        raise ProtocolError(f"{self.what} {message}", op=self.op, pool=self.pool)

    def u32(self, offset: int) -> int:
        value: int = U32.unpack_from(self.data, offset)[0]
        return value

    def cstring(self, offset: int, field: int, name: str) -> bytes:
        """Bytes before the first NUL; a field without NUL would make C read past it."""
        end = self.data.find(b"\0", offset, offset + field)
        if end < 0:
            self.fail(f"{name} is not NUL-terminated within the {field}-byte field")
        return self.data[offset:end]

    def utf8(self, raw: bytes, name: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{name}: invalid UTF-8 at byte {exc.start}")

    def key(self, size_offset: int, offset: int) -> bytes:
        """A key with its size field; the size must be exactly strlen+1.

        The reference daemon compares keys with memcmp over the *request's* key_size, so a
        short key_size turns into a prefix match; insisting on strlen+1 (which is all the Linux
        kernel ever sends) removes that class of bug at the boundary.
        """
        size = self.u32(size_offset)
        if size > KEY_FIELD:
            self.fail(f"key_size {size} exceeds the {KEY_FIELD}-byte key field")
        key = self.cstring(offset, KEY_FIELD, "key")
        if not key:
            self.fail(f"key is empty (key_size {size})")
        if size != len(key) + 1:
            self.fail(
                f"key_size {size} does not match the key: {len(key)} bytes + 1 NUL = "
                f"{len(key) + 1}"
            )
        self.utf8(key, "key")
        return key

    def value(self, size_offset: int, offset: int) -> bytes:
        """A value with its size field: strlen+1, or 0 for the empty value of an odd type."""
        size = self.u32(size_offset)
        if size > VALUE_FIELD:
            self.fail(f"value_size {size} exceeds the {VALUE_FIELD}-byte value field")
        value = self.cstring(offset, VALUE_FIELD, "value")
        if size != len(value) + 1 and not (size == 0 and not value):
            self.fail(
                f"value_size {size} does not match the value: {len(value)} bytes + 1 NUL = "
                f"{len(value) + 1} (0 is only allowed for an empty value)"
            )
        self.utf8(value, "value")
        return value

    def text(self, offset: int, field: int, name: str) -> str:
        return self.utf8(self.cstring(offset, field, name), name)


def decode_request(buf: Buffer, *, in_handshake: bool = False) -> Request | RegisterReply:
    """Decode one message read from the device.

    ``in_handshake`` is the daemon's "I have written REGISTER and not yet read the answer"
    state: only then is op 100 (or the legacy op 4) the kernel's registration reply; outside
    the handshake op 100 is just an unknown op, which is what the reference daemon does.
    Unknown ops are not errors (the server decides how to answer them); malformed known ops
    raise :class:`ProtocolError` and nothing else.
    """
    data = bytes(buf)
    if len(data) != MESSAGE_SIZE:
        raise ProtocolError(
            f"message is {len(data)} bytes; struct hv_kvp_msg is exactly {MESSAGE_SIZE} bytes",
            op=data[OP_OFFSET] if data else None,
            pool=data[POOL_OFFSET] if len(data) > POOL_OFFSET else None,
        )
    op, pool = data[OP_OFFSET], data[POOL_OFFSET]
    r = _Reader(data, op, pool, _op_name(op))

    if in_handshake and op in (Op.REGISTER1, LEGACY_REGISTER):
        version = r.text(REGISTER_VERSION_OFFSET, REGISTER_VERSION_FIELD, "version")
        return RegisterReply(op=op, version=version)

    if op in _STORE_OPS:
        if pool >= _POOL_COUNT:
            r.fail(f"pool {pool} is out of range (valid pools are 0..{_POOL_COUNT - 1})")
        p = Pool(pool)
        if op == Op.GET:
            # value_type/value_size/value are not inputs of a GET (the kernel leaves them 0).
            return GetRequest(pool=p, key=r.key(SET_KEY_SIZE_OFFSET, SET_KEY_OFFSET))
        if op == Op.SET:
            key = r.key(SET_KEY_SIZE_OFFSET, SET_KEY_OFFSET)
            value = r.value(SET_VALUE_SIZE_OFFSET, SET_VALUE_OFFSET)
            return SetRequest(
                pool=p, key=key, value=value, value_type=r.u32(SET_VALUE_TYPE_OFFSET)
            )
        if op == Op.DELETE:
            return DeleteRequest(pool=p, key=r.key(DELETE_KEY_SIZE_OFFSET, DELETE_KEY_OFFSET))
        return EnumerateRequest(pool=p, index=r.u32(ENUM_INDEX_OFFSET))

    if op in (Op.GET_IP_INFO, Op.SET_IP_INFO):
        return IpInfoRequest(
            op=Op(op),
            pool=pool,
            adapter_id=r.text(IP_ADAPTER_ID_OFFSET, IP_ADAPTER_ID_FIELD, "adapter_id"),
            addr_family=data[IP_ADDR_FAMILY_OFFSET],
            dhcp_enabled=data[IP_DHCP_ENABLED_OFFSET],
            ip_addr=r.text(IP_ADDR_OFFSET, IP_ADDR_FIELD, "ip_addr"),
            sub_net=r.text(IP_SUB_NET_OFFSET, IP_SUB_NET_FIELD, "sub_net"),
            gate_way=r.text(IP_GATE_WAY_OFFSET, IP_GATE_WAY_FIELD, "gate_way"),
            dns_addr=r.text(IP_DNS_ADDR_OFFSET, IP_DNS_ADDR_FIELD, "dns_addr"),
        )

    return UnknownRequest(op=op, pool=pool)


# --------------------------------------------------------------------------- encoding helpers


def check_u8(value: int, name: str) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} {value} does not fit in a u8")
    return value


def check_u32(value: int, name: str) -> int:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"{name} {value} does not fit in a u32")
    return value


def new_message(op: int, pool: int = 0) -> bytearray:
    """A zero-filled message, like the kernel's kzalloc, so nothing stale can leak out."""
    buf = bytearray(MESSAGE_SIZE)
    buf[OP_OFFSET] = check_u8(op, "op")
    buf[POOL_OFFSET] = check_u8(pool, "pool")
    return buf


def put_cstring(buf: bytearray, offset: int, field: int, data: bytes, name: str) -> int:
    """Write NUL-terminated ``data`` into a field; returns strlen+1 for the size fields."""
    data = bytes(data)
    if len(data) > field - 1:
        raise ValueError(
            f"{name} is {len(data)} bytes; the {field}-byte field holds at most {field - 1} "
            "plus the NUL"
        )
    if b"\0" in data:
        raise ValueError(f"{name} contains a NUL byte at {data.index(0)}; C would cut it there")
    buf[offset:offset + len(data)] = data  # the terminator is already zero
    return len(data) + 1


def put_text(buf: bytearray, offset: int, field: int, text: str, name: str) -> None:
    put_cstring(buf, offset, field, text.encode("utf-8"), name)


# --------------------------------------------------------------------------- daemon → kernel


def encode_register(op: int = Op.REGISTER1) -> bytes:
    """The daemon's opening write: op 100 (or legacy 4), everything else zero."""
    return bytes(new_message(op))


def encode_status(status: int) -> bytes:
    """A reply that carries only ``error`` (SET, DELETE, SET_IP_INFO, any failure).

    Negative values (the upstream daemon's ``-errno`` paths) are stored two's complement,
    exactly as C stores an ``int``.
    """
    if not -0x8000_0000 <= status <= 0xFFFF_FFFF:
        raise ValueError(f"status {status} does not fit in 32 bits")
    buf = bytearray(MESSAGE_SIZE)
    U32.pack_into(buf, ERROR_OFFSET, status & 0xFFFF_FFFF)
    return bytes(buf)


def encode_enumerate_reply(key: bytes, value: bytes, status: int = Status.S_OK) -> bytes:
    """ENUMERATE answer: key at 20, value at 532 (the kernel ignores the size fields).

    The sizes and REG_SZ are filled in anyway so the message is a well-formed
    hv_kvp_msg_enumerate for any other reader.  ValueError if key > 511 or value > 2047 bytes.
    """
    buf = bytearray(encode_status(status))
    key_size = put_cstring(buf, ENUM_KEY_OFFSET, KEY_FIELD, key, "key")
    value_size = put_cstring(buf, ENUM_VALUE_OFFSET, VALUE_FIELD, value, "value")
    U32.pack_into(buf, ENUM_VALUE_TYPE_OFFSET, ValueType.REG_SZ)
    U32.pack_into(buf, ENUM_KEY_SIZE_OFFSET, key_size)
    U32.pack_into(buf, ENUM_VALUE_SIZE_OFFSET, value_size)
    return bytes(buf)


def encode_get_reply(key: bytes, value: bytes) -> bytes:
    """GET answer with the value where the kernel actually reads it: offset 532.

    ``kvp_respond_to_host`` converts a GET reply's value from ``body.kvp_enum_data.value``
    (532), not from ``body.kvp_get.data.value`` (528) where the reference daemon writes it,
    which is why GET returns an empty value on stock Linux.

    The two layouts overlap (the GET key field 16..527 covers the ENUMERATE value_size at 16
    and key at 20; the GET value field starting at 528 covers the ENUMERATE value at 532), so
    one buffer cannot be a valid reply under both.  Chosen: the GET struct for everything the
    kernel ignores -- value_type REG_SZ at 4, key_size at 8, value_size (strlen+1) at 12, key
    at 16 -- and the value at 532.  Bytes 528..531 stay zero, so a reader that wrongly uses
    528 sees an empty string instead of a value missing its first four bytes.  The key
    (<= 511 bytes, ends by 527) and the value (<= 2047 bytes, 532..2579) never collide.
    """
    buf = new_message(0)  # status S_OK: the header bytes are the error field
    key_size = put_cstring(buf, SET_KEY_OFFSET, KEY_FIELD, key, "key")
    value_size = put_cstring(buf, ENUM_VALUE_OFFSET, VALUE_FIELD, value, "value")
    U32.pack_into(buf, SET_VALUE_TYPE_OFFSET, ValueType.REG_SZ)
    U32.pack_into(buf, SET_KEY_SIZE_OFFSET, key_size)
    U32.pack_into(buf, SET_VALUE_SIZE_OFFSET, value_size)
    return bytes(buf)


def encode_ip_info_reply(
    adapter_id: str,
    addr_family: int,
    dhcp_enabled: int,
    ip_addr: str,
    sub_net: str,
    gate_way: str,
    dns_addr: str,
    status: int = Status.S_OK,
) -> bytes:
    """GET_IP_INFO answer: UTF-8, NUL-terminated strings in their fields.

    Limits are the field sizes minus the NUL (255/2047/2047/1023/2047 bytes); the kernel's
    tighter UTF-16 unit limits when it converts for the host are not applied here.
    """
    buf = bytearray(encode_status(status))
    put_ip_fields(buf, adapter_id, addr_family, dhcp_enabled, ip_addr, sub_net, gate_way,
                  dns_addr)
    return bytes(buf)


def put_ip_fields(buf: bytearray, adapter_id: str, addr_family: int, dhcp_enabled: int,
                  ip_addr: str, sub_net: str, gate_way: str, dns_addr: str) -> None:
    """The `hv_kvp_ipaddr_value` body, the same in the kernel's requests and the answers."""
    put_text(buf, IP_ADAPTER_ID_OFFSET, IP_ADAPTER_ID_FIELD, adapter_id, "adapter_id")
    buf[IP_ADDR_FAMILY_OFFSET] = check_u8(addr_family, "addr_family")
    buf[IP_DHCP_ENABLED_OFFSET] = check_u8(dhcp_enabled, "dhcp_enabled")
    put_text(buf, IP_ADDR_OFFSET, IP_ADDR_FIELD, ip_addr, "ip_addr")
    put_text(buf, IP_SUB_NET_OFFSET, IP_SUB_NET_FIELD, sub_net, "sub_net")
    put_text(buf, IP_GATE_WAY_OFFSET, IP_GATE_WAY_FIELD, gate_way, "gate_way")
    put_text(buf, IP_DNS_ADDR_OFFSET, IP_DNS_ADDR_FIELD, dns_addr, "dns_addr")
