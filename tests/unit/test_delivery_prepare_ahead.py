"""delivery/worker.py prepares a session's messages a bounded number of bytes ahead of
what the session sends (PREPARE_AHEAD_BYTES), not all at once: peak memory with large
messages follows the sessions' chunks, not the claim batch (issue 9)."""

from __future__ import annotations

import asyncio

from relay.delivery.client import Envelope
from relay.delivery.worker import PREPARE_AHEAD_BYTES, _Ahead, _chunks
from relay.model import Claim

KB = 1024


def claims(sizes: list[int], rcpts: int = 1) -> dict[str, list[Claim]]:
    out: dict[str, list[Claim]] = {}
    for n, size in enumerate(sizes):
        out[f"m{n}"] = [
            Claim(n * 10 + r, f"m{n}", 1, "a@example.com", f"r{r}@x.org", "x.org", 0, 0.0, size)
            for r in range(rcpts)
        ]
    return out


def shape(chunks: list[list[tuple[str, list[Claim]]]]) -> list[list[str]]:
    return [[message_id for message_id, _ in chunk] for chunk in chunks]


def test_a_session_of_small_messages_is_one_chunk() -> None:
    assert shape(_chunks(claims([2 * KB] * 20), PREPARE_AHEAD_BYTES)) == [
        [f"m{n}" for n in range(20)]
    ]


def test_large_messages_are_chunked_by_the_byte_budget_in_order() -> None:
    got = shape(_chunks(claims([100 * KB] * 12), 512 * KB))
    assert got == [[f"m{n}" for n in range(k, min(k + 5, 12))] for k in range(0, 12, 5)]


def test_a_message_over_the_budget_is_a_chunk_of_its_own_with_all_its_recipients() -> None:
    chunks = _chunks(claims([10 * KB, 900 * KB, 10 * KB], rcpts=3), 512 * KB)
    assert shape(chunks) == [["m0"], ["m1"], ["m2"]]
    assert [len(group) for chunk in chunks for _, group in chunk] == [3, 3, 3]


async def test_the_next_chunk_is_prepared_while_this_one_is_sent_and_no_further() -> None:
    chunks = _chunks(claims([100 * KB] * 20), 256 * KB)  # ten chunks of two
    started: list[int] = []

    async def prepare(chunk: list[tuple[str, list[Claim]]]) -> list[Envelope]:
        started.append(int(chunk[0][0][1:]) // 2)
        await asyncio.sleep(0)
        return [
            Envelope(mid, "a@example.com", [(g[0].recipient_id, "r@x.org")], b"x")
            for mid, g in chunk
        ]

    ahead = _Ahead(prepare, chunks)
    taken: list[str] = []
    async for env in ahead:
        taken.append(env.message_id)
        current = int(env.message_id[1:]) // 2
        await asyncio.sleep(0.001)  # the send: the chunk after this one gets ready meanwhile
        # Prepared so far: this chunk and at most the one after it.
        assert started[-1] <= current + 1, (env.message_id, started)
        if current + 1 < len(chunks):
            assert started[-1] == current + 1, (env.message_id, started)
    assert taken == [f"m{n}" for n in range(20)]
    assert started == list(range(10))
    assert [e.message_id for e in ahead.produced] == taken


async def test_closing_early_cancels_the_chunk_being_prepared_ahead() -> None:
    gate = asyncio.Event()
    finished: list[str] = []

    async def prepare(chunk: list[tuple[str, list[Claim]]]) -> list[Envelope]:
        if chunk[0][0] != "m0":
            await gate.wait()
        finished.append(chunk[0][0])
        return [Envelope(mid, "a@example.com", [(1, "r@x.org")], b"x") for mid, _ in chunk]

    ahead = _Ahead(prepare, _chunks(claims([600 * KB] * 3), 512 * KB))
    first = await anext(ahead)
    assert first.message_id == "m0"
    ahead.close()
    gate.set()
    await asyncio.sleep(0.01)
    assert finished == ["m0"]
