"""RFC 8460 (SMTP TLS reporting), the parts that need no network: the TLSRPT record, the
tally of sessions, the JSON report and the report message."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import ssl

from relay.delivery.mtasts import (
    Mode,
    Policy,
    PolicyError,
    PolicyFetchError,
    Unfetched,
    unfetched,
)
from relay.delivery.tlsreports import (
    MadeReport,
    build_report,
    mailto_address,
    report_mail,
    rua_of,
)
from relay.delivery.tlsrpt import (
    NOT_IN_POLICY,
    ReportPolicy,
    Result,
    Tally,
    TlsAttempt,
    certificate_result,
)
from relay.queue.rollup import DAY

ENFORCE = Policy("id1", Mode.ENFORCE, ("*.mail.example.net",), 86400)
TESTING = Policy("id2", Mode.TESTING, ("mx1.example.net",), 604800)
NOW = 20_000 * DAY + 3600.0  # an hour into day 20,000


def test_the_record_gives_its_rua_uris_and_ignores_unknown_fields_and_spaces() -> None:
    record = "v=TLSRPTv1 ; rua=mailto:tls@example.net , https://r.example.net/v1 ;ext=1;"
    assert rua_of([record]) == ["mailto:tls@example.net", "https://r.example.net/v1"]
    assert rua_of(["v=TLSRPTv1;rua=mailto:a@example.net"]) == ["mailto:a@example.net"]


def test_records_not_of_this_version_are_dropped_and_two_of_it_are_as_none() -> None:
    # §3: records that do not begin with v=TLSRPTv1; are discarded; if not exactly one is
    # left, the domain does not do TLSRPT.
    assert rua_of(["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@example.net"]) == [
        "mailto:a@example.net"
    ]
    assert rua_of(["v=TLSRPTv1; rua=mailto:a@x.net", "v=TLSRPTv1; rua=mailto:b@x.net"]) == []
    assert rua_of(["v=TLSRPTv2; rua=mailto:a@x.net"]) == []
    assert rua_of(["rua=mailto:a@x.net; v=TLSRPTv1"]) == []
    assert rua_of(["v=TLSRPTv1; ext=1"]) == []


def test_a_mailto_uri_gives_its_decoded_address_without_its_headers() -> None:
    assert mailto_address("mailto:tls%2Breports@example.net?subject=x") == "tls+reports@example.net"
    assert mailto_address("MAILTO:a@example.net") == "a@example.net"
    assert mailto_address("https://example.net/") is None
    assert mailto_address("mailto:nobody") is None


def test_certificate_failures_are_named_as_the_rfc_names_them() -> None:
    def failure(code: int) -> ssl.SSLCertVerificationError:
        exc = ssl.SSLCertVerificationError("certificate verify failed")
        exc.verify_code = code
        exc.verify_message = "x"
        return exc

    assert certificate_result(failure(10)) is Result.CERTIFICATE_EXPIRED
    assert certificate_result(failure(62)) is Result.CERTIFICATE_HOST_MISMATCH
    assert certificate_result(failure(20)) is Result.CERTIFICATE_NOT_TRUSTED
    assert certificate_result(failure(18)) is Result.CERTIFICATE_NOT_TRUSTED


def test_the_tally_counts_successes_bare_and_failures_with_where_and_why() -> None:
    tally = Tally(clock=lambda: NOW)
    record = tally.recorder("example.net", ENFORCE)
    for _ in range(3):
        record(TlsAttempt(Result.SUCCESS, "mx1.mail.example.net", "192.0.2.1", "198.51.100.9"))
    expired = TlsAttempt(
        Result.CERTIFICATE_EXPIRED, "mx2.mail.example.net", "192.0.2.2", "198.51.100.9", "expired"
    )
    record(expired)
    record(expired)
    counts = {(c.result, c.mx, c.n) for c in tally.take()}
    assert counts == {("", "", 3), ("certificate-expired", "mx2.mail.example.net", 2)}
    assert tally.take() == []  # taken: the next flush starts from zero


def test_a_testing_policy_counts_a_host_it_does_not_list_as_a_validation_failure() -> None:
    tally = Tally(clock=lambda: NOW)
    record = tally.recorder("example.net", TESTING)
    record(TlsAttempt(Result.SUCCESS, "mx1.example.net", "192.0.2.1"))
    record(TlsAttempt(Result.SUCCESS, "rogue.example.org", "192.0.2.9"))
    by_result = {c.result: c for c in tally.take()}
    assert by_result[""].n == 1
    rogue = by_result["validation-failure"]
    assert (rogue.mx, rogue.receiving_ip, rogue.detail) == (
        "rogue.example.org",
        "192.0.2.9",
        NOT_IN_POLICY,
    )


def test_a_policy_that_could_not_be_had_is_named_by_why() -> None:
    # §4.3.2.2: fetch error, invalid policy, or a policy host without a valid certificate.
    assert unfetched(PolicyFetchError("answered HTTP 404")).kind == "sts-policy-fetch-error"
    assert unfetched(TimeoutError()).kind == "sts-policy-fetch-error"
    assert unfetched(PolicyError("no mx line")).kind == "sts-policy-invalid"
    assert unfetched(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x")).kind == ("sts-policy-invalid")
    cert = ssl.SSLCertVerificationError("certificate verify failed")
    assert unfetched(cert).kind == "sts-webpki-invalid"


def test_each_session_to_a_domain_whose_policy_could_not_be_had_is_that_failure() -> None:
    tally = Tally(clock=lambda: NOW)
    missing = Unfetched("sts-policy-fetch-error", "answered HTTP 404")
    tally.recorder("example.net", None, missing)(TlsAttempt(Result.SUCCESS, "mx1", "192.0.2.1"))
    (count,) = tally.take()
    assert (count.policy_type, count.result, count.mx, count.detail) == (
        "sts",
        "sts-policy-fetch-error",
        "mx1",
        "answered HTTP 404",
    )


def test_counts_whose_write_failed_are_put_back_for_the_next_flush() -> None:
    tally = Tally(clock=lambda: NOW)
    tally.recorder("example.net", None)(TlsAttempt(Result.SUCCESS, "mx"))
    taken = tally.take()
    for c in taken:
        tally.restore(c)
    tally.recorder("example.net", None)(TlsAttempt(Result.SUCCESS, "mx"))
    assert [c.n for c in tally.take()] == [2]


def test_the_report_has_the_rfc_shape_with_policy_summary_and_failure_details() -> None:
    tally = Tally(clock=lambda: NOW)
    sts = tally.recorder("example.net", TESTING)
    sts(TlsAttempt(Result.SUCCESS, "mx1.example.net", "192.0.2.1"))
    sts(TlsAttempt(Result.STARTTLS_NOT_SUPPORTED, "mx1.example.net", "192.0.2.1", "198.51.100.9"))
    tally.recorder("example.net", None)(TlsAttempt(Result.SUCCESS, "mx1.example.net"))
    report = build_report(
        20_000, "example.net", tally.take(), "relay at mta.example.com", "t@example.com", "id@x"
    )
    assert report == {
        "organization-name": "relay at mta.example.com",
        "date-range": {
            "start-datetime": "2024-10-04T00:00:00Z",
            "end-datetime": "2024-10-04T23:59:59Z",
        },
        "contact-info": "t@example.com",
        "report-id": "id@x",
        "policies": [
            {
                "policy": {"policy-type": "no-policy-found", "policy-domain": "example.net"},
                "summary": {
                    "total-successful-session-count": 1,
                    "total-failure-session-count": 0,
                },
            },
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-domain": "example.net",
                    "policy-string": [
                        "version: STSv1",
                        "mode: testing",
                        "mx: mx1.example.net",
                        "max_age: 604800",
                    ],
                    "mx-host": ["mx1.example.net"],
                },
                "summary": {
                    "total-successful-session-count": 1,
                    "total-failure-session-count": 1,
                },
                "failure-details": [
                    {
                        "result-type": "starttls-not-supported",
                        "sending-mta-ip": "198.51.100.9",
                        "receiving-mx-hostname": "mx1.example.net",
                        "receiving-ip": "192.0.2.1",
                        "failed-session-count": 1,
                    }
                ],
            },
        ],
    }


def test_the_policy_of_a_report_survives_its_trip_through_the_database() -> None:
    held_to = ReportPolicy.of(ENFORCE)
    assert ReportPolicy.from_json("sts", held_to.to_json()) == held_to
    assert ReportPolicy.of(None) == ReportPolicy("no-policy-found")


def test_the_report_message_is_a_tlsrpt_multipart_report_with_the_gzipped_json() -> None:
    body = json.dumps({"report-id": "r"}).encode()
    made = MadeReport(
        day=20_000,
        domain="example.net",
        submitter="example.com",
        report_id="2024-10-04.ab.example.net@example.com",
        filename="example.com!example.net!1728000000!1728086399!ab.json.gz",
        gz=gzip.compress(body),
    )
    raw = report_mail("tlsrpt@example.com", "tls@example.net", made, NOW)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "example.net"
    assert msg["TLS-Report-Submitter"] == "example.com"
    assert msg["Subject"] == (
        "Report Domain: example.net Submitter: example.com"
        " Report-ID: <2024-10-04.ab.example.net@example.com>"
    )
    text, report = list(msg.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert report.get_content_type() == "application/tlsrpt+gzip"
    assert report.get_filename() == "example.com!example.net!1728000000!1728086399!ab.json.gz"
    assert gzip.decompress(report.get_content()) == body
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # SMTP line ends
