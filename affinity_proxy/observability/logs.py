"""Logging setup: text or JSON lines, level from config or ``LOG_LEVEL``, and redaction helpers.

Secrets (cookie values, tokens, Redis passwords) must never reach a log line: callers pass values
through ``redact_token`` / ``redact_url`` first, and the JSON formatter only emits the fields it is
given in ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]+)@", re.I)


def redact_token(value: str | None, keep: int = 4) -> str:
    """Show only a short prefix of a token or cookie value (enough to correlate, not to replay)."""
    if not value:
        return ""
    if len(value) <= keep * 2:
        return "***"
    return value[:keep] + "…"


def redact_url(url: str) -> str:
    """Replace the password of ``scheme://user:password@host`` with ***."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable line with ``key=value`` fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Install one stderr handler on the ``affinity_proxy`` and ``aiohttp`` loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
