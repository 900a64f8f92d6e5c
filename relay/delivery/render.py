"""Per-recipient rendering at delivery time, before DKIM signing.

- RFC 2369 ``List-Unsubscribe`` (an HTTPS link and a mailto, both carrying a signed
  per-recipient token) and RFC 8058 ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``,
  unless the message carries its own List-Unsubscribe or the account turned them off
  (account setting ``list_unsubscribe: false``). They are added before signing and
  dkim.SIGNED_HEADERS lists both, as RFC 8058 §4 requires.
- VERP (``bounce+TOKEN@<bounce domain>``) as the envelope sender, so a late bounce names
  its message and recipient.

Per-recipient content means one envelope per recipient; when nothing differs (both off)
the recipients of a message stay in one envelope.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relay.config import Config
from relay.model import Claim
from relay.queue.store import Store
from relay.reputation.tokens import TokenKind, make_token

SecretSource = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Rendered:
    claims: tuple[Claim, ...]
    data: bytes
    mail_from: str


def header_names(message: bytes) -> set[bytes]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    names = set()
    for line in head.split(b"\r\n"):
        if line and line[:1] not in (b" ", b"\t") and b":" in line:
            names.add(line.split(b":", 1)[0].strip().lower())
    return names


def add_headers(message: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """Prepend header fields (ASCII values; they are ours, never user input)."""
    block = b"".join(f"{name}: {value}\r\n".encode("ascii") for name, value in headers)
    return block + message


def unsubscribe_headers(url: str, mailto: str) -> list[tuple[str, str]]:
    return [
        ("List-Unsubscribe", f"<{url}>, <mailto:{mailto}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


def verp_address(secret: bytes, recipient_id: int, bounce_domain: str) -> str:
    return f"bounce+{make_token(secret, TokenKind.BOUNCE, recipient_id)}@{bounce_domain}"


class Renderer:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        secret: SecretSource,
        bounce_domain: str,
        public_url: str,
    ) -> None:
        self.rcfg = cfg.reputation
        self.store = store
        self.secret = secret
        self.bounce_domain = bounce_domain
        self.public_url = public_url.rstrip("/")
        self._accounts: dict[int, tuple[float, bool]] = {}

    async def _account_wants_header(self, account_id: int) -> bool:
        now = time.monotonic()
        hit = self._accounts.get(account_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        acct = await self.store.get_account_by_id(account_id)
        wants = acct.settings.get("list_unsubscribe", True) is not False
        self._accounts[account_id] = (now + 30.0, wants)
        return wants

    async def render(
        self, body: bytes, mail_from: str, account_id: int, claims: Sequence[Claim]
    ) -> list[Rendered]:
        add_header = (
            self.rcfg.list_unsubscribe
            and b"list-unsubscribe" not in header_names(body)
            and await self._account_wants_header(account_id)
        )
        verp = self.rcfg.verp and bool(mail_from)
        if not add_header and not verp:
            return [Rendered(tuple(claims), body, mail_from)]
        secret = await self.secret()
        out = []
        for c in claims:
            data = body
            if add_header:
                token = make_token(secret, TokenKind.UNSUBSCRIBE, c.recipient_id)
                data = add_headers(
                    body,
                    unsubscribe_headers(
                        f"{self.public_url}/u/{token}",
                        f"unsubscribe+{token}@{self.bounce_domain}",
                    ),
                )
            env_from = (
                verp_address(secret, c.recipient_id, self.bounce_domain) if verp else mail_from
            )
            out.append(Rendered((c,), data, env_from))
        return out
