"""How a retention sweep splits its work into writes (relay/queue/retention.py)."""

from __future__ import annotations

from types import SimpleNamespace

from relay.queue.retention import WRITE_BYTES, _by_bytes


def _rows(*sizes: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"m{i}", size=s) for i, s in enumerate(sizes)]


def test_writes_hold_about_the_byte_budget_in_order_and_at_least_one_message() -> None:
    kb = 1024
    writes = _by_bytes(_rows(200 * kb, 200 * kb, 200 * kb, 2 * WRITE_BYTES, 1 * kb))
    assert [[d["mid"] for d in w] for w in writes] == [["m0", "m1"], ["m2"], ["m3"], ["m4"]]
    assert _by_bytes([]) == []
    small = _by_bytes(_rows(*([2 * kb] * 600)))
    assert [len(w) for w in small] == [256, 256, 88]
