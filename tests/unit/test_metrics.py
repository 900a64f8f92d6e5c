"""Pure parts of relay.metrics: bounded labels and the queue collector."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.metrics import PROVIDERS, QueueCollector, provider_of, status_class
from relay.model import Outcome, RecipientStatus


def test_provider_of_maps_big_providers_and_everything_else_to_other() -> None:
    assert provider_of("gmail.com") == "gmail.com"
    assert provider_of("GoogleMail.com.") == "gmail.com"
    assert provider_of("hotmail.co.uk") == "outlook.com"
    assert provider_of("ymail.com") == "yahoo.com"
    assert provider_of("me.com") == "icloud.com"
    assert provider_of("example.org") == "other"
    assert provider_of("mail.gmail.com.evil.example") == "other"


def test_provider_label_set_is_bounded() -> None:
    seen = {provider_of(f"host{i}.example{i % 7}.com") for i in range(1000)}
    assert seen == {"other"}
    assert len(PROVIDERS) <= 20


def test_status_class_reads_the_enhanced_code_class_and_subject() -> None:
    def o(status: RecipientStatus, reply: str, code: int | None = None) -> Outcome:
        return Outcome(status, reply, code=code)

    assert status_class(o(RecipientStatus.BOUNCED, "550 5.1.1 user unknown", 550)) == "5.1"
    assert status_class(o(RecipientStatus.DEFERRED, "4.4.1 Connection failed")) == "4.4"
    assert status_class(o(RecipientStatus.DELIVERED, "250 OK queued", 250)) == "2.0"
    assert status_class(o(RecipientStatus.DEFERRED, "421 try later", 421)) == "4.0"
    assert status_class(o(RecipientStatus.BOUNCED, "no code at all")) == "5.0"
    assert status_class(o(RecipientStatus.DEFERRED, "451 4.99.1 odd", 451)) == "4.0"


def test_auth_outcome_comes_from_the_reply_class() -> None:
    before = {
        k: metrics.SMTP_AUTH.labels("unit", k)._value.get()
        for k in ("success", "failure", "throttled")
    }
    metrics.smtp_auth("unit", "235 2.7.0 Authentication successful")
    metrics.smtp_auth("unit", "535 5.7.8 Authentication credentials invalid")
    metrics.smtp_auth("unit", "454 4.7.0 Too many failed authentications")
    for k in ("success", "failure", "throttled"):
        assert metrics.SMTP_AUTH.labels("unit", k)._value.get() == before[k] + 1


def _samples(collector: QueueCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_queue_collector_reports_every_waiting_status_and_the_oldest_age() -> None:
    c = QueueCollector()
    c.refresh({"queued": 3, "deferred": 2, "delivered": 99}, oldest=1000.0, now=1060.0)
    s = _samples(c)
    assert s[("relay_queue_recipients", (("status", "queued"),))] == 3
    assert s[("relay_queue_recipients", (("status", "deferred"),))] == 2
    assert s[("relay_queue_recipients", (("status", "held"),))] == 0
    assert ("relay_queue_recipients", (("status", "delivered"),)) not in s
    assert s[("relay_queue_oldest_age_seconds", ())] == 60
    assert s[("relay_queue_scrape_ok", ())] == 1


def test_queue_collector_emits_no_stale_numbers_when_the_database_is_down() -> None:
    c = QueueCollector()
    c.refresh({"queued": 3}, oldest=None, now=5.0)
    c.refresh(None, None, 6.0)
    s = _samples(c)
    assert s == {("relay_queue_scrape_ok", ()): 0}


def test_render_exposes_relay_counters_with_total_suffix() -> None:
    metrics.smtp_transaction("unit", "queued", started=0.0, recipients=2)
    text = metrics.render().decode()
    assert 'relay_messages_accepted_total{listener="unit"}' in text
    assert 'relay_recipients_accepted_total{listener="unit"}' in text
    assert "relay_smtp_transaction_duration_seconds_bucket" in text


def test_every_metric_the_grafana_dashboard_queries_is_exported() -> None:
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).resolve().parents[2] / "contrib" / "grafana-dashboard.json"
    exprs = [
        t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])
    ]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"relay_\w+", e)
    }
    metrics.QUEUE.refresh({}, None, 0.0)  # queue gauges appear once read from a store
    text = metrics.render().decode()
    exported = {f.name for f in text_string_to_metric_families(text)}
    exported |= {name + "_total" for name in exported}
    assert used <= exported, used - exported
