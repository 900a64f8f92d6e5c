from relay.delivery.dsn import build_dsn, status_code
from relay.model import Outcome, RecipientStatus
from relay.reputation.dsn import parse_dsn

ORIGINAL = b"From: a@example.com\r\nTo: x@y.org\r\nSubject: hi\r\n\r\nbody\r\n"


def test_our_dsn_is_a_standard_rfc3464_report() -> None:
    data = build_dsn(
        reporting_mta="relay.test",
        sender="a@example.com",
        original=ORIGINAL,
        failures=[
            ("x@y.org", Outcome(RecipientStatus.BOUNCED, "550 5.1.1 no such user", "mx.y.org")),
            ("z@y.org", Outcome(RecipientStatus.EXPIRED, "451 timeout (gave up, max_age)")),
        ],
        arrival=0.0,
        now=10.0,
    )
    assert b"Content-Type: multipart/report; report-type=delivery-status" in data
    assert b"Auto-Submitted: auto-replied" in data
    assert b"Subject: hi" in data  # the original headers travel back
    parsed = parse_dsn(data)
    assert parsed is not None
    got = {r.address: (r.action, r.status) for r in parsed.recipients}
    assert got == {"x@y.org": ("failed", "5.1.1"), "z@y.org": ("failed", "4.4.7")}


def test_status_code_comes_from_the_reply_when_present() -> None:
    assert status_code(Outcome(RecipientStatus.BOUNCED, "554 5.7.1 blocked")) == "5.7.1"
    assert status_code(Outcome(RecipientStatus.BOUNCED, "550 go away")) == "5.0.0"
