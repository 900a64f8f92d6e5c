"""The RCPT stage's store-backed checks from one read (issue 9).

``Blocklisted``, ``Suppressed`` and ``PerRecipientHourly`` each read the store once per
RCPT: three trips to the database per recipient. ``RecipientChecks`` runs the same three
checks, in the same order and with the same verdicts, from one ``rcpt_lookup`` (the same
three statements in one trip). The same trip reads the account's daily usage and leaves it
in the transaction's notes for DailyQuota at DATA (one trip fewer per message).
``relay serve`` uses it (relay/policy/build.py); the three checks remain usable on their
own.
"""

from __future__ import annotations

from relay.model import Stage, Verdict
from relay.policy.checks import domain_of
from relay.policy.engine import Request
from relay.policy.limits import DAILY_USAGE_NOTE, Limits, PerRecipientHourly
from relay.policy.reputation_checks import Blocklisted, Suppressed
from relay.queue import reputation as q


class RecipientChecks:
    """Blocklisted, then Suppressed, then PerRecipientHourly: the first refusal wins."""

    name = "recipient"
    stages = frozenset({Stage.RCPT})

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.blocklisted = Blocklisted(limits.store)
        self.suppressed = Suppressed(limits.store)
        self.hourly = PerRecipientHourly(limits)

    async def __call__(self, request: Request) -> Verdict | None:
        account, rcpt = request.account, request.rcpt
        if account is None or rcpt is None:
            return None  # none of the three applies
        # Suppressed applies only with a sender, PerRecipientHourly only with an address.
        dom = domain_of(request.mail_from) if request.mail_from else None
        store = self.limits.store
        found = await q.rcpt_lookup(
            store,
            rcpt,
            dom,
            self.limits.rcpt_key(account.id, rcpt),
            self.limits.rcpt_since(store.clock()),
            # DailyQuota's read, in this trip instead of one more at DATA.
            also=self.limits.daily_read(account.id),
        )
        if found.also_windows is not None:
            request.notes[DAILY_USAGE_NOTE] = self.limits.daily_usage_of(found.also_windows)
        verdict = self.blocklisted.verdict(found.blocked)
        if verdict is None and dom is not None:
            verdict = self.suppressed.verdict(dom, found.suppressed)
        if verdict is not None or not rcpt:
            return verdict
        acct = await self.limits.for_account(account)
        return self.hourly.verdict(rcpt, acct, self.limits.rcpt_usage_of(found.windows))
