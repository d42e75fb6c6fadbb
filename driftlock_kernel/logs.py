"""Log format for the services: one event per line, to stderr, at the level DRIFTLOCK_LOG_LEVEL names.

In production (`DRIFTLOCK_LOG_FORMAT=json`, the default) each line is one JSON object: `time` (ISO 8601 UTC),
`level`, `logger`, `message`, and `request_id` / `org_id` when the event happened while serving a request
(bound with `bind_request` / `bind_org`, which follow the request's asyncio task), plus `exception` for a
traceback. `dev` asks for readable text lines instead. A message is never a secret: keys, signing secrets and
tokens are not logged anywhere (an end-to-end test greps every line).

Every record passes `RedactKeys` on its way out: anything of the API key format in a message, its arguments or
an exception's text (a key a client put in a path, say) is replaced before any formatter sees it, whoever
logged it (our code or a library).
"""

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from driftlock_kernel.keys import redact_keys

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("driftlock_request_id", default=None)
_ORG_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("driftlock_org_id", default=None)
# Fields a caller may pass with `extra=`; anything else in a record's dict is logging's own.
CONTEXT_FIELDS = ("request_id", "org_id")


class RedactKeys(logging.Filter):
    """Replaces API keys in a record's message and exception text (the record is changed in place)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_keys(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_keys(record.exc_text)
            record.exc_info = None  # so that every formatter writes the redacted text, not the traceback anew
        return True


def bind_request(request_id: str | None) -> None:
    """Name the request the current task serves, for every line it logs (and forget the organisation)."""
    _REQUEST_ID.set(request_id or None)
    _ORG_ID.set(None)


def bind_org(org_id: str | None) -> None:
    _ORG_ID.set(org_id or None)


def _context(record: logging.LogRecord) -> dict[str, str]:
    found = {}
    for name, var in (("request_id", _REQUEST_ID), ("org_id", _ORG_ID)):
        value = getattr(record, name, None) or var.get()
        if value:
            found[name] = str(value)
    return found


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: newlines in a message or a traceback stay inside the string."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_context(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [request_id=… org_id=…]`, for a person reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = _context(record)
        if context:
            text += " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]"
        return text


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactKeys())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    # Python's own warnings go through the same handler, so that they too are one JSON object per line.
    logging.captureWarnings(True)
