"""intake.parse reads From, Subject, Message-ID and Date without the email package, and
gets exactly what BytesHeaderParser(policy=compat32) + Message.get gave
(intake._parse_with_email, kept as the fallback, is the oracle)."""

from __future__ import annotations

import random
from email.header import Header

import pytest

from relay.intake import (
    _HEADER_PARSER,
    _NEEDED,
    _header_fields,
    _parse_with_email,
    _split,
    normalize_line_endings,
    parse,
)

# 8192 is the chunk Parser.parse feeds FeedParser: pad so a CRLF straddles it.
_PAD_TO_CHUNK = b"X-Pad: " + b"a" * (8191 - len(b"X-Pad: ")) + b"\r\n"

# (id, message): every odd shape of header block FeedParser has a rule for.
TRICKY: list[tuple[str, bytes]] = [
    ("plain", b"From: Alice <a@example.com>\r\nSubject: hi\r\nMessage-ID: <x@y>\r\n\r\nb\r\n"),
    ("with_date", b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nFrom: a@b.c\r\n\r\nb"),
    ("empty_message", b""),
    ("only_blank_line", b"\r\n"),
    ("body_only_after_leading_blank", b"\r\nSubject: not a header\r\n"),
    ("no_blank_line_no_final_crlf", b"From: a@b.c\r\nSubject: tail"),
    ("no_blank_line_final_crlf", b"From: a@b.c\r\nSubject: tail\r\n"),
    ("names_any_case", b"fROM: a@b.c\r\nSUBJECT: s\r\nmessage-id: <m@x>\r\nDATE: d\r\n\r\n"),
    (
        "first_occurrence_wins",
        b"Subject: one\r\nFrom: a@b.c\r\nsubject: two\r\nFROM: z@y.x\r\n\r\n",
    ),
    ("folded_subject", b"Subject: a long\r\n subject\r\n\tfolded\r\nFrom: a@b.c\r\n\r\n"),
    ("folded_from", b"From: Alice\r\n <a@example.com>\r\n\r\n"),
    ("value_starts_on_next_line", b"Subject:\r\n  next line\r\n\r\n"),
    ("value_only_spaces_then_fold", b"Subject: \t \r\n x\r\n\r\n"),
    ("empty_value", b"Subject:\r\nMessage-ID:\r\nDate:\r\nFrom:\r\n\r\n"),
    ("value_all_whitespace", b"Subject:   \t\r\n\r\n"),
    ("trailing_whitespace_kept", b"Subject: x  \t\r\nMessage-ID:  <m@x>  \r\n\r\n"),
    ("fold_line_only_whitespace", b"Subject: x\r\n \r\n\t\r\n\r\n"),
    ("no_space_after_colon", b"Subject:x\r\nFrom:<a@b.c>\r\n\r\n"),
    ("colon_in_value", b"Subject: re: re: x\r\n\r\n"),
    ("first_line_is_continuation", b" Subject: orphan\r\nSubject: real\r\n\r\n"),
    ("first_lines_are_continuations", b"\tx\r\n y\r\nFrom: a@b.c\r\n\r\n"),
    ("unix_from_first", b"From a@b.c Mon Jan  1 00:00:00 2024\r\nFrom: real@b.c\r\n\r\n"),
    ("unix_from_then_continuation", b"From a@b.c Mon\r\n Subject: no\r\nSubject: yes\r\n\r\n"),
    ("misplaced_from_line", b"Subject: s\r\nFrom x@y Mon\r\n folded\r\nFrom: a@b.c\r\n\r\n"),
    ("from_line_last", b"Subject: s\r\nFrom x@y Mon\r\n\r\n"),
    ("from_line_ends_field", b"Subject: s\r\nFrom x\r\n continues nothing\r\n\r\n"),
    ("from_colon_is_a_field", b"From:a@b.c\r\n\r\n"),
    ("from_without_space_starts_body", b"From: a@b.c\r\nFromage\r\nSubject: no\r\n\r\n"),
    ("lower_from_space_ends_headers", b"from a@b.c\r\nSubject: no\r\n\r\n"),
    ("line_without_colon_starts_body", b"From: a@b.c\r\nnot a header\r\nSubject: no\r\n\r\n"),
    ("space_before_colon_starts_body", b"Subject : no\r\nFrom: a@b.c\r\n\r\n"),
    ("tab_before_colon_starts_body", b"From: a@b.c\r\nSubject\t: no\r\n\r\n"),
    ("space_in_name_starts_body", b"From: a@b.c\r\nX Y: z\r\nSubject: no\r\n\r\n"),
    ("8bit_in_name_starts_body", b"From: a@b.c\r\nX-\xe9t\xe9: v\r\nSubject: no\r\n\r\n"),
    ("del_in_name_starts_body", b"From: a@b.c\r\nX-\x7f: v\r\nSubject: no\r\n\r\n"),
    ("empty_name_is_dropped", b":orphan\r\n folded\r\nSubject: s\r\n\r\n"),
    ("empty_name_ends_field", b"Subject: s\r\n: x\r\n fold\r\n\r\n"),
    ("name_of_symbols", b"!#$%&'*+-.^_`{|}~: v\r\nSubject: s\r\n\r\n"),
    ("subject_utf8", "Subject: caf\u00e9 \u2603\r\nFrom: a@b.c\r\n\r\n".encode()),
    ("subject_invalid_8bit", b"Subject: bad \xff\xfe\r\n\r\n"),
    ("subject_8bit_folded", b"Subject: \xc3\xa9\r\n \xff\r\n\r\n"),
    ("from_8bit", "From: J\u00fcrgen <j@example.com>\r\n\r\n".encode()),
    ("message_id_8bit", b"Message-ID: <\xe9@x>\r\n\r\n"),
    ("8bit_elsewhere_only", b"X-A: \xe9\r\nSubject: ascii\r\n\r\n"),
    ("encoded_word_subject", b"Subject: =?utf-8?b?w6ljaGVj?=\r\n\r\n"),
    ("encoded_word_folded", b"Subject: =?utf-8?q?a?=\r\n =?utf-8?q?b?=\r\n\r\n"),
    ("bad_encoded_word", b"Subject: =?x-nope?q?a?=\r\n\r\n"),
    ("bare_lf_normalised", b"From: a@b.c\nSubject: lf\n\nbody"),
    ("bare_cr_normalised", b"Subject: a\rb\r\n\r\n"),
    ("bare_cr_in_fold", b"Subject: a\r\r\n b\r\n\r\n"),
    ("control_chars", b"Subject: a\x00b\x0bc\x0cd\x1ce\x7f\r\n\r\n"),
    (
        "many_headers_early_exit",
        b"From: a@b.c\r\nSubject: s\r\nDate: d\r\nMessage-ID: <m>\r\n"
        b"Subject: late\r\nnocolon\r\n\r\n",
    ),
    ("crlf_straddles_8192", _PAD_TO_CHUNK + b"Subject: after pad\r\n x\r\n\r\n"),
    ("long_folded_over_8192", b"Subject: s\r\n" + b" " + b"w" * 9000 + b"\r\nFrom: a@b.c\r\n\r\n"),
    ("message_id_spaces", b"Message-ID:   <m@x>\r\n\r\n"),
]


def _email_fields(head: bytes) -> dict[str, str | Header]:
    """What Message.get returns for the needed names, from the email package."""
    msg = _HEADER_PARSER.parsebytes(head + b"\r\n")
    return {name: value for name in _NEEDED if (value := msg.get(name)) is not None}


def _comparable(fields: dict[str, str | Header] | None) -> object:
    """A Header equals only a str: compare its text and its encoded (8-bit kept) form."""
    if fields is None:
        return None
    return {
        name: value if isinstance(value, str) else (Header, str(value), value.encode())
        for name, value in fields.items()
    }


def _assert_same(message: bytes) -> None:
    head, _ = _split(normalize_line_endings(message))
    fields = _header_fields(head)
    # No fallback for anything parse passes on: equality below is our splitter's.
    assert fields is not None
    assert _comparable(fields) == _comparable(_email_fields(head))
    assert parse(message) == _parse_with_email(message)


@pytest.mark.parametrize("message", [m for _, m in TRICKY], ids=[i for i, _ in TRICKY])
def test_tricky_header_blocks_parse_exactly_as_the_email_package(message: bytes) -> None:
    _assert_same(message)


def test_first_occurrence_wins_and_names_are_case_insensitive() -> None:
    p = parse(b"subject: one\r\nFROM: a@b.c\r\nSubject: two\r\nFrom: z@y.x\r\n\r\n")
    assert (p.subject, p.header_from) == ("one", "a@b.c")


def test_folded_value_keeps_crlf_wsp_and_loses_leading_whitespace() -> None:
    fields = _header_fields(b"Subject: \t a\r\n  b\r\n\tc\r\n")
    assert fields == {"subject": "a\r\n  b\r\n\tc"}


def test_line_without_colon_or_with_space_before_colon_ends_the_headers() -> None:
    assert _header_fields(b"From: a@b.c\r\nno colon\r\nSubject: x\r\n") == {"from": "a@b.c"}
    assert _header_fields(b"Subject : x\r\nFrom: a@b.c\r\n") == {}


def test_from_space_lines_and_orphan_continuations_are_dropped() -> None:
    head = b" orphan\r\nFrom a@b Mon\r\n fold\r\nSubject: s\r\nFrom x\r\n fold\r\nDate: d\r\n"
    assert _header_fields(head) == {"subject": "s", "date": "d"}


def test_empty_name_line_is_dropped_with_its_continuations() -> None:
    assert _header_fields(b":x\r\n fold\r\nSubject: s\r\n") == {"subject": "s"}


def test_8bit_value_comes_back_as_unknown_8bit_header_like_compat32() -> None:
    fields = _header_fields(b"Subject: caf\xc3\xa9\r\nFrom: a@b.c\r\n")
    assert fields is not None
    assert isinstance(fields["subject"], Header) and fields["from"] == "a@b.c"
    assert not parse(b"Subject: bad \xff\r\n\r\n").subject_ok


def test_bare_cr_or_lf_in_head_falls_back_to_the_email_package() -> None:
    assert _header_fields(b"Subject: a\rb\r\n") is None
    assert _header_fields(b"Subject: a\nb\r\n") is None


# The needed names twice as likely as the others.
_NAMES = ["From", "Subject", "Message-ID", "Date"] * 2 + ["To", "Received", "X-Foo", "Re"]
_WORDS: list[bytes] = [
    b"hello",
    b"a@example.com",
    b"<a@example.com>",
    b"Alice <alice@example.org>",
    b'"Bob, Jr." <b@x.y>',
    b"<id.1@host>",
    b"Mon, 1 Jan 2024 00:00:00 +0000",
    b"=?utf-8?b?w6ljaGVj?=",
    b"=?iso-8859-1?q?caf=E9?=",
    b"=?utf-8?q?broken",
    b"re: x",
    b":",
    b"::",
    b"\xc3\xa9",
    b"\xff\xfe",
    b"\x80",
    b"\r",
    b"\n",
    b"\x00",
    b"\x0b\x0c",
    b"\x1c",
    b"\t",
    b"  ",
    b"(comment)",
    b"From ",
    b"",
]


def _random_case(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def _random_value(rng: random.Random) -> bytes:
    return b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 4)))


