"""The usage API (our own proto) on the authz port, over real gRPC."""

import asyncio
import time
import uuid

import grpc
import jwt
import pytest

from driftlock_api.usage.v1 import usage_pb2, usage_pb2_grpc
from driftlock_cli import protos
from driftlock_kernel import plans, usage
from driftlock_kernel.billing import Overage
from tests.support.admin import admin_metadata, admin_token
from tests.support.usage import wait_for_usage


@pytest.fixture(scope="module")
async def stubs(gateway):
    channels = [grpc.aio.insecure_channel(gateway.authz_target(i)) for i in range(2)]
    yield [usage_pb2_grpc.UsageServiceStub(c) for c in channels]
    for channel in channels:
        await channel.close(grace=None)


@pytest.fixture
def auth(admin_secret):
    return admin_metadata(admin_secret)


def old_style_service_token(jwt_secret: str) -> str:
    """What callers of UsageService sent before it moved to DRIFTLOCK_ADMIN_TOKEN_SECRET."""
    now = int(time.time())
    claims = {"iss": "driftlock-backend", "aud": "driftlock-gateway", "iat": now, "exp": now + 300}
    return jwt.encode(claims, jwt_secret.encode(), algorithm="HS256")


def test_generated_stubs_are_up_to_date():
    assert protos.stale_files() == []


