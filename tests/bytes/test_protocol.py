"""Tests for kvpfs.wire.protocol and kvpfs.wire.kernelconv (bytes only, no devices).

Offsets are written here as literals, independently of the module's constants, and were
taken from gcc 12.2 ``offsetof`` on ``struct hv_kvp_msg`` from Debian linux-libc-dev
6.1.192-2 ``/usr/include/linux/hyperv.h``:

    sizeof(struct hv_kvp_msg) 7432; exchg_msg_value 2572; msg_enumerate 2576;
    msg_delete 516; register 512; ipaddr_value 7426
    kvp_set/kvp_get.data: value_type 4, key_size 8, value_size 12, key 16, value 528
    kvp_enum_data: index 4, data.value_type 8, data.key_size 12, data.value_size 16,
                   data.key 20, data.value 532
    kvp_delete: key_size 4, key 8;  kvp_register.version 4
    kvp_ip_val: adapter_id 4, addr_family 260, dhcp_enabled 261, ip_addr 262,
                sub_net 2310, gate_way 4358, dns_addr 5382
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpfs.wire import kernelconv as kc
from kvpfs.wire import kernelside
from kvpfs.wire import protocol as p
from kvpfs.wire.protocol import (
    DeleteRequest,
    EnumerateRequest,
    GetRequest,
    IpInfoRequest,
    Op,
    Pool,
    ProtocolError,
    RegisterReply,
    SetRequest,
    Status,
    UnknownRequest,
    ValueType,
    decode_request,
)

SIZE = 7432


def blank(op: int, pool: int = 0) -> bytearray:
    """A zero message built without the module, to pin the layout independently."""
    buf = bytearray(SIZE)
    buf[0] = op
    buf[1] = pool
    return buf


def set_msg(pool: int, key: bytes, value: bytes, key_size: int | None = None,
            value_size: int | None = None, op: int = 1) -> bytearray:
    buf = blank(op, pool)
    struct.pack_into("<III", buf, 4, 0,
                     len(key) + 1 if key_size is None else key_size,
                     len(value) + 1 if value_size is None else value_size)
    buf[16:16 + len(key)] = key
    buf[528:528 + len(value)] = value
    return buf


def get_msg(pool: int, key: bytes, key_size: int | None = None) -> bytearray:
    buf = blank(0, pool)
    struct.pack_into("<I", buf, 8, len(key) + 1 if key_size is None else key_size)
    buf[16:16 + len(key)] = key
    return buf


def delete_msg(pool: int, key: bytes, key_size: int | None = None) -> bytearray:
    buf = blank(2, pool)
    struct.pack_into("<I", buf, 4, len(key) + 1 if key_size is None else key_size)
    buf[8:8 + len(key)] = key
    return buf


def cstr_at(buf: bytes, off: int) -> bytes:
    return bytes(buf[off:buf.index(0, off)])


def errmsg(exc: pytest.ExceptionInfo[ProtocolError]) -> str:
    return str(exc.value)


# --------------------------------------------------------------------------- layout


def test_sizes_and_offsets_match_gcc() -> None:
    assert p.MESSAGE_SIZE == 7432
    assert (p.KEY_FIELD, p.VALUE_FIELD) == (512, 2048)
    assert (p.HEADER_SIZE, p.BODY_OFFSET, p.BODY_SIZE) == (4, 4, 7428)
    assert (p.OP_OFFSET, p.POOL_OFFSET, p.ERROR_OFFSET) == (0, 1, 0)
    assert (p.SET_BODY_SIZE, p.GET_BODY_SIZE, p.ENUM_BODY_SIZE) == (2572, 2572, 2576)
    assert (p.DELETE_BODY_SIZE, p.REGISTER_BODY_SIZE, p.IP_BODY_SIZE) == (516, 512, 7426)
    assert (p.SET_VALUE_TYPE_OFFSET, p.SET_KEY_SIZE_OFFSET, p.SET_VALUE_SIZE_OFFSET,
            p.SET_KEY_OFFSET, p.SET_VALUE_OFFSET) == (4, 8, 12, 16, 528)
    assert (p.ENUM_INDEX_OFFSET, p.ENUM_VALUE_TYPE_OFFSET, p.ENUM_KEY_SIZE_OFFSET,
            p.ENUM_VALUE_SIZE_OFFSET, p.ENUM_KEY_OFFSET, p.ENUM_VALUE_OFFSET) == (
                4, 8, 12, 16, 20, 532)
    assert (p.DELETE_KEY_SIZE_OFFSET, p.DELETE_KEY_OFFSET) == (4, 8)
    assert (p.REGISTER_VERSION_OFFSET, p.REGISTER_VERSION_FIELD) == (4, 512)
    assert (p.IP_ADAPTER_ID_OFFSET, p.IP_ADAPTER_ID_FIELD) == (4, 256)
    assert (p.IP_ADDR_FAMILY_OFFSET, p.IP_DHCP_ENABLED_OFFSET) == (260, 261)
    assert (p.IP_ADDR_OFFSET, p.IP_ADDR_FIELD) == (262, 2048)
    assert (p.IP_SUB_NET_OFFSET, p.IP_SUB_NET_FIELD) == (2310, 2048)
    assert (p.IP_GATE_WAY_OFFSET, p.IP_GATE_WAY_FIELD) == (4358, 1024)
    assert (p.IP_DNS_ADDR_OFFSET, p.IP_DNS_ADDR_FIELD) == (5382, 2048)


def test_layout_is_self_consistent() -> None:
    # Each body struct ends where its last field ends; all fit in the 7428-byte union.
    assert p.SET_VALUE_OFFSET + p.VALUE_FIELD == p.BODY_OFFSET + p.SET_BODY_SIZE
    assert p.ENUM_VALUE_OFFSET + p.VALUE_FIELD == p.BODY_OFFSET + p.ENUM_BODY_SIZE
    assert p.DELETE_KEY_OFFSET + p.KEY_FIELD == p.BODY_OFFSET + p.DELETE_BODY_SIZE
    assert p.IP_DNS_ADDR_OFFSET + p.IP_DNS_ADDR_FIELD == p.BODY_OFFSET + p.IP_BODY_SIZE
    assert p.BODY_OFFSET + p.IP_BODY_SIZE <= p.MESSAGE_SIZE
    # The body union is not itself packed and hv_kvp_msg_delete (not packed) has 4-byte
    # alignment, so gcc rounds the largest member (7426) up to 7428.
    largest = max(p.SET_BODY_SIZE, p.ENUM_BODY_SIZE, p.DELETE_BODY_SIZE,
                  p.REGISTER_BODY_SIZE, p.IP_BODY_SIZE)
    assert (largest + 3) // 4 * 4 == p.BODY_SIZE == 7428


def test_enum_values() -> None:
    assert [int(o) for o in Op] == [0, 1, 2, 3, 4, 5, 100]
    assert p.LEGACY_REGISTER == 4
    assert [int(x) for x in Pool] == [0, 1, 2, 3, 4]
    assert (ValueType.REG_SZ, ValueType.REG_U32, ValueType.REG_U64) == (1, 4, 8)
    assert Status.S_OK == 0
    assert Status.E_FAIL == 0x80004005
    assert Status.S_CONT == 0x80070103
    assert Status.ERROR_NOT_SUPPORTED == 0x80070032
    assert Status.ERROR_MACHINE_LOCKED == 0x800704F7
    assert Status.ERROR_DEVICE_NOT_CONNECTED == 0x8007048F
    assert Status.INVALIDARG == 0x80070057
    assert Status.GUID_NOTFOUND == 0x80041002
    assert Status.ERROR_ALREADY_EXISTS == 0x80070050
    assert Status.ERROR_DISK_FULL == 0x80070070


# --------------------------------------------------------------------------- decoding


def test_decode_set_from_hand_built_bytes() -> None:
    req = decode_request(set_msg(1, b"key", "välue".encode()))
    assert req == SetRequest(pool=1, key=b"key", value="välue".encode(), value_type=0)
    assert isinstance(req, SetRequest) and req.pool is Pool.GUEST


def test_decode_set_value_type_read_from_offset_4() -> None:
    buf = set_msg(0, b"k", b"12")
    struct.pack_into("<I", buf, 4, 4)
    assert decode_request(buf) == SetRequest(0, b"k", b"12", 4)


def test_decode_set_value_size_zero_with_empty_value_is_accepted() -> None:
    # The kernel sends value_size 0 and no value for unsupported host value types.
    assert decode_request(set_msg(0, b"k", b"", value_size=0)) == SetRequest(0, b"k", b"", 0)
    assert decode_request(set_msg(0, b"k", b"", value_size=1)) == SetRequest(0, b"k", b"", 0)


def test_decode_set_max_sizes() -> None:
    key, value = b"k" * 511, b"v" * 2047
    assert decode_request(set_msg(4, key, value)) == SetRequest(4, key, value, 0)


def test_decode_get_ignores_value_fields() -> None:
    buf = get_msg(3, b"HostName")
    assert decode_request(buf) == GetRequest(pool=3, key=b"HostName")
    struct.pack_into("<I", buf, 12, 999)  # garbage value_size: not an input of GET
    buf[528] = 0xFF
    assert decode_request(buf) == GetRequest(pool=3, key=b"HostName")


def test_decode_delete_from_hand_built_bytes() -> None:
    assert decode_request(delete_msg(1, b"gone")) == DeleteRequest(pool=1, key=b"gone")


def test_decode_enumerate_index_is_u32() -> None:
    buf = blank(3, 2)
    struct.pack_into("<I", buf, 4, 0xFFFFFFFF)
    assert decode_request(buf) == EnumerateRequest(pool=2, index=0xFFFFFFFF)
    struct.pack_into("<I", buf, 4, 7)
    assert decode_request(buf) == EnumerateRequest(pool=2, index=7)


def test_decode_ip_info_from_hand_built_bytes() -> None:
    buf = blank(5, 0)
    buf[4:4 + 6] = b"{GUID}"
    buf[260] = 3
    buf[261] = 1
    buf[262:262 + 9] = b"10.0.0.5;"
    buf[2310:2310 + 13] = b"255.255.255.0"
    buf[4358:4358 + 8] = b"10.0.0.1"
    buf[5382:5382 + 7] = b"1.1.1.1"
    assert decode_request(buf) == IpInfoRequest(
        op=5, pool=0, adapter_id="{GUID}", addr_family=3, dhcp_enabled=1,
        ip_addr="10.0.0.5;", sub_net="255.255.255.0", gate_way="10.0.0.1", dns_addr="1.1.1.1")


def test_decode_get_ip_info_empty_fields() -> None:
    buf = blank(4, 0)
    buf[4:4 + 17] = b"00:15:5D:00:00:01"
    buf[260] = 1
    req = decode_request(buf)
    assert req == IpInfoRequest(4, 0, "00:15:5D:00:00:01", 1, 0, "", "", "", "")


def test_decode_register_reply_only_in_handshake() -> None:
    buf = blank(100, 0)
    buf[4:7] = b"3.1"
    assert decode_request(buf, in_handshake=True) == RegisterReply(op=100, version="3.1")
    assert decode_request(buf) == UnknownRequest(op=100, pool=0)


def test_decode_legacy_register_reply_in_handshake() -> None:
    buf = blank(4, 0)
    buf[4:7] = b"3.1"
    assert decode_request(buf, in_handshake=True) == RegisterReply(op=4, version="3.1")
    assert isinstance(decode_request(buf), IpInfoRequest)  # outside: GET_IP_INFO


def test_decode_register_reply_errors() -> None:
    buf = blank(100, 0)
    buf[4:4 + 512] = b"x" * 512
    with pytest.raises(ProtocolError, match="not NUL-terminated within the 512-byte"):
        decode_request(buf, in_handshake=True)
    buf[4:4 + 512] = bytes(512)
    buf[4:6] = b"\xc3("
    with pytest.raises(ProtocolError, match="invalid UTF-8 at byte 0") as exc:
        decode_request(buf, in_handshake=True)
    assert exc.value.op == 100


def test_decode_register_reply_empty_version() -> None:
    assert decode_request(blank(100), in_handshake=True) == RegisterReply(100, "")


@pytest.mark.parametrize("op", [6, 7, 99, 101, 255])
def test_unknown_ops_are_not_errors(op: int) -> None:
    buf = blank(op, 9)
    buf[4:] = b"\xff" * (SIZE - 4)  # even with garbage everywhere
    assert decode_request(buf) == UnknownRequest(op=op, pool=9)
    assert decode_request(buf, in_handshake=True) == UnknownRequest(op=op, pool=9)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    buf = set_msg(1, b"k", b"v")
    want = SetRequest(1, b"k", b"v", 0)
    assert decode_request(bytes(buf)) == want
    assert decode_request(buf) == want
    assert decode_request(memoryview(buf)) == want


# --------------------------------------------------------------------------- protocol errors


@pytest.mark.parametrize("length", [0, 1, 2, 4, 7431, 7433, 8192])
def test_wrong_length(length: int) -> None:
    buf = bytes([1, 2]) + bytes(max(0, length - 2)) if length >= 2 else bytes([1] * length)
    with pytest.raises(ProtocolError, match=f"{length} bytes.*exactly 7432") as exc:
        decode_request(buf)
    assert exc.value.op == (1 if length >= 1 else None)
    assert exc.value.pool == (2 if length >= 2 else None)


@pytest.mark.parametrize("op", [0, 1, 2, 3])
@pytest.mark.parametrize("pool", [5, 7, 255])
def test_pool_out_of_range(op: int, pool: int) -> None:
    builders = {0: lambda: get_msg(pool, b"k"), 1: lambda: set_msg(pool, b"k", b"v"),
                2: lambda: delete_msg(pool, b"k"), 3: lambda: blank(3, pool)}
    with pytest.raises(ProtocolError, match=f"pool {pool} is out of range") as exc:
        decode_request(builders[op]())
    assert (exc.value.op, exc.value.pool) == (op, pool)
    assert isinstance(exc.value, ValueError)


def test_ip_info_pool_is_not_validated() -> None:
    buf = blank(5, 7)
    assert decode_request(buf).pool == 7  # type: ignore[union-attr]


@pytest.mark.parametrize("key_size", [0, 3, 4, 6, 512])
def test_set_key_size_lying(key_size: int) -> None:
    # key is 4 bytes, so the truth is 5; 3 is what enables the reference daemon's prefix match.
    with pytest.raises(ProtocolError) as exc:
        decode_request(set_msg(1, b"abcd", b"v", key_size=key_size))
    msg = errmsg(exc)
    assert f"key_size {key_size}" in msg and "5" in msg and "SET" in msg
    assert (exc.value.op, exc.value.pool) == (1, 1)


@pytest.mark.parametrize("builder", [
    lambda ks: get_msg(0, b"abcd", key_size=ks),
    lambda ks: delete_msg(0, b"abcd", key_size=ks),
])
@pytest.mark.parametrize("key_size", [4, 6])
def test_get_delete_key_size_lying(builder, key_size: int) -> None:
    with pytest.raises(ProtocolError, match=f"key_size {key_size} does not match.*= 5"):
        decode_request(builder(key_size))


@pytest.mark.parametrize("value_size", [1, 3, 5, 2048])
def test_set_value_size_lying(value_size: int) -> None:
    with pytest.raises(ProtocolError, match=f"value_size {value_size} does not match.*= 4"):
        decode_request(set_msg(0, b"k", b"val", value_size=value_size))


def test_set_value_size_zero_with_nonempty_value() -> None:
    with pytest.raises(ProtocolError, match="value_size 0 does not match"):
        decode_request(set_msg(0, b"k", b"val", value_size=0))


def test_key_size_above_field() -> None:
    with pytest.raises(ProtocolError, match="SET key_size 600 exceeds the 512-byte key field"):
        decode_request(set_msg(0, b"k", b"v", key_size=600))
    with pytest.raises(ProtocolError, match="DELETE key_size 513 exceeds the 512-byte"):
        decode_request(delete_msg(0, b"k", key_size=513))
    with pytest.raises(ProtocolError, match="GET key_size 4294967295 exceeds"):
        decode_request(get_msg(0, b"k", key_size=0xFFFFFFFF))


def test_value_size_above_field() -> None:
    with pytest.raises(ProtocolError, match="value_size 2049 exceeds the 2048-byte value"):
        decode_request(set_msg(0, b"k", b"v", value_size=2049))


def test_key_not_terminated() -> None:
    buf = set_msg(0, b"k" * 512, b"v", key_size=512)
    with pytest.raises(ProtocolError, match="key is not NUL-terminated within the 512-byte"):
        decode_request(buf)
    buf = delete_msg(0, b"k" * 512, key_size=512)
    with pytest.raises(ProtocolError, match="DELETE key is not NUL-terminated"):
        decode_request(buf)


def test_value_not_terminated() -> None:
    buf = set_msg(0, b"k", b"v" * 2048, value_size=2048)
    with pytest.raises(ProtocolError, match="value is not NUL-terminated within the 2048"):
        decode_request(buf)


@pytest.mark.parametrize("builder", [
    lambda: set_msg(0, b"", b"v"),
    lambda: get_msg(0, b""),
    lambda: delete_msg(0, b""),
    lambda: set_msg(0, b"", b"v", key_size=0),
])
def test_empty_key(builder) -> None:
    with pytest.raises(ProtocolError, match="key is empty"):
        decode_request(builder())


def test_invalid_utf8_key_and_value() -> None:
    with pytest.raises(ProtocolError, match="SET key: invalid UTF-8 at byte 2"):
        decode_request(set_msg(0, b"ab\xffc", b"v"))
    with pytest.raises(ProtocolError, match="SET value: invalid UTF-8 at byte 3"):
        decode_request(set_msg(0, b"k", b"abc\xed\xa0\x80"))  # encoded surrogate
    with pytest.raises(ProtocolError, match="GET key: invalid UTF-8 at byte 0"):
        decode_request(get_msg(0, b"\xc0\xaf"))  # overlong '/'
    with pytest.raises(ProtocolError, match="DELETE key: invalid UTF-8 at byte 1"):
        decode_request(delete_msg(0, b"a\xe2\x82"))  # truncated sequence


@pytest.mark.parametrize(("offset", "field", "name"), [
    (4, 256, "adapter_id"), (262, 2048, "ip_addr"), (2310, 2048, "sub_net"),
    (4358, 1024, "gate_way"), (5382, 2048, "dns_addr"),
])
def test_ip_info_field_errors(offset: int, field: int, name: str) -> None:
    buf = blank(5, 0)
    buf[offset:offset + field] = b"1" * field
    with pytest.raises(ProtocolError, match=f"{name} is not NUL-terminated within the {field}"):
        decode_request(buf)
    buf[offset:offset + field] = bytes(field)
    buf[offset:offset + 3] = b"1\x802"
    with pytest.raises(ProtocolError, match=f"SET_IP_INFO {name}: invalid UTF-8 at byte 1"):
        decode_request(buf)


# --------------------------------------------------------------------------- kernel encoders


def test_encode_set_request_bytes() -> None:
    buf = kernelside.encode_set_request(1, b"key", b"value")
    want = set_msg(1, b"key", b"value")
    assert buf == bytes(want)  # value_type at 4 stays 0: the kernel never copies it


def test_encode_set_request_value_types() -> None:
    assert kernelside.encode_set_request(0, b"k", b"42", ValueType.REG_U32) == bytes(
        set_msg(0, b"k", b"42"))
    big = b"18446744073709551615"
    assert kernelside.encode_set_request(0, b"k", big, ValueType.REG_U64) == bytes(
        set_msg(0, b"k", big))
    assert kernelside.encode_set_request(0, b"k", b"", 3) == bytes(
        set_msg(0, b"k", b"", value_size=0))
    with pytest.raises(ValueError, match="decimal"):
        kernelside.encode_set_request(0, b"k", b"4294967296", ValueType.REG_U32)
    with pytest.raises(ValueError, match="decimal"):
        kernelside.encode_set_request(0, b"k", b"x", ValueType.REG_U64)
    with pytest.raises(ValueError, match="unsupported"):
        kernelside.encode_set_request(0, b"k", b"x", 2)


def test_encode_get_delete_enumerate_requests() -> None:
    assert kernelside.encode_get_request(2, b"HostName") == bytes(get_msg(2, b"HostName"))
    assert struct.unpack_from("<I", kernelside.encode_get_request(2, b"k"), 12)[0] == 0
    assert kernelside.encode_delete_request(1, b"gone") == bytes(delete_msg(1, b"gone"))
    want = blank(3, 4)
    struct.pack_into("<I", want, 4, 123456)
    assert kernelside.encode_enumerate_request(4, 123456) == bytes(want)


def test_encode_ip_info_request_bytes() -> None:
    buf = kernelside.encode_ip_info_request(Op.SET_IP_INFO, "{G}", 1, 1, "1.2.3.4", "255.0.0.0",
                                   "1.2.3.1", "8.8.8.8")
    assert buf[:2] == b"\x05\x00"
    assert cstr_at(buf, 4) == b"{G}"
    assert (buf[260], buf[261]) == (1, 1)
    assert (cstr_at(buf, 262), cstr_at(buf, 2310), cstr_at(buf, 4358), cstr_at(buf, 5382)) == (
        b"1.2.3.4", b"255.0.0.0", b"1.2.3.1", b"8.8.8.8")
    with pytest.raises(ValueError):
        kernelside.encode_ip_info_request(Op.SET, "x")


def test_encode_register_reply_bytes() -> None:
    want = blank(100)
    want[4:7] = b"3.1"
    assert kernelside.encode_register_reply() == bytes(want)
    assert kernelside.encode_register_reply(4, "x")[:6] == b"\x04\x00\x00\x00x\x00"


def test_encode_raw_is_mutable_and_zeroed() -> None:
    raw = kernelside.encode_raw(7, 3)
    assert isinstance(raw, bytearray)
    assert raw == blank(7, 3)


@pytest.mark.parametrize(("func", "args"), [
    (kernelside.encode_set_request, (0, b"k" * 512, b"v")),
    (kernelside.encode_set_request, (0, b"k", b"v" * 2048)),
    (kernelside.encode_set_request, (0, b"a\0b", b"v")),
    (kernelside.encode_set_request, (256, b"k", b"v")),
    (kernelside.encode_get_request, (0, b"k" * 512)),
    (kernelside.encode_delete_request, (0, b"k" * 512)),
    (kernelside.encode_enumerate_request, (0, -1)),
    (kernelside.encode_enumerate_request, (0, 1 << 32)),
    (kernelside.encode_register_reply, (100, "v" * 512)),
    (kernelside.encode_ip_info_request, (4, "a" * 256)),
    (kernelside.encode_ip_info_request, (5, "a", 256)),
])
def test_kernel_encoders_reject_what_cannot_be_sent(func, args) -> None:
    with pytest.raises(ValueError):
        func(*args)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("pool", list(Pool))
def test_round_trips(pool: Pool) -> None:
    key, value = "ключ/🔑".encode(), "wert ✓".encode()
    assert decode_request(kernelside.encode_set_request(pool, key, value)) == SetRequest(
        pool, key, value, 0)
    assert decode_request(kernelside.encode_get_request(pool, key)) == GetRequest(pool, key)
    assert decode_request(kernelside.encode_delete_request(pool, key)) == DeleteRequest(pool, key)
    assert decode_request(kernelside.encode_enumerate_request(pool, 9)) == EnumerateRequest(pool, 9)


def test_round_trip_ip_info_and_register() -> None:
    msg = kernelside.encode_ip_info_request(Op.GET_IP_INFO, "00:15:5D:AA:BB:CC", addr_family=2)
    assert decode_request(msg) == IpInfoRequest(4, 0, "00:15:5D:AA:BB:CC", 2, 0, "", "", "", "")
    assert decode_request(kernelside.encode_register_reply(), in_handshake=True) == RegisterReply(
        100, "3.1")


utf8_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))


@given(pool=st.sampled_from(list(Pool)),
       key=utf8_text.map(str.encode).filter(lambda b: 0 < len(b) <= 511),
       value=utf8_text.map(str.encode).filter(lambda b: len(b) <= 2047))
def test_round_trip_property(pool: Pool, key: bytes, value: bytes) -> None:
    assert decode_request(kernelside.encode_set_request(pool, key, value)) == SetRequest(
        pool, key, value, 0)
    assert decode_request(kernelside.encode_delete_request(pool, key)) == DeleteRequest(pool, key)


# --------------------------------------------------------------------------- daemon encoders


def test_encode_register() -> None:
    assert p.encode_register() == bytes(blank(100))
    assert p.encode_register(4) == bytes(blank(4))


@pytest.mark.parametrize("status", list(Status))
def test_encode_status(status: Status) -> None:
    want = bytearray(SIZE)
    struct.pack_into("<I", want, 0, status)
    assert p.encode_status(status) == bytes(want)


def test_encode_status_negative_errno_and_range() -> None:
    assert p.encode_status(-22)[:4] == struct.pack("<i", -22)
    assert p.encode_status(-22)[4:] == bytes(SIZE - 4)
    with pytest.raises(ValueError):
        p.encode_status(1 << 32)
    with pytest.raises(ValueError):
        p.encode_status(-(1 << 31) - 1)


def test_encode_enumerate_reply_exact_bytes() -> None:
    want = bytearray(SIZE)
    struct.pack_into("<IIIII", want, 0, 0, 0, 1, 4, 6)  # error, index, type, key_size, value_size
    want[20:23] = b"key"
    want[532:537] = b"value"
    assert p.encode_enumerate_reply(b"key", b"value") == bytes(want)


def test_encode_enumerate_reply_status_and_limits() -> None:
    buf = p.encode_enumerate_reply(b"", b"", Status.S_CONT)
    assert struct.unpack_from("<I", buf, 0)[0] == 0x80070103
    assert buf[4:8] == bytes(4)
    p.encode_enumerate_reply(b"k" * 511, b"v" * 2047)
    with pytest.raises(ValueError, match="512 bytes"):
        p.encode_enumerate_reply(b"k" * 512, b"v")
    with pytest.raises(ValueError, match="2048 bytes"):
        p.encode_enumerate_reply(b"k", b"v" * 2048)
    with pytest.raises(ValueError, match="NUL"):
        p.encode_enumerate_reply(b"k\0", b"v")


def test_enumerate_four_byte_shift() -> None:
    # The same key/value land 4 bytes later in an ENUMERATE reply than in a SET message.
    set_buf = kernelside.encode_set_request(0, b"KEY", b"VALUE")
    enum_buf = p.encode_enumerate_reply(b"KEY", b"VALUE")
    assert set_buf[16:19] == b"KEY" and set_buf[528:533] == b"VALUE"
    assert enum_buf[20:23] == b"KEY" and enum_buf[532:537] == b"VALUE"
    assert enum_buf[16:20] == struct.pack("<I", 6)  # enum value_size where SET's key starts
    assert enum_buf[528:532] == bytes(4)
    # Reading an ENUMERATE reply with SET offsets sees the value_size bytes, not the key.
    assert cstr_at(enum_buf, 16) == b"\x06"


def test_get_reply_value_at_532_and_kernel_reads_it() -> None:
    buf = p.encode_get_reply(b"HostName", b"host.example")
    assert len(buf) == SIZE
    assert buf[:4] == bytes(4)
    assert cstr_at(buf, 532) == b"host.example"
    assert buf[528:532] == bytes(4)  # the reference daemon's spot stays empty
    assert cstr_at(buf, 16) == b"HostName"
    assert struct.unpack_from("<III", buf, 4) == (1, 9, 13)
    _, value = kernelside.reply_key_value(buf)
    assert value == b"host.example"


def test_get_reply_at_528_is_what_the_kernel_misses() -> None:
    # What the reference daemon does: value at 528.  The kernel reads from 532.
    buf = bytearray(SIZE)
    buf[528:528 + 12] = b"host.example"
    assert kernelside.reply_key_value(buf)[1] == b".example"  # "host" is lost
    buf = bytearray(SIZE)
    buf[528:531] = b"abc"
    assert kernelside.reply_key_value(buf)[1] == b""


def test_get_reply_limits_do_not_overlap() -> None:
    buf = p.encode_get_reply(b"k" * 511, b"v" * 2047)
    assert cstr_at(buf, 16) == b"k" * 511
    assert cstr_at(buf, 532) == b"v" * 2047
    assert buf[2579] == 0 and buf[2580:] == bytes(SIZE - 2580)
    with pytest.raises(ValueError):
        p.encode_get_reply(b"k" * 512, b"v")
    with pytest.raises(ValueError):
        p.encode_get_reply(b"k", b"v" * 2048)


def test_encode_ip_info_reply_exact_bytes() -> None:
    want = bytearray(SIZE)
    want[4:7] = b"mac"
    want[260], want[261] = 3, 1
    want[262:269] = b"1.2.3.4"
    want[2310:2312] = b"24"
    want[4358:4365] = b"1.2.3.1"
    want[5382:5389] = b"8.8.8.8"
    assert p.encode_ip_info_reply("mac", 3, 1, "1.2.3.4", "24", "1.2.3.1", "8.8.8.8") == bytes(
        want)
    buf = p.encode_ip_info_reply("", 0, 0, "", "", "", "", status=Status.E_FAIL)
    assert buf == p.encode_status(Status.E_FAIL)


@pytest.mark.parametrize(("args", "name"), [
    (("a" * 256, 0, 0, "", "", "", ""), "adapter_id"),
    (("", 0, 0, "a" * 2048, "", "", ""), "ip_addr"),
    (("", 0, 0, "", "a" * 2048, "", ""), "sub_net"),
    (("", 0, 0, "", "", "a" * 1024, ""), "gate_way"),
    (("", 0, 0, "", "", "", "a" * 2048), "dns_addr"),
    (("", 256, 0, "", "", "", ""), "addr_family"),
    (("", 0, -1, "", "", "", ""), "dhcp_enabled"),
])
def test_encode_ip_info_reply_limits(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        p.encode_ip_info_reply(*args)
    # One less than the field (multibyte counted in bytes) is fine.
    p.encode_ip_info_reply("é" * 127 + "a", 0, 0, "a" * 2047, "a" * 2047, "a" * 1023, "a" * 2047)


def test_replies_are_fresh_zero_buffers() -> None:
    # A garbage-filled request must not influence any reply: replies are built from scratch.
    garbage = bytearray(kernelside.encode_set_request(1, b"k" * 511, b"v" * 2047))
    assert decode_request(garbage) == SetRequest(1, b"k" * 511, b"v" * 2047, 0)
    small = p.encode_enumerate_reply(b"k", b"v")
    big = p.encode_enumerate_reply(b"K" * 100, b"V" * 100)
    assert p.encode_enumerate_reply(b"k", b"v") == small  # no state carried over from `big`
    nonzero = {i for i, b in enumerate(small) if b}
    assert nonzero == {8, 12, 16, 20, 532}
    get = p.encode_get_reply(b"k", b"v")
    assert {i for i, b in enumerate(get) if b} == {4, 8, 12, 16, 532}
    assert p.encode_status(0) == bytes(SIZE)
    assert big.count(0) == SIZE - 200 - 3


# --------------------------------------------------------------------------- kernel-side reads


def test_decode_daemon_message() -> None:
    msg = kernelside.decode_daemon_message(p.encode_status(Status.S_CONT))
    assert (msg.op, msg.pool, msg.status) == (0x03, 0x01, 0x80070103)
    assert msg.raw == p.encode_status(Status.S_CONT)
    reg = kernelside.decode_daemon_message(p.encode_register())
    assert (reg.op, reg.pool, reg.status) == (100, 0, 100)
    neg = kernelside.decode_daemon_message(p.encode_status(-22))
    assert neg.status == 0xFFFFFFEA


def test_decode_daemon_message_lengths() -> None:
    with pytest.raises(ProtocolError, match="7431 bytes") as exc:
        kernelside.decode_daemon_message(bytes([100]) + bytes(7430))
    assert exc.value.op == 100
    long = p.encode_register() + b"\xff" * 10
    msg = kernelside.decode_daemon_message(long)
    assert msg.raw == p.encode_register()  # bytes beyond 7432 are ignored, as by the kernel


def test_reply_key_value_unterminated_key_runs_into_value() -> None:
    buf = bytearray(p.encode_enumerate_reply(b"", b"value"))
    buf[20:532] = b"k" * 512
    key, value = kernelside.reply_key_value(buf)
    assert key == b"k" * 512 + b"value"
    assert value == b"value"


def test_reply_key_value_unterminated_value_runs_to_end_of_message() -> None:
    buf = bytearray(SIZE)
    buf[20] = ord("k")
    buf[532:] = b"v" * (SIZE - 532)
    key, value = kernelside.reply_key_value(buf)
    assert key == b"k"
    assert value == b"v" * (SIZE - 532)


def test_reply_key_value_round_trip() -> None:
    assert kernelside.reply_key_value(p.encode_enumerate_reply("ключ".encode(), b"v")) == (
        "ключ".encode(), b"v")


# --------------------------------------------------------------------------- fuzzing


def _mutated(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(base)
    for pos, val in edits:
        buf[pos % SIZE] = val
    return bytes(buf)


_interesting_offsets = st.sampled_from(
    [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 260, 261, 262, 527, 528, 531, 532, 2310, 2575,
     4358, 5382, 7431])
_edits = st.lists(st.tuples(st.one_of(_interesting_offsets, st.integers(0, SIZE - 1)),
                            st.integers(0, 255)), max_size=12)
_bases = st.sampled_from([
    kernelside.encode_set_request(1, b"key", b"value"),
    kernelside.encode_get_request(0, b"key"),
    kernelside.encode_delete_request(2, b"key"),
    kernelside.encode_enumerate_request(3, 0),
    kernelside.encode_ip_info_request(5, "id", 1, 1, "a", "b", "c", "d"),
    kernelside.encode_register_reply(),
])


def _only_protocol_errors(buf: bytes, in_handshake: bool) -> None:
    try:
        decode_request(buf, in_handshake=in_handshake)
    except ProtocolError as exc:
        assert str(exc)
        assert exc.op is None or 0 <= exc.op <= 255
        assert exc.pool is None or 0 <= exc.pool <= 255


_BIG = [HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large]


@settings(suppress_health_check=_BIG)
@given(st.binary(min_size=SIZE, max_size=SIZE), st.booleans())
def test_fuzz_arbitrary_full_size_buffers(buf: bytes, in_handshake: bool) -> None:
    _only_protocol_errors(buf, in_handshake)


@given(_bases, _edits, st.booleans())
def test_fuzz_mutated_valid_messages(base: bytes, edits, in_handshake: bool) -> None:
    _only_protocol_errors(_mutated(base, edits), in_handshake)


@given(st.integers(0, 3), st.integers(0, 255), st.binary(max_size=2048), st.booleans())
def test_fuzz_field_contents(op: int, pool: int, blob: bytes, in_handshake: bool) -> None:
    buf = kernelside.encode_raw(op, pool)
    buf[8:8 + min(len(blob), 16)] = blob[:16]  # sizes
    buf[16:16 + min(len(blob), 512)] = blob[:512]
    buf[528:528 + len(blob)] = blob
    _only_protocol_errors(bytes(buf[:SIZE]), in_handshake)


@given(st.binary(max_size=SIZE + 16), st.booleans())
def test_fuzz_arbitrary_lengths(buf: bytes, in_handshake: bool) -> None:
    if len(buf) != SIZE:
        with pytest.raises(ProtocolError):
            decode_request(buf, in_handshake=in_handshake)
    else:
        _only_protocol_errors(buf, in_handshake)


@settings(suppress_health_check=_BIG)
@given(st.binary(min_size=SIZE, max_size=SIZE))
def test_fuzz_kernel_side_readers(buf: bytes) -> None:
    msg = kernelside.decode_daemon_message(buf)
    assert msg.status == int.from_bytes(buf[:4], "little")
    key, value = kernelside.reply_key_value(buf)
    assert b"\0" not in key and b"\0" not in value


# --------------------------------------------------------------------------- kernelconv


def test_kernelconv_constants() -> None:
    assert (kc.HOST_KEY_MAX_BYTES, kc.HOST_VALUE_MAX_BYTES) == (511, 2047)
    assert (kc.GUEST_KEY_MAX_UNITS, kc.GUEST_VALUE_MAX_UNITS) == (254, 1022)


def test_utf16_units() -> None:
    assert kc.utf16_units("") == 0
    assert kc.utf16_units("abc") == 3
    assert kc.utf16_units("é€") == 2
    assert kc.utf16_units("😀") == 2
    assert kc.utf16_units("\ud800") == 1


def test_host_to_guest_basics() -> None:
    assert kc.host_to_guest("Hello, wörld 😀", 511) == "Hello, wörld 😀".encode()
    assert kc.host_to_guest("abc\0def", 511) == b"abc"
    assert kc.host_to_guest("", 511) == b""
    assert kc.host_to_guest("abc", 0) == b""


def test_host_to_guest_ascii_truncation_at_limits() -> None:
    assert kc.host_to_guest("a" * 600, kc.HOST_KEY_MAX_BYTES) == b"a" * 511
    assert kc.host_to_guest("a" * 3000, kc.HOST_VALUE_MAX_BYTES) == b"a" * 2047


@pytest.mark.parametrize(("limit", "char", "width"), [
    (511, "é", 2), (511, "€", 3), (511, "😀", 4),
    (2047, "é", 2), (2047, "€", 3), (2047, "😀", 4),
])
def test_host_to_guest_multibyte_at_boundary(limit: int, char: str, width: int) -> None:
    # Exactly enough room: the character is copied, and nothing after it.
    exact = "a" * (limit - width) + char
    assert kc.host_to_guest(exact + "z", limit) == exact.encode()
    # 0..width-1 bytes of room left: the character does not fit.
    for room in range(width):
        prefix = "a" * (limit - room)
        got = kc.host_to_guest(prefix + char + "z", limit)
        assert got == prefix.encode()  # current kernels stop, never split the character
        got.decode("utf-8")
        # Kernels before 25524b619029 skipped the character and copied "z" if it fit.
        old = kc.host_to_guest(prefix + char + "z", limit, skip_oversized=True)
        assert old == (prefix + "z").encode() if room >= 1 else old == prefix.encode()


def test_host_to_guest_surrogates() -> None:
    assert kc.host_to_guest("a\udc00b", 511) == b"ab"  # lone low: dropped
    assert kc.host_to_guest("a\ud800b", 511) == b"ab"  # lone high: dropped, b kept
    assert kc.host_to_guest("a\ud800", 511) == b"a"  # high at the end: stop
    assert kc.host_to_guest("\ud83d\ude00", 511) == "😀".encode()  # pair from a str
    assert kc.host_to_guest("\ud800\ud83d\ude00", 511) == "😀".encode()


def test_host_to_guest_negative_limit() -> None:
    with pytest.raises(ValueError):
        kc.host_to_guest("a", -1)


def test_guest_to_host_basics() -> None:
    assert kc.guest_to_host("Grüße 😀".encode(), 254) == "Grüße 😀"
    assert kc.guest_to_host(b"abc\0def", 254) == "abc"
    assert kc.guest_to_host(b"", 254) == ""
    assert kc.guest_to_host(b"abc", 0) == ""


@pytest.mark.parametrize("limit", [kc.GUEST_KEY_MAX_UNITS, kc.GUEST_VALUE_MAX_UNITS])
def test_guest_to_host_unit_truncation(limit: int) -> None:
    assert kc.guest_to_host(b"a" * (limit + 10), limit) == "a" * limit
    assert kc.guest_to_host("é".encode() * (limit + 1), limit) == "é" * limit
    # A surrogate pair needing 2 units when 1 is left is dropped, and the string ends there.
    text = "a" * (limit - 1) + "😀" + "b"
    assert kc.guest_to_host(text.encode(), limit) == "a" * (limit - 1)
    text = "a" * (limit - 2) + "😀" + "b"
    assert kc.guest_to_host(text.encode(), limit) == "a" * (limit - 2) + "😀"
    assert kc.utf16_units(kc.guest_to_host(("😀" * limit).encode(), limit)) == limit


@pytest.mark.parametrize(("data", "pos"), [
    (b"\xff", 0), (b"ab\x80", 2), (b"a\xc3", 1), (b"\xc0\xaf", 0), (b"x\xed\xa0\x80", 1),
    (b"\xf4\x90\x80\x80", 0), (b"\xf8\x88\x80\x80\x80", 0), (b"\xe2\x28\xa1", 0),
])
def test_guest_to_host_invalid_utf8(data: bytes, pos: int) -> None:
    with pytest.raises(kc.ConversionError, match=f"invalid UTF-8 at byte {pos}"):
        kc.guest_to_host(data, 1022)
    assert issubclass(kc.ConversionError, ValueError)


def test_guest_to_host_invalid_utf8_beyond_limit_is_not_seen() -> None:
    assert kc.guest_to_host(b"a" * 254 + b"\xff", 254) == "a" * 254
    with pytest.raises(kc.ConversionError):
        kc.guest_to_host(b"a" * 253 + b"\xff", 254)
    # A bad 4-byte sequence is examined before the "does the pair fit" check.
    with pytest.raises(kc.ConversionError):
        kc.guest_to_host(b"a" * 253 + b"\xf4\x90\x80\x80", 254)
    assert kc.guest_to_host(b"a" * 253 + b"\xf0\x9f\x98\x80\xff", 254) == "a" * 253


def _longest_fitting_prefix(text: str, limit: int) -> str:
    out, used = [], 0
    for ch in text:
        used += len(ch.encode("utf-8"))
        if used > limit:
            break
        out.append(ch)
    return "".join(out)


@given(st.text(), st.integers(0, 2100))
def test_host_to_guest_property(text: str, limit: int) -> None:
    got = kc.host_to_guest(text, limit)
    assert len(got) <= limit
    clean = text.split("\0", 1)[0]
    assert got.decode("utf-8") == _longest_fitting_prefix(clean, limit)


@given(st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010)
               | st.sampled_from("a\0é😀")), st.integers(0, 40))
def test_host_to_guest_property_with_surrogates(text: str, limit: int) -> None:
    got = kc.host_to_guest(text, limit)
    assert len(got) <= limit
    got.decode("utf-8")  # lone surrogates never get through
    recombined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "ignore")
    assert recombined.split("\0", 1)[0].startswith(got.decode("utf-8"))


@given(utf8_text, st.integers(0, 1100))
def test_guest_to_host_property(text: str, limit: int) -> None:
    got = kc.guest_to_host(text.encode(), limit)
    assert text.startswith(got)
    assert kc.utf16_units(got) <= limit
    if kc.utf16_units(text) <= limit:
        assert got == text
    else:
        assert kc.utf16_units(got) >= limit - 1  # at most the one pair that did not fit


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.integers(0, 1100))
def test_guest_to_host_matches_strict_utf8(data: bytes, limit: int) -> None:
    # The kernel rejects what strict UTF-8 rejects, but only within what it reads.
    data = data.split(b"\0", 1)[0]
    try:
        got = kc.guest_to_host(data, limit)
    except kc.ConversionError:
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
        return
    assert got.encode("utf-8") == data[:len(got.encode("utf-8"))]
    if kc.utf16_units(got) < limit - 1:
        assert got.encode("utf-8") == data


def test_host_to_guest_then_guest_to_host_key_limits() -> None:
    # A 300-char key: the guest gets 300 bytes (< 511), the host gets back only 254 units.
    key = "k" * 300
    guest = kc.host_to_guest(key, kc.HOST_KEY_MAX_BYTES)
    assert guest == key.encode()
    assert kc.guest_to_host(guest, kc.GUEST_KEY_MAX_UNITS) == "k" * 254
