import email.errors
import email.utils
import random
from email.header import decode_header, make_header

from relay.intake import (
    Intake,
    decode_subject,
    first_address,
    new_queue_id,
    normalize_line_endings,
    parse,
    rfc5322_date,
)


def test_every_bare_cr_or_lf_becomes_crlf() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd\n.\ne") == b"a\r\nb\r\nc\r\nd\r\n.\r\ne"


def test_parse_finds_from_subject_and_message_id() -> None:
    p = parse(b"From: Alice <a@example.com>\r\nSubject: hi\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n")
    assert p.from_address == "a@example.com"
    assert p.subject == "hi" and p.subject_ok
    assert p.message_id == "<x@y>"
    assert not p.has_date


def test_tls_required_no_in_the_header_waives_tls_and_nothing_else_does() -> None:
    # RFC 8689 §5.1: "TLS-Required:" [FWS] "No" (case-insensitive), in the header only.
    for head in (
        b"From: a@example.com\r\nTLS-Required: No\r\n",
        b"tls-required:no\r\nFrom: a@example.com\r\n",
        b"From: a@example.com\r\nTLS-Required:\r\n  NO\r\n",
    ):
        assert parse(head + b"\r\nbody\r\n").tls_optional, head
    for head in (
        b"From: a@example.com\r\n",
        b"From: a@example.com\r\nTLS-Required: Nope\r\n",
        b"From: a@example.com\r\nX-TLS-Required: No\r\n",
    ):
        assert not parse(head + b"\r\nbody\r\n").tls_optional, head
    assert not parse(b"From: a@example.com\r\n\r\nTLS-Required: No\r\n").tls_optional
    # The email package's path (a bare LF in the header) reads it the same way.
    assert parse(b"From: a@example.com\nTLS-Required: No\n\nbody\n").tls_optional


def test_rfc2047_subject_is_decoded() -> None:
    p = parse(b"From: a@example.com\r\nSubject: =?utf-8?b?w6ljaGVj?=\r\n\r\nx\r\n")
    assert p.subject == "échec" and p.subject_ok


def test_invalid_utf8_subject_is_flagged() -> None:
    p = parse(b"From: a@example.com\r\nSubject: bad \xff\xfe\r\n\r\nx\r\n")
    assert not p.subject_ok


def test_missing_message_id_and_date_are_added_with_the_queue_id() -> None:
    intake = Intake(store=None, hostname="relay.test", clock=lambda: 0.0)  # type: ignore[arg-type]
    parsed = parse(b"From: a@example.com\r\n\r\nbody\r\n")
    data, mid = intake.finalize(parsed, "QID1", "Received: from x")
    assert mid == "<QID1@relay.test>"
    head = data.split(b"\r\n\r\n")[0]
    assert head.startswith(b"Received: from x\r\n")
    assert b"Message-ID: <QID1@relay.test>" in head
    assert b"Date: Thu, 01 Jan 1970" in head


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    a, b = new_queue_id(1000.0), new_queue_id(2000.0)
    assert a < b and len(a) == len(b) == 21
    assert len({new_queue_id(5.0) for _ in range(1000)}) == 1000


def test_received_header_strips_hostile_helo() -> None:
    intake = Intake(store=None, hostname="relay.test", clock=lambda: 0.0)  # type: ignore[arg-type]
    line = intake.received_header(
        helo="evil\r\nBcc: x@y", client_ip="127.0.0.1", protocol="ESMTPSA", queue_id="Q", rcpt=None
    )
    assert "\r\nBcc" not in line and "from evilBcc:xy " in line


def test_has_line_over_agrees_with_measuring_every_line() -> None:
    import random

    from relay.intake import has_line_over, longest_line

    rng = random.Random(5322)
    for _ in range(2000):
        lines = [
            b"x" * rng.choice([0, 1, 5, 9, 10, 11, 19, 20, 21, 40])
            for _ in range(rng.randrange(0, 12))
        ]
        data = b"\r\n".join(lines) + rng.choice([b"", b"\r\n", b"\r", b"\n"])
        for limit in (1, 2, 9, 10, 11, 20):
            assert has_line_over(data, limit) == (longest_line(data) > limit), (data, limit)


def test_dates_are_rfc5322_utc_to_the_second_as_email_utils_writes_them() -> None:
    for t in (0.0, 1_795_000_000.0, 1_795_000_000.999, 1_795_000_001.0):
        assert rfc5322_date(t) == email.utils.formatdate(t, localtime=False)
    assert rfc5322_date(1_795_000_000.2) != rfc5322_date(1_795_000_001.2)


def _getaddresses_first(value: str) -> str:
    addrs = email.utils.getaddresses([value]) if value else []
    return addrs[0][1] if addrs and "@" in addrs[0][1] else ""


def test_first_address_reads_what_getaddresses_reads_for_simple_and_odd_from_values() -> None:
    rng = random.Random(7)

    def part(chars: str) -> str:
        return ".".join(
            "".join(rng.choice(chars) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        )

    values = [
        "Alice <a@example.com>",
        "  <a.b+tag@mail.example.com>  ",
        "a@example.com",
        "Alice<a@example.com>",
        '"Doe, Jane" <j@example.com>',
        "a@example.com (Alice)",
        "a@example.com, b@example.org",
        "Group: a@example.com;",
        "no address here",
        "a..b@example.com",
        "<a@-example-.com>",
        "Alice\r\n <a@example.com>",
        "",
    ]
    for _ in range(3000):
        local, domain = part("ab9_+-"), part("ab9-")
        name = " ".join(part("Ab9_-") for _ in range(rng.randint(0, 3)))
        forms = [f"{name} <{local}@{domain}>", f"{local}@{domain}", f"\t<{local}@{domain}> "]
        values.append(rng.choice(forms))
        # and values built from the characters where the two readings could part ways
        pieces = ["a", "9", "_", "-", "+", ".", "@", " ", "<", ">", '"', ",", "(", ")", ":"]
        values.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    for value in values:
        assert first_address(value) == _getaddresses_first(value), value


def test_a_plain_subject_takes_the_fast_path_and_reads_as_decode_header_reads_it() -> None:
    rng = random.Random(3)
    ascii_chars = [chr(c) for c in range(1, 128)] + ["=?", "?=", "\r\n "]
    for _ in range(2000):
        raw = "".join(rng.choice(ascii_chars) for _ in range(rng.randint(0, 30)))
        try:
            text = str(make_header(decode_header(raw)))
            expected = (text.replace("\r\n", "").replace("\n", ""), True)
        except (ValueError, LookupError, email.errors.HeaderParseError):
            expected = (raw, False)
        if "\ufffd" in expected[0]:
            expected = (expected[0], False)
        assert decode_subject(raw) == expected, raw
