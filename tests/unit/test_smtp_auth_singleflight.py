"""smtp/auth.py: sessions presenting the same credentials at once share one scrypt run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.config import SMTPConfig
from relay.passwords import hash_password
from relay.smtp import auth


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every real scrypt verification, counted."""
    seen: list[str] = []
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        seen.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    return seen


async def test_twenty_sessions_with_one_password_cost_one_scrypt(runs: list[str]) -> None:
    stored = hash_password("right-password")
    authenticator = auth.Authenticator(store=Any, cfg=SMTPConfig())  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(authenticator._check("alice", "right-password", stored) for _ in range(20))
    )
    assert results == [True] * 20
    assert runs == ["right-password"]


async def test_a_wrong_password_is_shared_while_running_but_never_remembered(
    runs: list[str],
) -> None:
    stored = hash_password("right-password")
    authenticator = auth.Authenticator(store=Any, cfg=SMTPConfig())  # type: ignore[arg-type]
    first = await asyncio.gather(*(authenticator._check("a", "wrong", stored) for _ in range(5)))
    assert first == [False] * 5
    assert await authenticator._check("a", "wrong", stored) is False
    assert runs == ["wrong", "wrong"]


async def test_a_cancelled_session_does_not_fail_the_others(runs: list[str]) -> None:
    stored = hash_password("right-password")
    authenticator = auth.Authenticator(store=Any, cfg=SMTPConfig())  # type: ignore[arg-type]
    leader = asyncio.create_task(authenticator._check("alice", "right-password", stored))
    await asyncio.sleep(0)  # the leader is now running scrypt
    follower = asyncio.create_task(authenticator._check("alice", "right-password", stored))
    await asyncio.sleep(0)
    leader.cancel()
    assert await follower is True
    with pytest.raises(asyncio.CancelledError):
        await leader
