"""Tests for kvpfs.wire.names: the reversible key <-> file-name escaping."""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from kvpfs.wire.names import (
    LONG_MARK,
    NAME_MAX,
    InvalidName,
    escape_key,
    is_shortened,
    key_to_name,
    name_to_key,
)

KEY_MAX_BYTES = 511

# Characters that matter to the escaping, mixed into arbitrary Unicode (no NUL, no lone
# surrogates: a key is UTF-8 text without NUL).
SPECIAL = ["/", "%", ".", "..", "%~", "~", "\n", "\t", "\x01", "\x1f", "\x7f", "%2F", "é", "🎉"]
any_char = st.characters(exclude_characters="\0", exclude_categories=("Cs",))
key_text = st.lists(st.sampled_from(SPECIAL) | any_char, min_size=1, max_size=254).map("".join)


def short_keys(max_chars: int = 254):
    return key_text.map(lambda t: t[:max_chars]).filter(bool).map(str.encode)


all_keys = st.one_of(
    short_keys(),
    st.text(alphabet=st.sampled_from("ab/%.é日🎉\x05"), min_size=1, max_size=511)
    .map(str.encode)
    .filter(lambda k: len(k) <= KEY_MAX_BYTES),
)

long_prefix = st.text(alphabet=st.sampled_from("ab/%.é"), min_size=256, max_size=330)
long_keys = st.builds(
    lambda head, tail: (head + tail).encode(),
    long_prefix,
    st.text(alphabet=any_char, max_size=20),
).filter(lambda k: len(k) <= KEY_MAX_BYTES)


def check_name_is_safe(name: bytes) -> None:
    assert name
    assert b"/" not in name
    assert b"\0" not in name
    assert name not in (b".", b"..")
    assert not name.startswith(b".")
    assert len(name) <= NAME_MAX
    name.decode("utf-8")  # shown as text by every tool


@given(short_keys())
@example(b".")
@example(b"..")
@example(b".hidden")
@example(b"a/b")
@example(b"100%")
@example(b"%~")
@example(b"%2F")
@example(b"line\nbreak")
@example(b"\x7f")
@example("ключ ☃ 🎉".encode())
def test_round_trip_when_not_shortened(key: bytes) -> None:
    name = key_to_name(key)
    assume(not is_shortened(name))
    assert name == escape_key(key)
    assert name_to_key(name) == key


@given(all_keys)
@example(b"." * KEY_MAX_BYTES)
@example(b"/" * KEY_MAX_BYTES)
@example("🎉".encode() * 127)
@example(b"a" * 236 + "é".encode() * 100)
def test_names_are_always_safe(key: bytes) -> None:
    check_name_is_safe(key_to_name(key))


@given(long_keys)
def test_long_keys_get_marked_short_names(key: bytes) -> None:
    name = key_to_name(key)
    assert len(escape_key(key)) > NAME_MAX
    assert is_shortened(name)
    assert LONG_MARK in name
    check_name_is_safe(name)
    assert key_to_name(key) == name  # stable
    with pytest.raises(InvalidName):
        name_to_key(name)


@given(long_keys, long_keys)
def test_short_names_differ_for_different_keys(a: bytes, b: bytes) -> None:
    assume(a != b)
    assert key_to_name(a) != key_to_name(b)


@given(
    long_prefix, st.text(alphabet=any_char, max_size=10), st.text(alphabet=any_char, max_size=10)
)
def test_short_names_differ_when_only_the_tail_differs(head: str, x: str, y: str) -> None:
    a, b = (head + x).encode(), (head + y).encode()
    assume(a != b and len(a) <= KEY_MAX_BYTES and len(b) <= KEY_MAX_BYTES)
    name_a, name_b = key_to_name(a), key_to_name(b)
    assert is_shortened(name_a) and is_shortened(name_b)
    assert name_a != name_b


def test_examples() -> None:
    assert key_to_name(b"plain-key") == b"plain-key"
    assert key_to_name(b".") == b"%2E"
    assert key_to_name(b"..") == b"%2E."
    assert key_to_name(b"a.b") == b"a.b"
    assert key_to_name(b"a/b") == b"a%2Fb"
    assert key_to_name(b"100%") == b"100%25"
    assert key_to_name(b"tab\there") == b"tab%09here"
    assert key_to_name("café".encode()) == "café".encode()
    name = key_to_name(b"x" * 300)
    assert len(name) == NAME_MAX
    assert name.startswith(b"x" * 200) and LONG_MARK in name


def test_short_name_never_cuts_an_escape_or_a_character() -> None:
    for pad in range(4):
        for filler in (b"/" * 120, "é".encode() * 200, "🎉".encode() * 127):
            key = b"a" * pad + filler
            name = key_to_name(key)
            head = name[: name.index(LONG_MARK)]
            head.decode("utf-8")
            # The head is a prefix of the full escaped name that ends on a whole escape.
            assert escape_key(key).startswith(head)
            for i, byte in enumerate(head):
                if byte == ord("%"):
                    assert len(head[i + 1 : i + 3]) == 2, (pad, head[-4:])


@pytest.mark.parametrize(
    "name",
    [
        b"%61",  # 'a' must be written as itself
        b"%2f",  # lower-case hex
        b"a%2fb",
        b"%",  # bare percent
        b"abc%",
        b"%4",  # one hex digit
        b"%ZZ",
        b"%2",
        b"%00",  # NUL cannot be in a key
        b"%FF",  # not UTF-8
        b".hidden",  # a leading dot is always escaped
        b".",
        b"..",
        b"line\nbreak",  # control characters are always escaped
        b"%2E%2E",  # only the leading dot is escaped
        b"",
        b"abc%~0123456789abcdef",  # a shortened name does not name a key by itself
    ],
)
def test_non_canonical_names_are_refused(name: bytes) -> None:
    with pytest.raises(InvalidName):
        name_to_key(name)


def test_canonical_escapes_are_accepted() -> None:
    assert name_to_key(b"%2E") == b"."
    assert name_to_key(b"%2E.") == b".."
    assert name_to_key(b"a%2Fb") == b"a/b"
    assert name_to_key(b"100%25") == b"100%"
    assert name_to_key(b"%2E%25~") == b".%~"
