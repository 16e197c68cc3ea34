"""dst's log lines: ``TIME LEVEL LOGGER key=value``, one line per event, no PEM blocks."""

from __future__ import annotations

import logging
import re
import sys

from dst.logs import EventFormatter

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) dst\.test \S")


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("dst.test", logging.ERROR, __file__, 1, msg, args, info)


def test_an_event_is_one_line_with_an_utc_timestamp() -> None:
    line = EventFormatter().format(record("volume=%s peer=%s event=attached", "vol0", "a:1"))
    assert LINE.match(line.replace("ERROR", "INFO", 1)), line
    assert line.endswith("volume=vol0 peer=a:1 event=attached")


def test_a_traceback_stays_on_the_line() -> None:
    line = EventFormatter().format(record("event=crashed", exc=True))
    assert "\n" not in line
    assert " event=crashed traceback='Traceback" in line
    assert "ValueError: boom" in line


def test_pem_blocks_are_redacted() -> None:
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    line = EventFormatter().format(record("event=oops detail=%r", f"bad file: {key} tail"))
    assert "MIIEvQ" not in line and "[PEM redacted]" in line and "tail" in line
    cut = "-----BEGIN CERTIFICATE-----\nMIIBxTCCAWugAwIBAgIU"  # no END: redacted to the end
    assert "MIIBxT" not in EventFormatter().format(record("x=%s", cut))