async def test_calls_without_a_valid_token_are_refused(stubs, make_org, jwt_secret, admin_secret):
    org = await make_org()
    request = usage_pb2.GetUsageRequest(org_id=str(org.id))
    for metadata in (
        [],
        [("authorization", "Bearer nonsense")],
        [("authorization", f"Bearer {admin_token('x' * 32)}")],
        # The token signed with the context-token secret, as UsageService took before: refused now.
        [("authorization", f"Bearer {old_style_service_token(jwt_secret)}")],
        [("authorization", f"Bearer {admin_token(admin_secret, lifetime_seconds=3600)}")],
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs[0].GetUsage(request, metadata=metadata, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_for_another_organisation_is_refused(stubs, make_org, admin_secret):
    mine, theirs = await make_org(), await make_org()
    metadata = admin_metadata(admin_secret, org_id=mine.id)
    assert (await stubs[0].GetUsage(usage_pb2.GetUsageRequest(org_id=str(mine.id)), metadata=metadata)).org_id
    for call in (
        stubs[0].GetUsage(usage_pb2.GetUsageRequest(org_id=str(theirs.id)), metadata=metadata, timeout=5),
        stubs[1].ReportUsage(
            usage_pb2.ReportUsageRequest(
                request_id=str(uuid.uuid4()), org_id=str(theirs.id), product="stream", units=1
            ),
            metadata=metadata,
            timeout=5,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_get_usage_reports_plan_period_and_usage(stubs, auth, make_org, make_key, pool):
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, "usage-api-block", included_units=200, overage=Overage.BLOCK, rate_limit_rps=50.0)
    org = await make_org(plan="usage-api-block")
    report = await stubs[0].ReportUsage(
        usage_pb2.ReportUsageRequest(request_id=str(uuid.uuid4()), org_id=str(org.id), product="stream", units=30),
        metadata=auth,
        timeout=5,
    )
    assert report.accepted and report.used_units == 30
    await wait_for_usage(pool, org.id, {"stream": 30})
    usage = await stubs[0].GetUsage(usage_pb2.GetUsageRequest(org_id=str(org.id)), metadata=auth, timeout=5)
    assert usage.org_id == str(org.id)
    assert (usage.plan, usage.overage, usage.included_units, usage.unit_cap) == ("usage-api-block", "block", 200, 200)
    assert usage.used_units == 30 and dict(usage.stored_units_by_product) == {"stream": 30}
    assert usage.ratio == pytest.approx(0.15)
    assert usage.rate_limit_rps == 50.0
    assert usage.period_start.ToDatetime() < usage.period_end.ToDatetime()
    assert not usage.payment_required


async def test_a_report_is_idempotent_by_request_id_even_across_replicas(stubs, auth, make_org, pool):
    org = await make_org()
    request = usage_pb2.ReportUsageRequest(
        request_id=f"req-{uuid.uuid4()}", org_id=str(org.id), product="monitor", units=4
    )
    first = await stubs[0].ReportUsage(request, metadata=auth, timeout=5)
    again = await stubs[0].ReportUsage(request, metadata=auth, timeout=5)
    other_replica = await stubs[1].ReportUsage(request, metadata=auth, timeout=5)
    assert first.accepted and not again.accepted
    assert other_replica.accepted  # it cannot know yet; the database keeps the report once
    marker = usage_pb2.ReportUsageRequest(
        request_id=f"req-{uuid.uuid4()}", org_id=str(org.id), product="stream", units=1
    )
    await asyncio.gather(*(stub.ReportUsage(marker, metadata=auth, timeout=5) for stub in stubs))
    await wait_for_usage(pool, org.id, {"monitor": 4, "stream": 1})


async def test_report_ids_are_per_organisation(stubs, auth, make_org, pool):
    # The same backend request id from two organisations is two reports, through one replica and in the database
    # (the second replica never saw the first report, so only the database can tell them apart).
    first, second = await make_org(), await make_org()
    request_id = f"shared-{uuid.uuid4()}"
    for stub, org, units in ((stubs[0], first, 3), (stubs[0], second, 5), (stubs[1], second, 5)):
        await stub.ReportUsage(
            usage_pb2.ReportUsageRequest(request_id=request_id, org_id=str(org.id), product="stream", units=units),
            metadata=auth,
            timeout=5,
        )
    await wait_for_usage(pool, first.id, {"stream": 3})
    await wait_for_usage(pool, second.id, {"stream": 5})


async def test_only_an_operator_token_reports_usage(stubs, make_org, admin_secret, pool):
    org = await make_org()
    mine = admin_metadata(admin_secret, org_id=org.id)
    assert (await stubs[0].GetUsage(usage_pb2.GetUsageRequest(org_id=str(org.id)), metadata=mine)).org_id
    request = usage_pb2.ReportUsageRequest(request_id=str(uuid.uuid4()), org_id=str(org.id), product="stream", units=9)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs[0].ReportUsage(request, metadata=mine, timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator" in (caught.value.details() or "")


async def test_a_report_crossing_a_block_cap_counts_up_to_it_and_says_the_cap_was_reached(stubs, auth, make_org, pool):
    """docs/backend.md: reported units are capped exactly like units counted at the edge."""
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, "usage-api-cap", included_units=1000, overage=Overage.BLOCK)
    org = await make_org(plan="usage-api-cap")

    async def report(units: int) -> usage_pb2.ReportUsageResponse:
        request = usage_pb2.ReportUsageRequest(
            request_id=str(uuid.uuid4()), org_id=str(org.id), product="stream", units=units
        )
        return await stubs[0].ReportUsage(request, metadata=auth, timeout=5)

    below = await report(990)
    assert (below.accepted, below.counted_units, below.cap_reached, below.unit_cap) == (True, 990, False, 1000)
    crossing = await report(11)  # 1,001 of 1,000: one unit past the cap
    assert crossing.accepted and crossing.cap_reached
    assert (crossing.counted_units, crossing.used_units, crossing.unit_cap) == (10, 1000, 1000)
    past = await report(5)
    assert (past.counted_units, past.used_units, past.cap_reached) == (0, 1000, True)
    await wait_for_usage(pool, org.id, {"stream": 1000})
    soft = await make_org()  # free: a soft plan without a hard cap counts everything
    free = await stubs[0].ReportUsage(
        usage_pb2.ReportUsageRequest(request_id=str(uuid.uuid4()), org_id=str(soft.id), product="stream", units=7),
        metadata=auth,
        timeout=5,
    )
    assert (free.counted_units, free.cap_reached, free.HasField("unit_cap")) == (7, False, False)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"org_id": "not-a-uuid"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"org_id": str(uuid.UUID(int=1))}, grpc.StatusCode.NOT_FOUND),
        ({"units": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"units": 2_000_000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"product": "Stream!"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"product": "billing"}, grpc.StatusCode.INVALID_ARGUMENT),  # a well-formed name of no product
        ({"product": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_reports_are_refused_with_a_status(stubs, auth, make_org, change, code):
    org = await make_org()
    fields = {"request_id": str(uuid.uuid4()), "org_id": str(org.id), "product": "stream", "units": 1} | change
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs[0].ReportUsage(usage_pb2.ReportUsageRequest(**fields), metadata=auth, timeout=5)
    assert caught.value.code() == code


async def test_a_product_the_kernel_does_not_know_is_refused_naming_the_known_ones(stubs, auth, make_org):
    org = await make_org()
    request = usage_pb2.ReportUsageRequest(request_id=str(uuid.uuid4()), org_id=str(org.id), product="p1", units=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs[0].ReportUsage(request, metadata=auth, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"product must be one of {', '.join(usage.PRODUCTS)}"
