"""RFC 8689 "TLS-Required: No" reaches delivery: the message's flag is stored with it and
comes back with each claim of its recipients, on both dialects."""

from __future__ import annotations

from relay.queue.store import NewMessage, NewRecipient, Store


async def test_a_claim_says_whether_its_message_waived_tls(dialect_store: Store) -> None:
    store = dialect_store
    acct = await store.add_account("alice", "x")
    body = b"Subject: s\r\n\r\nx\r\n"
    for mid, optional in (("m-strict", False), ("m-optional", True)):
        await store.accept(
            NewMessage(
                mid,
                acct.id,
                "a@example.com",
                body,
                (NewRecipient(f"{mid}@example.org"),),
                tls_optional=optional,
            )
        )
    claims = {c.message_id: c.tls_optional for c in await store.claim_due("w", 60, 10)}
    assert claims == {"m-strict": False, "m-optional": True}
