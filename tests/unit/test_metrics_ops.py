"""Operations helpers: log redaction and fields, sd_notify datagrams, reload diffs."""

from __future__ import annotations

import dataclasses
import logging
import socket
import uuid
from pathlib import Path

import pytest

from relay import systemd
from relay.config import Config, SMTPConfig
from relay.logs import pairs, redact, setup_logging
from relay.reload import changed_keys


def test_redact_masks_secret_looking_values() -> None:
    line = "auth user=alice password=hunter2 token='abc def' api_key: k-123 reply=ok"
    out = redact(line)
    assert "hunter2" not in out and "abc def" not in out and "k-123" not in out
    assert "user=alice" in out and "reply=ok" in out


@pytest.mark.parametrize(
    "line",
    [
        "smtp PASSWD=hunter2 ok",
        "x Authorization: Bearer-hunter2",
        "x auth_data=hunter2",
        "x API-KEY=hunter2",
        # Non-ASCII lines take the regex, which under (?i) reads U+017F as s and U+212A as k.
        "x pa\u017fsword=hunter2",
        "x to\u212aen=hunter2",
    ],
)
def test_redact_masks_every_key_form_whichever_path_the_line_takes(line: str) -> None:
    assert "hunter2" not in redact(line)


def test_redact_leaves_a_line_without_secret_keys_as_it_is() -> None:
    line = "delivery qid=Q1 rcpt_domain=example.org status=delivered reply='250 2.0.0 Ok' ms=1"
    assert redact(line) is line
    assert redact("répondu qid=Q1 status=sent") == "répondu qid=Q1 status=sent"


def test_log_lines_keep_their_format_without_caller_thread_or_process_lookups(
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = (logging.getLogger().handlers[:], logging.getLogger().level, logging._srcfile)
    try:
        setup_logging("info", "keyvalue")
        assert logging._srcfile is None and not logging.logProcesses
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("relay.delivery").exception("delivery qid=Q1 status=failed")
        err = capsys.readouterr().err
        assert " level=error delivery qid=Q1 status=failed\n" in err
        assert "ValueError: boom" in err
    finally:
        logging.getLogger().handlers[:], level, logging._srcfile = saved
        logging.getLogger().setLevel(level)
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = True


def test_pairs_lifts_key_value_fields_with_quotes_and_brackets() -> None:
    msg = "smtp listener=submission from=<a@example.com> reply='550 5.7.1 no' size=12"
    assert pairs(msg) == {
        "listener": "submission",
        "from": "a@example.com",
        "reply": "550 5.7.1 no",
        "size": "12",
    }


def test_notify_without_notify_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_notify_sends_one_datagram_to_a_path_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"/tmp/relay-notify-{uuid.uuid4().hex[:8]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.stopping("draining") is True
        assert sock.recv(1024) == b"STOPPING=1\nSTATUS=draining"
    finally:
        sock.close()
        Path(path).unlink()


def test_notify_to_a_missing_socket_is_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@relay-nobody-listens-" + uuid.uuid4().hex)
    assert systemd.ready() is False


def test_changed_keys_lists_dotted_paths_of_changed_leaves() -> None:
    old = Config(node_id="n", hostname="h")
    new = dataclasses.replace(old, smtp=SMTPConfig(max_recipients=2, timeout=10.0))
    assert changed_keys(old, new) == ["smtp.max_recipients", "smtp.timeout"]
    assert changed_keys(old, old) == []
