"""Helpers shared by the safety tests (crash, sharing, fuzz, security).

* `record_figures` prints a test's figures and appends them as one JSON line to the file named
  by $KVPFS_FIGURES (bench/safety_figures.py collects them into a table).
* `seeded_random` gives each randomised test its own seeded generator; the seed is printed
  and $KVPFS_SEED overrides it, so a failure reproduces.
* Self-checking values (`checked_value`/`value_is_checked`): a value names its key, a sequence
  number and a hash of both, so a reader can tell a torn or misplaced value from a real one.
* An independent pool file parser (`split_slots`, `slot_pairs`): the tests check kvpfs's files
  with their own reading of the format, not with kvpfs.storage.poolfile.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

RECORD = 2560
KEY_FIELD = 512
VALUE_FIELD = 2048

FIGURES_ENV = "KVPFS_FIGURES"
SEED_ENV = "KVPFS_SEED"


def record_figures(test: str, **figures: object) -> dict[str, object]:
    """Print `figures` and append them to $KVPFS_FIGURES (one JSON object per line)."""
    line: dict[str, object] = {"test": test, **figures}
    text = json.dumps(line, sort_keys=False)
    print(f"figures: {text}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return line


def seeded_random(name: str) -> tuple[random.Random, int]:
    """A generator seeded from $KVPFS_SEED, or from the clock (printed either way)."""
    text = os.environ.get(SEED_ENV)
    seed = int(text, 0) if text else int.from_bytes(os.urandom(4), "little")
    print(f"{name}: random seed {seed} (reproduce with {SEED_ENV}={seed})")
    return random.Random(seed), seed


def checked_value(key: str, seq: int) -> str:
    """`key:seq:hash16`; `value_is_checked` recognises exactly these for `key`."""
    digest = hashlib.sha256(f"{key}\0{seq}".encode()).hexdigest()[:16]
    return f"{key}:{seq}:{digest}"


def value_is_checked(key: bytes, value: bytes) -> bool:
    try:
        text = value.decode("utf-8")
        name, seq, digest = text.rsplit(":", 2)
    except (UnicodeDecodeError, ValueError):
        return False
    return (
        name == key.decode("utf-8", "replace")
        and seq.isdigit()
        and checked_value(name, int(seq)).endswith(":" + digest)
    )


def slot(key: bytes, value: bytes) -> bytes:
    """One zero-padded 2560-byte record (what kvpfs writes), built independently."""
    assert len(key) < KEY_FIELD and len(value) < VALUE_FIELD
    return key.ljust(KEY_FIELD, b"\0") + value.ljust(VALUE_FIELD, b"\0")


def split_slots(data: bytes, what: object = "pool file") -> list[bytes]:
    """The 2560-byte records of a pool file; AssertionError unless whole records."""
    assert len(data) % RECORD == 0, (
        f"{what} is {len(data)} bytes: not a whole number of {RECORD}-byte records "
        f"({len(data) % RECORD} bytes left over)"
    )
    return [data[i : i + RECORD] for i in range(0, len(data), RECORD)]


def slot_pair(raw: bytes) -> tuple[bytes, bytes]:
    """(key, value) of one record, each cut at its first NUL."""
    return raw[:KEY_FIELD].split(b"\0", 1)[0], raw[KEY_FIELD:].split(b"\0", 1)[0]


def slot_pairs(data: bytes, what: object = "pool file") -> list[tuple[bytes, bytes]]:
    return [slot_pair(raw) for raw in split_slots(data, what)]


def pool_file(pool_dir: Path, pool: int) -> Path:
    return Path(pool_dir) / f".kvp_pool_{pool}"


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
