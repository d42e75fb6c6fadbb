"""Which billed calls are refunded (refunds.py), the access-log entry they come from (access_log.py), the
metadata a check hands Envoy (ext_authz.py), and Envoy's filter that must let every refundable entry through."""

from datetime import UTC, datetime

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.protobuf import json_format, struct_pb2

from authz_service.check.authorizer import AccessRequest, CheckOutcome
from authz_service.check.context_signer import ContextSigner
from authz_service.check.decision import ALLOW, Grant, Route
from authz_service.check.ext_authz import CALLER_SECRET_METADATA, AllowedResponses
from authz_service.usage.access_log import logged_request
from authz_service.usage.refunds import (
    BILLED_KEY,
    EXT_AUTHZ_NAMESPACE,
    NO_TERMS,
    REFUND_FLAGS,
    BilledUsage,
    LoggedRequest,
    Refund,
    Terms,
    billed_from_metadata,
    refund_for,
    refund_reason,
)
from driftlock_cli.envoy_config import load_shipped
from driftlock_kernel.billing import BillingStatus
from driftlock_kernel.context_keys import HS256, ContextKeys
from driftlock_kernel.keys import Environment, Scope
from tests.support.authz_requests import STREAM_DETECT

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
# Counted under a metered plan: a refund takes its units back from the counter of those terms.
BILLED = BilledUsage("org-1", PERIOD, "stream", 2, Terms("pro", "api_calls", "cus_1"))


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_a_5xx_answer_is_refunded(status):
    assert refund_reason(status, ()) == "status_5xx"


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 401, 404, 408, 422, 429, None])
def test_a_served_or_client_refused_call_is_charged(status):
    assert refund_reason(status, ()) is None


@pytest.mark.parametrize("flag", ["UH", "UF", "UC", "UR", "UT", "URX", "UO", "UPE", "UMSDR", "SI"])
def test_an_upstream_failure_is_refunded_unless_the_backend_answered_2xx(flag):
    assert refund_reason(None, {flag}) == flag
    assert refund_reason(503, {flag}) == flag
    assert refund_reason(504, {flag}) == flag
    # A 2xx is the backend's own answer: a client that stalled reading it makes Envoy log UT on a 200.
    assert refund_reason(200, {flag}) is None
    assert refund_reason(206, {flag}) is None


def test_a_global_rate_limit_refusal_after_the_count_is_refunded():
    assert refund_reason(429, {"RL"}) == "rate_limited"


def test_a_client_that_hung_up_is_charged_unless_the_backend_failed():
    assert refund_reason(None, {"DC"}) is None
    assert refund_reason(200, {"DC"}) is None
    assert refund_reason(503, {"DC"}) == "status_5xx"


def test_refund_for_takes_back_what_the_check_billed():
    refund = refund_for(LoggedRequest("rid-1", 503, frozenset(), BILLED))
    assert refund == Refund("rid-1", "org-1", PERIOD, "stream", 2, "status_5xx", Terms("pro", "api_calls", "cus_1"))


def test_refund_for_needs_a_billed_call_a_request_id_and_refunds_switched_on():
    assert refund_for(LoggedRequest("rid-1", 503, frozenset(), None)) is None
    assert refund_for(LoggedRequest("", 503, frozenset(), BILLED)) is None
    assert refund_for(LoggedRequest("rid-1", 503, frozenset(), BILLED), enabled=False) is None
    assert refund_for(LoggedRequest("rid-1", 200, frozenset(), BILLED)) is None


def test_billed_usage_survives_a_protobuf_struct_exactly():
    struct = struct_pb2.Struct()
    struct.update(BILLED.as_metadata())
    assert billed_from_metadata(json_format.MessageToDict(struct)) == BILLED


def test_billing_metadata_of_an_older_authz_has_no_terms():
    older = {BILLED_KEY: {"org_id": "org-1", "period_start": PERIOD.isoformat(), "product": "stream", "units": 2}}
    billed = billed_from_metadata(older)
    assert billed is not None and billed.terms == NO_TERMS  # the exporter sends such units where it did before