def _random_ws(rng: random.Random) -> bytes:
    return rng.choice([b"", b"", b"", b" ", b"\t", b"  ", b" \t "])


def _random_field(rng: random.Random) -> bytes:
    name = _random_case(rng, rng.choice(_NAMES)).encode()
    if rng.random() < 0.1:
        name = rng.choice([b"", b"X-\xe9", b"X Y", b"X-\x7f", b"!#$%", name + b" "])
    before_colon = _random_ws(rng) if rng.random() < 0.1 else b""
    return name + before_colon + b":" + _random_ws(rng) + _random_value(rng)


def _random_line(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.66:
        return _random_field(rng)
    if kind < 0.83:
        return rng.choice([b" ", b"\t", b"  ", b" \t"]) + _random_value(rng)
    if kind < 0.9:
        return b"From " + _random_value(rng)
    if kind < 0.96:
        prefix = rng.choice([b"no colon ", b"From", b"Fromx ", b"FROM ", b"from "])
        return prefix + _random_value(rng)
    return b""  # a blank line: the end of the headers


def _random_message(rng: random.Random) -> bytes:
    lines = [_random_line(rng) for _ in range(rng.randint(0, 12))]
    eols = [rng.choice([b"\r\n"] * 8 + [b"\n", b"\r"]) for _ in lines]
    head = b"".join(line + eol for line, eol in zip(lines, eols, strict=True))
    if rng.random() < 0.2 and head:
        head = head.rstrip(b"\r\n")  # no line end at all after the last field
    ending = rng.choice([b"\r\n", b"\r\nbody\r\n", b"\r\nSubject: in body\r\n", b""])
    leading_blank = b"\r\n" if rng.random() < 0.1 else b""
    return leading_blank + head + ending


def test_random_header_blocks_parse_exactly_as_the_email_package() -> None:
    rng = random.Random(5322)
    for n in range(4000):
        message = _random_message(rng)
        try:
            _assert_same(message)
        except AssertionError as exc:
            raise AssertionError(f"case {n}: {message!r}") from exc
