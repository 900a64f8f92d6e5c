"""Logging to stderr (journald picks it up): key=value lines by default, JSON on request.

Log calls write ``key=value`` pairs in the message; the JSON formatter lifts them into
fields, so one call site serves both formats. A last-line filter masks the value of any
secret-looking key (password, token, secret, authorization) in case a call site ever
passes one: a log line must never hold a password, a token or a message body.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

_PAIR = re.compile(r"""([A-Za-z_][A-Za-z0-9_.]*)=('[^']*'|"[^"]*"|<[^>]*>|\S+)""")
_SECRET = re.compile(
    r"""(?i)\b((?:pass(?:word|wd)?|secret|token|api[_-]?key|authorization|auth_data)"""
    r"""\s*[=:]\s*)('[^']*'|"[^"]*"|\S+)"""
)


# Every key _SECRET knows contains one of these. An ASCII line without any of them cannot
# match, and a substring test is ~10x cheaper than the regex's scan (issue 9: a log line
# per message in each process). Non-ASCII lines always take the regex: under (?i) it also
# matches U+017F and U+212A for s and k, and U+0130 and U+0131 for i, which str.lower()
# does not map.
_SECRET_HINTS = ("pass", "secret", "token", "api", "auth")


def redact(text: str) -> str:
    """Mask the values of secret-looking keys (``password=hunter2`` -> ``password=***``)."""
    if text.isascii():
        low = text.lower()
        if not any(hint in low for hint in _SECRET_HINTS):
            return text
    return _SECRET.sub(lambda m: m.group(1) + "***", text)


def pairs(message: str) -> dict[str, str]:
    """The key=value pairs of a message (quotes and <> around values removed)."""
    out: dict[str, str] = {}
    for key, value in _PAIR.findall(message):
        quoted = value[:1] in ("'", '"') and value[-1:] == value[:1] and len(value) >= 2
        if quoted or (value.startswith("<") and value.endswith(">")):
            value = value[1:-1]
        out[key] = value
    return out


_node = ""


def set_node(node_id: str) -> None:
    """Name the node on every line: several nodes share one database and one log store."""
    global _node
    _node = node_id


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    # Formatted once a second, not per line (a line per message in each process).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = _second(int(record.created))
        msg = redact(record.getMessage())
        node = f" node={_node}" if _node else ""
        line = f"{ts}.{int(record.msecs):03d}Z level={record.levelname.lower()}{node} {msg}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = redact(record.getMessage())
        out: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        if _node:
            out["node"] = _node
        for key, value in pairs(msg).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def level_number(level: str) -> int:
    return _LEVELS.get(level.lower(), logging.INFO)


def set_level(level: str) -> None:
    """Change the level live (SIGHUP reload)."""
    logging.getLogger().setLevel(level_number(level))
    # aiosmtpd logs every command line at INFO and AUTH exchanges at DEBUG (base64
    # credentials): keep it at WARNING whatever relay's own level is; relay writes its
    # own one line per transaction.
    # Its per-session warnings (AUTH-without-TLS: we enforce TLS for AUTH ourselves;
    # login_data deprecation) would print on every connection, so only errors pass.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # Alembic announces each of its plugins at INFO on every start: not news to ops.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def setup_logging(level: str = "info", fmt: str = "keyvalue") -> None:
    # Neither format shows the caller, thread or process, so each record need not look
    # them up (a frame walk and a getpid per line; the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
