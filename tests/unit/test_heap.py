"""Freezing the start-up heap: garbage goes first, survivors leave the collector's walk."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from relay import heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector can free it


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test run collects as usual


def test_settle_collects_garbage_cycles_before_it_freezes() -> None:
    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    heap.settle()
    assert gone() is None


def test_settled_objects_are_left_out_of_every_collection_until_the_next_settle() -> None:
    kept = _Node()
    frozen = heap.settle()
    # Frozen objects can still die by reference count (the count then drops), never by
    # the collector's walk; nothing joins the permanent generation until the next settle.
    assert 0 < gc.get_freeze_count() <= frozen
    assert not any(o is kept for o in gc.get_objects())
    # A reload settles again: what was frozen is walked (and may be freed) once more.
    dropped = weakref.ref(kept)
    del kept
    heap.settle()
    assert dropped() is None
