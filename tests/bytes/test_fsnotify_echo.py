"""EchoQueue: which echo each key gets, decided from its state when the echo runs."""

from __future__ import annotations

from dataclasses import dataclass

from kvpfs.fuse.echo_helper import EchoKind
from kvpfs.fuse.fsnotify_echo import EchoQueue

CREATE, MODIFY, DELETE = EchoKind.CREATE, EchoKind.MODIFY, EchoKind.DELETE


@dataclass(eq=False)
class Tomb:
    lookups: int = 0


def run(queue: EchoQueue, store: dict[tuple[int, bytes], bytes]) -> list[tuple[int, bytes]]:
    done = []
    while len(queue):
        for op in queue.next_ops(lambda p, k: (p, k) in store, lambda k: k):
            done.append((op.kind, op.key))
    return done


def test_new_changed_deleted_and_back():
    queue = EchoQueue({0: [b"old"]})
    store = {(0, b"old"): b"1", (0, b"new"): b"2"}
    assert queue.note(0, b"new", None) is True
    assert queue.note(0, b"new", None) is False  # merged
    assert queue.note(0, b"old", None) is True
    assert run(queue, store) == [(CREATE, b"new"), (MODIFY, b"old")]
    del store[(0, b"old")]
    queue.note(0, b"old", Tomb())
    store[(0, b"old")] = b"back"
    queue.note(0, b"old", None)
    assert run(queue, store) == [(DELETE, b"old"), (CREATE, b"old")]


def test_a_key_gone_before_its_echo_raises_nothing_unless_the_kernel_saw_it():
    queue = EchoQueue({0: []})
    queue.note(0, b"brief", None)
    queue.note(0, b"brief", Tomb(lookups=0))
    assert run(queue, {}) == []
    queue.note(0, b"looked", None)
    queue.note(0, b"looked", Tomb(lookups=1))  # someone looked it up: the kernel knows it
    assert run(queue, {}) == [(DELETE, b"looked")]


def test_changes_through_the_mount_make_a_due_echo_moot():
    queue = EchoQueue({1: [b"k"]})
    queue.note(1, b"k", Tomb(lookups=1))
    queue.seen_by_kernel(1, b"k", True)  # `echo x > guest/k` after the host's delete
    assert run(queue, {(1, b"k"): b"x"}) == []
    queue.note(1, b"k", None)
    assert run(queue, {(1, b"k"): b"y"}) == [(MODIFY, b"k")]
