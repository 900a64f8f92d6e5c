"""The ordered policy checks ``relay serve`` runs (and rebuilds on a config reload)."""

from __future__ import annotations

from relay.config import Config
from relay.policy.checks import MaxRecipients, QueueSpace, SenderDomain
from relay.policy.engine import Check
from relay.policy.limits import DailyQuota, Limits, LineLength, RateLimit, SubjectLimit
from relay.policy.recipient import RecipientChecks
from relay.policy.reputation_checks import AccountSuspended, RequireAuthOrInbound
from relay.queue.store import Store
from relay.reputation.service import Reputation


def build_checks(cfg: Config, store: Store) -> list[Check]:
    """The ordered policy checks; the first refusal wins.

    Per stage: MAIL: account suspended, free space for the queue, sender domain. RCPT:
    relay access, recipients per message, then blocklist, suppression and per-recipient
    hourly count (one read, relay/policy/recipient.py). DATA: From: domain, subject,
    line length, daily quota, rate.
    """
    limits = Limits(cfg.limits, store)
    return [
        RequireAuthOrInbound(Reputation(cfg, store)),
        AccountSuspended(store),
        QueueSpace(cfg.database, cfg.smtp.min_free_space),
        MaxRecipients(cfg.smtp.max_recipients),
        RecipientChecks(limits),
        SenderDomain(store),
        SubjectLimit(limits),
        LineLength(),
        DailyQuota(limits),
        # RateLimit takes tokens: keep it the last DATA check, after every refusal. It
        # takes them inside the accept transaction (RelayApp._rate_take, issue 9).
        RateLimit(limits, in_accept=True),
    ]
