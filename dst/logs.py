"""The log format of every dst process: one line per event,
``TIME LEVEL LOGGER key=value ...``.

``TIME`` is UTC ISO 8601 with milliseconds (``2026-12-03T07:45:11.123Z``): one token, sortable,
the same on every host.  Messages are the ``key=value`` lines the code writes
(``volume=vol0 peer=10.0.0.2:7410 tid=17 event=...``).  Two things keep an event on one line
and keep secrets out of it:

- a traceback (``log.exception``) is appended as one ``traceback='...'`` field, its newlines
  escaped, instead of the multi-line block ``logging`` prints by default;
- any PEM block (a private key or a certificate pasted into an error message) is replaced by
  ``[PEM redacted]``.  dst never logs key material on purpose: TLS settings are logged as the
  directory name only; this is the net under that rule.
"""

from __future__ import annotations

import logging
import re
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|$)", re.DOTALL)


class EventFormatter(logging.Formatter):
    """``logging.Formatter`` for dst's one-line events (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        if record.exc_info:
            line += f" traceback={self.formatException(record.exc_info)!r}"
        elif record.exc_text:
            line += f" traceback={record.exc_text!r}"
        line = redact(line)
        return line.replace("\r", "\\r").replace("\n", "\\n")


def redact(text: str) -> str:
    return _PEM.sub("[PEM redacted]", text)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the event (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str = "INFO") -> None:
    """Send dst's events to stderr (journald adds its own timestamp; ours stays for files).
    Idempotent: replaces only a handler an earlier call installed."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, _StderrHandler):
            root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(EventFormatter())
    root.addHandler(handler)
    root.setLevel(level)
