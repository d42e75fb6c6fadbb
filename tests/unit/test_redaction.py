"""Keys are never stored or logged: whatever has the key format is redacted from paths and log records."""

import io
import logging

import pytest

from authz_service.check.audit import audit_path
from driftlock_kernel.keys import Environment, generate_key, redact_keys
from driftlock_kernel.logs import RedactKeys

LIVE = generate_key(Environment.LIVE).secret
TEST = generate_key(Environment.TEST).secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/api/v1/models/{LIVE}", "/api/v1/models/dlk_live_[redacted]"),
        (f"/api/v1/models/{LIVE}/runs", "/api/v1/models/dlk_live_[redacted]/runs"),
        (f"/x/{TEST}:y", "/x/dlk_test_[redacted]:y"),
        (f"/x/{LIVE[:-3]}", "/x/dlk_live_[redacted]"),  # a mistyped key is most of a secret too
        ("/x/DLK_LIVE_abcDEF123", "/x/dlk_live_[redacted]"),
        ("/x/dlk%5Flive%5Fabc123", "/x/dlk_live_[redacted]"),
        (f"a={LIVE},b={TEST}", "a=dlk_live_[redacted],b=dlk_test_[redacted]"),
        ("/api/v1/dlk_other/x", "/api/v1/dlk_other/x"),
        ("/api/v1/models", "/api/v1/models"),
    ],
)
def test_anything_of_the_key_format_is_redacted(text, expected):
    assert redact_keys(text) == expected


def test_the_audit_path_has_no_key_and_no_query():
    assert audit_path(f"/api/v1/{LIVE}/detect?key={TEST}") == "/api/v1/dlk_live_[redacted]/detect"


def test_log_records_lose_keys_in_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactKeys())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("refusing %s", f"/api/{LIVE}")
        logger.warning(f"inline {TEST}")
        try:
            raise ValueError(f"bad key {LIVE}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert LIVE not in written and TEST not in written and LIVE[9:20] not in written
    assert written.count("[redacted]") == 3
