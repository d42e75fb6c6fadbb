"""One example of each event type, as the gateway sends it: for docs/events.md and for the Go verifier's tests,
which check payloads this side signs (go/driftlock/testdata/standard_webhooks.json).

    python -m driftlock_kernel.event_examples            # rewrite the Go test data
    python -m driftlock_kernel.event_examples --check    # exit 1 if it is stale (a unit test runs this)
"""

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from driftlock_kernel import events
from driftlock_kernel.events import EventType

ORG = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
KEY = "8d2f9a10-4b7e-4c1a-9f3d-2e5b6c7d8e9f"
NEW_KEY = "c0ffee00-1234-4abc-8def-0123456789ab"
PERIOD = "2026-12-01T00:00:00Z"

EXAMPLES: dict[str, dict[str, Any]] = {
    EventType.USAGE_THRESHOLD_REACHED: {
        "alert_id": 42, "threshold": 90, "used": 90_000, "included": 100_000, "plan": "pro",
        "period_start": PERIOD, "period_end": "2027-01-01T00:00:00Z",
    },
    EventType.USAGE_SPEND_CAP_REACHED: {
        "used": 150_000, "cap": 150_000, "cap_kind": "hard_cap", "period_start": PERIOD,
    },
    EventType.BILLING_PAYMENT_FAILED: {
        "past_due_since": "2026-12-03T10:00:00Z", "restricts_at": "2026-12-10T10:00:00Z",
        "billing_status": "past_due", "invoice_id": "in_1QxYz",
    },
    EventType.BILLING_SERVICE_RESTRICTED: {
        "past_due_since": "2026-12-03T10:00:00Z", "restricted_at": "2026-12-10T10:00:00Z",
        "billing_status": "past_due",
    },
    EventType.BILLING_PAYMENT_RECOVERED: {"billing_status": "active", "past_due_since": "2026-12-03T10:00:00Z"},
    EventType.BILLING_PLAN_CHANGED: {"plan": "pro", "previous_plan": "free"},
    EventType.BILLING_TRIAL_WILL_END: {"trial_end": "2026-12-09T00:00:00Z", "subscription_id": "sub_1QxYz"},
    EventType.KEY_EXPIRING: {
        "key_id": KEY, "name": "production", "expires_at": "2026-12-13T12:00:00Z", "days_before": 7,
    },
    EventType.KEY_REVOKED: {"key_id": KEY, "revoked_at": "2026-12-06T12:00:00Z"},
    EventType.KEY_ROLLED: {"key_id": KEY, "new_key_id": NEW_KEY, "old_expires_at": "2026-12-07T12:00:00Z"},
    EventType.ORG_SUSPENDED: {"suspended_at": "2026-12-06T12:00:00Z"},
    EventType.ORG_RESUMED: {"suspended_since": "2026-12-06T12:00:00Z"},
    EventType.ENDPOINT_TEST: {"endpoint_id": "5e1d0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"},
}  # fmt: skip

# Fixed, so that the test data is the same bytes every time (a real secret comes from events.new_secret()).
FIXTURE_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FIXTURE_TIMESTAMP = 1_765_022_400  # 2025-12-06T12:00:00Z
FIXTURE_PATH = Path(__file__).resolve().parent.parent / "go" / "driftlock" / "testdata" / "standard_webhooks.json"


def example_body(event_type: str) -> bytes:
    occurred = datetime.fromtimestamp(FIXTURE_TIMESTAMP, UTC)
    return events.body(event_type, occurred, {**EXAMPLES[event_type], "org_id": ORG})


def fixture() -> dict[str, Any]:
    """Every example signed as the gateway signs it, with the secret and time the Go tests use."""
    key = events.secret_key(FIXTURE_SECRET)
    messages = []
    for n, event_type in enumerate(EXAMPLES):
        body = example_body(event_type)
        message_id = f"evt_{n:032x}"
        headers = events.headers([key], message_id, FIXTURE_TIMESTAMP, body)
        messages.append({"type": str(event_type), "headers": headers, "body": body.decode()})
    return {"secret": FIXTURE_SECRET, "timestamp": FIXTURE_TIMESTAMP, "messages": messages}


def render() -> str:
    return json.dumps(fixture(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = FIXTURE_PATH.read_text() if FIXTURE_PATH.exists() else ""
        if current != text:
            sys.exit(f"{FIXTURE_PATH} is stale: run python -m driftlock_kernel.event_examples")
        return
    FIXTURE_PATH.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE_PATH.write_text(text)
    print(f"wrote {FIXTURE_PATH}")


if __name__ == "__main__":
    main()
