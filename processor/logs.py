"""Logging: JSON lines by default (one object per line, with partition/offset and other context as fields), or text
lines that keep the same fields as `key=value`.

Three things every entry point gets from `configure_logging`:
* librdkafka's own log lines (clients are made with `"logger": logging.getLogger("librdkafka")`) pass through one
  `RepeatFilter`: a broker that is down makes librdkafka say the same thing many times a second;
* that filter is shared (`client_log_filter()`), so the worker's own client-error logger can attach it too and a
  failure reported by both librdkafka and our error callback is printed once;
* a status line (the replay progress bar) and log lines never tear each other: the handler clears the bar, writes
  the log line, and draws the bar again under it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Callable, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
LIBRDKAFKA_LOGGER = "librdkafka"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured context a caller passed with `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(_fields(record))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def _text_value(value: object) -> str:
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    # Quote only where a reader (or grep/awk) would otherwise split the value.
    return json.dumps(text, ensure_ascii=False) if not text or re.search(r'[\s="]', text) else text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`: the JSON format's fields, readable in a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, newline, tail = line.partition("\n")  # fields go on the message line, before any traceback
        return head + " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items()) + newline + tail


# ------------------------------------------------------------------------------------------ repeated lines
_LIBRDKAFKA_PREFIX = re.compile(r"^\w+ \[[^\]]*\] (\[thrd:[^\]]*\]: )?")
_NUMBERS = re.compile(r"\d+")


def _repeat_key(record: logging.LogRecord) -> str:
    """What makes two client log lines 'the same': the text without librdkafka's facility/client/thread prefix
    (the error callback reports the same text without it) and with numbers blurred (ports, `after 12ms`)."""
    text = getattr(record, "client_error", None) or _LIBRDKAFKA_PREFIX.sub("", record.getMessage())
    return _NUMBERS.sub("#", str(text))


class RepeatFilter(logging.Filter):
    """Deduplicate and rate-limit: a line is let through once per `window_s` (later repeats are counted and the
    count is appended to the next one let through), and at most `burst` distinct lines per window pass at all.

    It acts on librdkafka's records and on records that carry `client_error` (extra=): the client's own error text,
    the key they are deduplicated by, so the worker's error-callback line and librdkafka's log line about one
    failure count as one. Any other record passes untouched, so the filter can sit on a logger that also carries
    the worker's other lines.
    """

    def __init__(self, window_s: float = 60.0, burst: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s, self.burst, self.clock = window_s, burst, clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # key → (when last let through, repeats suppressed since)
        self._window_started = clock()
        self._passed_in_window = 0
        self._dropped_in_window = 0

    def reset(self) -> None:
        """Forget every line seen and start a new window (a process that reconfigures its logging starts afresh)."""
        with self._lock:
            self._seen.clear()
            self._window_started, self._passed_in_window, self._dropped_in_window = self.clock(), 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != LIBRDKAFKA_LOGGER and getattr(record, "client_error", None) is None:
            return True
        key = _repeat_key(record)
        now = self.clock()
        with self._lock:
            if now - self._window_started >= self.window_s:
                self._window_started, self._passed_in_window = now, 0
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.window_s:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            if self._passed_in_window >= self.burst:
                self._dropped_in_window += 1
                return False
            notes = []
            if last is not None and last[1]:
                notes.append(f"repeated {last[1]} more time(s) in the last {now - last[0]:.0f} s")
            if self._dropped_in_window:
                notes.append(f"{self._dropped_in_window} other client line(s) suppressed")
                self._dropped_in_window = 0
            self._seen[key] = (now, 0)
            self._passed_in_window += 1
            if len(self._seen) > 1000:  # bounded memory whatever the client says
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        if notes:
            record.msg, record.args = f"{record.getMessage()} ({'; '.join(notes)})", None
        return True


_CLIENT_FILTER = RepeatFilter()


def client_log_filter() -> RepeatFilter:
    """The one filter for Kafka client lines (librdkafka's logger and any client-error logger that adds it)."""
    return _CLIENT_FILTER


# --------------------------------------------------------------------------------------------- status line
class StatusLine:
    """One line of status (a progress bar) kept at the bottom of a terminal while log lines scroll above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text = ""
        self.lock = threading.RLock()

    def show(self, text: str) -> None:
        with self.lock:
            padding = " " * max(0, len(self.text) - len(text))
            self.text = text
            self.stream.write(f"\r{text}{padding}")
            self.stream.flush()

    def hide(self) -> None:
        with self.lock:
            if self.text:
                self.stream.write("\r" + " " * len(self.text) + "\r")

    def redraw(self) -> None:
        with self.lock:
            if self.text:
                self.stream.write(f"\r{self.text}")
                self.stream.flush()

    def close(self) -> None:
        """Leave the last state on screen and move below it."""
        global _STATUS
        with self.lock:
            if self.text:
                self.stream.write("\n")
                self.stream.flush()
            self.text = ""
            if _STATUS is self:
                _STATUS = None


_STATUS: StatusLine | None = None


def open_status_line(stream: TextIO = sys.stderr) -> StatusLine:
    """The status line log handlers on the same stream keep clear of; close() it when done."""
    global _STATUS
    _STATUS = StatusLine(stream)
    return _STATUS


class StatusAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that hides an open status line on its stream while it writes, then draws it again."""

    def emit(self, record: logging.LogRecord) -> None:
        status = _STATUS
        if status is None or status.stream is not self.stream:
            super().emit(record)
            return
        with status.lock:
            status.hide()
            super().emit(record)
            status.redraw()


def configure_logging(fmt: str = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = StatusAwareHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    client = logging.getLogger(LIBRDKAFKA_LOGGER)
    if _CLIENT_FILTER not in client.filters:
        client.addFilter(_CLIENT_FILTER)
