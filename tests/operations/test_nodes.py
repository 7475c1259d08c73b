"""`NodeTable` (kvpfs/fuse/nodes.py): inode numbers, names, and when a node may go.

On a real Store with real pool files; no mount.
"""

from __future__ import annotations

import errno
import time

import pyfuse3
import pytest

from kvpfs.fuse.nodes import (
    DIR_INODES,
    EVENTS_INODE,
    FIRST_KEY_INODE,
    FIXED_INODES,
    LINK_INODES,
    ROOT_INODE,
    NodeTable,
)
from kvpfs.fuse.unpublished import Unpublished
from kvpfs.host.intrinsic import KEYS as INTRINSIC_KEYS
from kvpfs.storage.store import Origin, Store
from kvpfs.wire import names
from kvpfs.wire.protocol import Pool


@pytest.fixture
async def store(tmp_path):
    store = Store(tmp_path / "pools", lock_timeout=0.5)
    await store.open()
    yield store
    store.close()


@pytest.fixture
def table(store):
    return NodeTable(store, Unpublished(), time.time_ns())


def test_fixed_inodes_are_distinct_and_below_the_first_key():
    assert len(set(FIXED_INODES)) == len(FIXED_INODES) == 1 + 2 * len(Pool) + 1
    assert max(FIXED_INODES) < FIRST_KEY_INODE
    assert FIXED_INODES[0] == ROOT_INODE and EVENTS_INODE in FIXED_INODES
    assert [DIR_INODES[p] for p in Pool] != [LINK_INODES[p] for p in Pool]


async def test_a_key_has_one_node_until_it_goes_then_a_new_number(store, table):
    await store.set(Pool.EXTERNAL, b"Config", b"v", Origin.HOST)
    node = table.find(Pool.EXTERNAL, b"Config")
    assert node is not None and node.ino >= FIRST_KEY_INODE
    assert table.find(Pool.EXTERNAL, b"Config") is node
    assert table.get(node.ino) is node
    node.lookups = 1  # the kernel holds it
    table.unlink(node)
    assert table.get(node.ino) is node  # the kernel may still use the number
    table.forget(node.ino, 1)
    assert table.get(node.ino) is None
    again = table.key_node(Pool.EXTERNAL, b"Config")
    assert again.ino > node.ino  # never reused


async def test_find_answers_only_stored_keys_and_valid_names(store, table):
    await store.set(Pool.GUEST, b"a/b", b"v", Origin.HOST)
    assert table.find(Pool.GUEST, names.key_to_name(b"a/b")).key == b"a/b"
    assert table.find(Pool.GUEST, b"missing") is None
    assert table.find(Pool.GUEST, b".scratch") is None  # dot names live in memory only
    assert table.find(Pool.EXTERNAL, b"a%2Fb") is None  # another pool


async def test_a_long_key_is_found_by_its_shortened_name(store, table):
    key = b"k" * 300  # longer than NAME_MAX
    await store.set(Pool.EXTERNAL, key, b"v", Origin.HOST)
    name = names.key_to_name(key)
    assert names.is_shortened(name) and len(name) <= names.NAME_MAX
    assert table.find(Pool.EXTERNAL, name).key == key


async def test_pool_2_lists_the_intrinsic_keys_only(table):
    listed = {node.key.decode() for node in table.listing(Pool.AUTO)}
    assert listed == set(INTRINSIC_KEYS)
    assert table.find(Pool.AUTO, b"NotIntrinsic") is None
    assert table.find(Pool.AUTO, INTRINSIC_KEYS[0].encode()) is not None


async def test_guest_files_not_in_the_pool_are_listed_and_counted(store, table):
    await store.set(Pool.GUEST, b"stored", b"v", Origin.HOST)
    scratch = table.add_guest(b".tmp123", None)
    pending = table.add_guest(b"new", b"new")
    assert pending.pending and not scratch.pending
    assert table.pending_count() == 1
    assert {n.name for n in table.listing(Pool.GUEST)} == {b"stored", b".tmp123", b"new"}
    assert table.find(Pool.GUEST, b".tmp123") is scratch
    assert table.find(Pool.GUEST, b"new") is pending
    table.stored(pending)  # its value reached the pool: listed from there
    assert not pending.pending and table.pending_count() == 0


async def test_a_scratch_file_renamed_to_a_key_is_the_same_inode(table):
    scratch = table.add_guest(b".edit", None)
    table.rename(scratch, b"Status", b"Status")
    assert scratch.key == b"Status" and scratch.name == b"Status"
    assert table.by_key[(Pool.GUEST, b"Status")] is scratch
    assert b".edit" not in table.guest_extra
    table.rename(scratch, b".back", None)
    assert scratch.key is None and table.guest_extra[b".back"] is scratch
    assert (Pool.GUEST, b"Status") not in table.by_key


async def test_unlinking_a_scratch_file_returns_its_bytes_to_the_bound(table):
    scratch = table.add_guest(b".big", None)
    scratch.held.content = b"x" * 1000
    scratch.held.charged = table.unpublished.account(Pool.GUEST, b".big", 0, 1000)
    assert table.unpublished.total == 1000
    table.unlink(scratch)
    assert table.unpublished.total == 0 and scratch.held.content == b""
    assert table.get(scratch.ino) is None  # no lookups, no open files: gone


async def test_an_open_file_keeps_its_node(table):
    node = table.add_guest(b".open", None)
    node.handles = 1
    table.unlink(node)
    assert table.get(node.ino) is node
    node.handles = 0
    table.maybe_drop(node)
    assert table.get(node.ino) is None


@pytest.mark.parametrize(("inode", "error"), [(ROOT_INODE, errno.ENOENT), (99_999, errno.ENOENT)])
async def test_a_directory_inode_that_is_not_a_pool_is_refused(table, inode, error):
    with pytest.raises(pyfuse3.FUSEError) as info:
        table.pool_of_dir(inode)
    assert info.value.errno == error


async def test_a_file_inode_used_as_a_directory_is_enotdir(table):
    node = table.add_guest(b".f", None)
    with pytest.raises(pyfuse3.FUSEError) as info:
        table.pool_of_dir(node.ino)
    assert info.value.errno == errno.ENOTDIR
    assert table.pool_of_dir(DIR_INODES[Pool.GUEST]) is Pool.GUEST