@pytest.mark.parametrize(
    "billed",
    [
        None,
        "x",
        {"org_id": "o", "period_start": "2026-11-01T00:00:00+00:00", "product": "stream"},
        {"org_id": "o", "period_start": "2026-11-01T00:00:00+00:00", "product": "stream", "units": 1.5},
        {"org_id": "o", "period_start": "2026-11-01T00:00:00+00:00", "product": "stream", "units": 0},
        {"org_id": "o", "period_start": "2026-11-01T00:00:00", "product": "stream", "units": 1},
        {"org_id": "o", "period_start": "yesterday", "product": "stream", "units": 1},
        {"org_id": 5, "period_start": "2026-11-01T00:00:00+00:00", "product": "stream", "units": 1},
    ],
)
def test_metadata_that_is_not_a_whole_billing_record_bills_nothing(billed):
    assert billed_from_metadata({BILLED_KEY: billed}) is None


def entry(*, status: int | None, metadata: dict | None, **flags: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    log = accesslog_pb2.HTTPAccessLogEntry()
    log.request.request_id = "rid-7"
    if status is not None:
        log.response.response_code.value = status
    for name, value in flags.items():
        setattr(log.common_properties.response_flags, name, value)
    if metadata is not None:
        log.common_properties.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].update(metadata)
    return log


def test_the_wire_reads_request_id_status_flags_and_billing_metadata():
    request = logged_request(
        entry(
            status=504,
            metadata=BILLED.as_metadata(),
            upstream_request_timeout=True,
            downstream_connection_termination=True,
        )
    )
    assert request == LoggedRequest("rid-7", 504, frozenset({"UT", "DC"}), BILLED)
    assert refund_for(request) == Refund("rid-7", "org-1", PERIOD, "stream", 2, "UT", BILLED.terms)


def test_the_wire_reads_no_status_as_none_and_other_filters_metadata_as_not_billed():
    request = logged_request(entry(status=None, metadata=None, upstream_connection_failure=True))
    assert (request.status, request.flags, request.billed) == (None, frozenset({"UF"}), None)


def test_an_allowed_billed_check_hands_envoy_what_it_counted():
    grant = Grant(
        "key-1", "org-1", Environment.LIVE, frozenset({Scope.DETECT}), None, False, False, "pro", BillingStatus.ACTIVE
    )
    outcome = CheckOutcome(ALLOW, grant, Route(Scope.DETECT, True, "stream", 2), billed=True, plan="pro", usage=BILLED)
    responses = AllowedResponses(ContextSigner(ContextKeys(HS256, hs256_secret=b"s" * 32)))
    request = AccessRequest("rid-1", "POST", "/api/v1/stream/detect", {}, STREAM_DETECT)
    response = CheckResponse.FromString(responses.build(outcome, request))
    assert billed_from_metadata(json_format.MessageToDict(response.dynamic_metadata)) == BILLED
    # Another period gets a response of its own, not the cached one of the first.
    later = CheckOutcome(
        ALLOW,
        grant,
        outcome.route,
        billed=True,
        plan="pro",
        usage=BilledUsage("org-1", datetime(2026, 12, 1, tzinfo=UTC), "stream", 2),
    )
    moved = billed_from_metadata(
        json_format.MessageToDict(CheckResponse.FromString(responses.build(later, request)).dynamic_metadata)
    )
    assert moved is not None and moved.period_start == datetime(2026, 12, 1, tzinfo=UTC)
    unbilled = CheckOutcome(ALLOW, grant, Route(Scope.READ, False, None, 1), plan="pro")
    assert not CheckResponse.FromString(responses.build(unbilled, request)).HasField("dynamic_metadata")


def _refund_logger() -> dict:
    manager = load_shipped()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (logger,) = [log for log in manager["access_log"] if log["name"] == "envoy.access_loggers.http_grpc"]
    return logger


def test_envoys_access_log_lets_through_every_entry_authz_would_refund():
    logger = _refund_logger()
    metadata_filter, either = logger["filter"]["and_filter"]["filters"]
    assert metadata_filter["metadata_filter"]["matcher"] == {
        "filter": EXT_AUTHZ_NAMESPACE,
        "path": [{"key": BILLED_KEY}],
        "value": {"present_match": True},
    }
    status_filter, flag_filter = either["or_filter"]["filters"]
    comparison = status_filter["status_code_filter"]["comparison"]
    assert (comparison["op"], comparison["value"]["default_value"]) == ("GE", 500)
    assert set(flag_filter["response_flag_filter"]["flags"]) == REFUND_FLAGS
    common = logger["typed_config"]["common_config"]
    assert common["grpc_service"]["envoy_grpc"] == {"cluster_name": "authz"}
    # Only Envoy may send refunds: the stream carries the same secret as the checks.
    assert [m["key"] for m in common["grpc_service"]["initial_metadata"]] == [CALLER_SECRET_METADATA]
