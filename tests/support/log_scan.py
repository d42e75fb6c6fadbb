"""Secrets that must never reach a log line: API keys, Stripe webhook secrets, Stripe API keys, JWTs (context
tokens, admin tokens) and the JWT signing secret itself."""

import json
import re
from pathlib import Path

PATTERNS = {
    "API key": re.compile(r"dlk_(?:live|test)_[0-9A-Za-z]{20,}"),
    "webhook signing secret": re.compile(r"whsec_[0-9A-Za-z_\-]{8,}"),
    "Stripe API key": re.compile(r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{8,}"),
    "JWT": re.compile(r"eyJ[0-9A-Za-z_\-]{8,}\.eyJ[0-9A-Za-z_\-]{8,}\.[0-9A-Za-z_\-]{8,}"),
}
# What a service's own log lines look like in production (DRIFTLOCK_LOG_FORMAT=json).
JSON_FIELDS = {"time", "level", "logger", "message"}


def secrets_in(text: str, known: tuple[str, ...] = ()) -> list[str]:
    """Each secret found, as 'what: line' (the secret itself masked)."""
    found = []
    for line in text.splitlines():
        for what, pattern in PATTERNS.items():
            if pattern.search(line):
                found.append(f"{what}: {pattern.sub('<redacted>', line)[:300]}")
        for secret in known:
            if secret and secret in line:
                found.append(f"a configured secret: {line.replace(secret, '<redacted>')[:300]}")
    return found


def scan_logs(log_dir: Path, known: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted(log_dir.glob("*.log")):
        found += [f"{path.name}: {hit}" for hit in secrets_in(path.read_text(errors="replace"), known)]
    return found


def not_json_lines(text: str) -> list[str]:
    """Lines of a service's log that are not one JSON object with time, level, logger and message."""
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(obj, dict) or not JSON_FIELDS <= set(obj):
            bad.append(line)
    return bad
