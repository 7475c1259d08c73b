"""The kernel's side of ``struct hv_kvp_msg``: requests as ``drivers/hv/hv_kvp.c`` builds them,
and the daemon's replies read the way it reads them.

The simulated host (`kvpfs.host.simulator`), the emulated device and the tests use this to
produce exactly what the kernel produces; kvpfs itself only needs `kvpfs.wire.protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpfs.wire.protocol import (
    DELETE_KEY_OFFSET,
    DELETE_KEY_SIZE_OFFSET,
    ENUM_INDEX_OFFSET,
    ENUM_KEY_OFFSET,
    ENUM_VALUE_OFFSET,
    ERROR_OFFSET,
    IP_ADAPTER_ID_OFFSET,
    IP_ADDR_FAMILY_OFFSET,
    IP_ADDR_OFFSET,
    IP_DHCP_ENABLED_OFFSET,
    IP_DNS_ADDR_OFFSET,
    IP_GATE_WAY_OFFSET,
    IP_SUB_NET_OFFSET,
    KEY_FIELD,
    MESSAGE_SIZE,
    OP_OFFSET,
    POOL_OFFSET,
    REGISTER_VERSION_FIELD,
    REGISTER_VERSION_OFFSET,
    SET_KEY_OFFSET,
    SET_KEY_SIZE_OFFSET,
    SET_VALUE_OFFSET,
    SET_VALUE_SIZE_OFFSET,
    U32,
    VALUE_FIELD,
    Buffer,
    Op,
    ProtocolError,
    ValueType,
    check_u32,
    new_message,
    put_cstring,
    put_ip_fields,
    put_text,
)


@dataclass(frozen=True, slots=True)
class DaemonMessage:
    """Kernel-side view of a daemon write: the header bytes and the same 4 bytes as ``error``."""

    op: int
    pool: int
    status: int
    raw: bytes


def encode_raw(op: int, pool: int) -> bytearray:
    """A zeroed, mutable message with only the header set (for tests and fuzzing)."""
    return new_message(op, pool)


def encode_set_request(
    pool: int, key: bytes, value: bytes, value_type: int = ValueType.REG_SZ
) -> bytes:
    """What ``kvp_send_key`` hands the daemon for a host SET.

    Like the kernel, ``value_type`` is *not* copied into the message (offset 4 stays 0); it
    only decides the value: REG_SZ is the converted string, REG_U32/REG_U64 the decimal
    ``sprintf`` text (pass it as ``value``), and any other type leaves value empty with
    value_size 0.  ``pool`` is any u8 because the kernel does not validate the host's pool.
    """
    buf = new_message(Op.SET, pool)
    key_size = put_cstring(buf, SET_KEY_OFFSET, KEY_FIELD, key, "key")
    check_u32(value_type, "value_type")
    if value_type in (ValueType.REG_U32, ValueType.REG_U64):
        limit = 0xFFFF_FFFF if value_type == ValueType.REG_U32 else 0xFFFF_FFFF_FFFF_FFFF
        if not (value.isdigit() and value.isascii() and int(value) <= limit):
            raise ValueError(f"{ValueType(value_type).name} value must be decimal <= {limit}")
    elif value_type != ValueType.REG_SZ:
        if value:
            raise ValueError(f"value_type {value_type} is unsupported; the kernel sends no value")
        U32.pack_into(buf, SET_KEY_SIZE_OFFSET, key_size)
        return bytes(buf)
    value_size = put_cstring(buf, SET_VALUE_OFFSET, VALUE_FIELD, value, "value")
    U32.pack_into(buf, SET_KEY_SIZE_OFFSET, key_size)
    U32.pack_into(buf, SET_VALUE_SIZE_OFFSET, value_size)
    return bytes(buf)


def encode_get_request(pool: int, key: bytes) -> bytes:
    """Host GET as the kernel passes it: key and key_size only, value_size left 0."""
    buf = new_message(Op.GET, pool)
    key_size = put_cstring(buf, SET_KEY_OFFSET, KEY_FIELD, key, "key")
    U32.pack_into(buf, SET_KEY_SIZE_OFFSET, key_size)
    return bytes(buf)


def encode_delete_request(pool: int, key: bytes) -> bytes:
    buf = new_message(Op.DELETE, pool)
    key_size = put_cstring(buf, DELETE_KEY_OFFSET, KEY_FIELD, key, "key")
    U32.pack_into(buf, DELETE_KEY_SIZE_OFFSET, key_size)
    return bytes(buf)


def encode_enumerate_request(pool: int, index: int) -> bytes:
    buf = new_message(Op.ENUMERATE, pool)
    U32.pack_into(buf, ENUM_INDEX_OFFSET, check_u32(index, "index"))
    return bytes(buf)


def encode_ip_info_request(
    op: int,
    adapter_id: str,
    addr_family: int = 0,
    dhcp_enabled: int = 0,
    ip_addr: str = "",
    sub_net: str = "",
    gate_way: str = "",
    dns_addr: str = "",
    *,
    pool: int = 0,
) -> bytes:
    """GET_IP_INFO / SET_IP_INFO as the kernel passes them (GET fills adapter_id/family only)."""
    if op not in (Op.GET_IP_INFO, Op.SET_IP_INFO):
        raise ValueError(f"op {op} is not GET_IP_INFO (4) or SET_IP_INFO (5)")
    buf = new_message(op, pool)
    put_ip_fields(buf, adapter_id, addr_family, dhcp_enabled, ip_addr, sub_net, gate_way,
                  dns_addr)
    return bytes(buf)


def encode_register_reply(op: int = Op.REGISTER1, version: str = "3.1") -> bytes:
    """The kernel's handshake answer (``kvp_register``): op echo plus HV_DRV_VERSION."""
    buf = new_message(op)
    put_text(buf, REGISTER_VERSION_OFFSET, REGISTER_VERSION_FIELD, version, "version")
    return bytes(buf)


