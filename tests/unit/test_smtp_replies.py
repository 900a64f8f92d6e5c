import pytest

from relay.smtp.protocol import with_enhanced_code


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("553 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.2 Syntax: MAIL FROM: <address>"),
        ("550 5.7.1 already coded", "550 5.7.1 already coded"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("220 relay.test ESMTP", "220 relay.test ESMTP"),
        ("250-SIZE 100", "250-SIZE 100"),
    ],
)
def test_library_replies_get_rfc3463_codes(raw: str, expected: str) -> None:
    assert with_enhanced_code(raw) == expected
