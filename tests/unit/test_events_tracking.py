"""Open pixel: tokens, and insertion into HTML parts whatever their transfer encoding."""

from __future__ import annotations

import email
from email.message import EmailMessage
from email.policy import SMTP

from relay.events.tracking import has_html, insert_pixel, make_token, read_token

URL = "http://relay.test/t/o/TOKEN.gif"


def test_token_round_trips_and_refuses_edits() -> None:
    tok = make_token(b"k" * 32, 42, "ABC123")
    assert read_token(b"k" * 32, tok) == (42, "ABC123")
    assert read_token(b"x" * 32, tok) is None
    _payload, tag = tok.split(".")
    other = make_token(b"k" * 32, 43, "ABC123").split(".")[0]
    assert read_token(b"k" * 32, f"{other}.{tag}") is None
    assert read_token(b"k" * 32, "not-a-token") is None


def _message(html: str | None, cte: str | None = None) -> bytes:
    m = EmailMessage(policy=SMTP)
    m["From"] = "a@example.com"
    m["To"] = "b@example.org"
    m["Subject"] = "hi"
    m.set_content("plain text part\n")
    if html is not None:
        m.add_alternative(html, subtype="html", cte=cte)
    return m.as_bytes()


def _html_of(raw: bytes) -> str:
    msg = email.message_from_bytes(raw)
    for part in msg.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError("no html part")


def test_plain_text_mail_gets_no_pixel() -> None:
    raw = _message(None)
    assert not has_html(raw)
    assert insert_pixel(raw, URL) == raw


def test_pixel_goes_before_body_end_in_quoted_printable_html() -> None:
    html = "<html><body><p>" + "héllo " * 30 + "</p></body></html>\n"
    raw = _message(html, "quoted-printable")
    out = insert_pixel(raw, URL)
    text = _html_of(out)
    assert f'<img src="{URL}"' in text
    assert text.index(URL) < text.lower().index("</body>")
    assert "héllo" in text
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))


def test_pixel_goes_into_base64_html_and_headers_stay_byte_identical() -> None:
    raw = _message("<html><body>hi</body></html>\n", "base64")
    out = insert_pixel(raw, URL)
    assert URL in _html_of(out)
    assert out.split(b"\r\n\r\n", 1)[0] == raw.split(b"\r\n\r\n", 1)[0]
    assert "plain text part" in email.message_from_bytes(out).get_payload()[0].get_payload()


def test_html_without_body_tag_gets_the_pixel_at_the_end() -> None:
    out = insert_pixel(_message("<p>no body tag</p>\n", "7bit"), URL)
    assert _html_of(out).rstrip().endswith(">")
    assert URL in _html_of(out)