def _check_written(buf: Buffer) -> bytes:
    """The kernel rejects writes < 7432 bytes (EINVAL) and ignores bytes beyond 7432."""
    data = bytes(buf)
    if len(data) < MESSAGE_SIZE:
        raise ProtocolError(
            f"daemon wrote {len(data)} bytes; the kernel needs {MESSAGE_SIZE} (EINVAL)",
            op=data[0] if data else None,
            pool=data[1] if len(data) > 1 else None,
        )
    return data[:MESSAGE_SIZE]


def decode_daemon_message(buf: Buffer) -> DaemonMessage:
    """Read a daemon write the way the kernel does: header bytes, and the same bytes as u32.

    ``status`` is unsigned (a daemon's ``-EINVAL`` reads as 0xFFFFFFEA), matching how the
    kernel copies it into the 32-bit ``icmsg_hdr.status``.
    """
    data = _check_written(buf)
    return DaemonMessage(
        op=data[OP_OFFSET],
        pool=data[POOL_OFFSET],
        status=U32.unpack_from(data, ERROR_OFFSET)[0],
        raw=data,
    )


def _strlen_at(data: bytes, offset: int) -> bytes:
    end = data.find(b"\0", offset)
    return data[offset:end if end >= 0 else len(data)]


def reply_key_value(buf: Buffer) -> tuple[bytes, bytes]:
    """The key (offset 20) and value (offset 532) the kernel converts for ENUMERATE and GET.

    The kernel measures both with an unbounded ``strlen``: an unterminated key runs on into
    the value area and beyond.  That is emulated by scanning on to the next NUL; where the
    kernel would read past the 7432-byte message into neighbouring heap memory, this stops
    at the end of the message.  (For GET the kernel only uses the value.)
    """
    data = _check_written(buf)
    return _strlen_at(data, ENUM_KEY_OFFSET), _strlen_at(data, ENUM_VALUE_OFFSET)


@dataclass(frozen=True, slots=True)
class IpInfoReply:
    """A GET_IP_INFO answer as the kernel reads it: raw UTF-8 fields, not yet converted."""

    status: int
    adapter_id: bytes
    addr_family: int
    dhcp_enabled: int
    ip_addr: bytes
    sub_net: bytes
    gate_way: bytes
    dns_addr: bytes


def decode_ip_info_reply(buf: Buffer) -> IpInfoReply:
    """Read a GET_IP_INFO answer the way ``process_ob_ipinfo`` does.

    Each string is measured with ``strlen`` from its offset, so an unterminated field runs
    on into the next (stopped here at the end of the message); the fields are only
    meaningful when ``status`` is S_OK.
    """
    data = _check_written(buf)
    return IpInfoReply(
        status=U32.unpack_from(data, ERROR_OFFSET)[0],
        adapter_id=_strlen_at(data, IP_ADAPTER_ID_OFFSET),
        addr_family=data[IP_ADDR_FAMILY_OFFSET],
        dhcp_enabled=data[IP_DHCP_ENABLED_OFFSET],
        ip_addr=_strlen_at(data, IP_ADDR_OFFSET),
        sub_net=_strlen_at(data, IP_SUB_NET_OFFSET),
        gate_way=_strlen_at(data, IP_GATE_WAY_OFFSET),
        dns_addr=_strlen_at(data, IP_DNS_ADDR_OFFSET),
    )
