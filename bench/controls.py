"""What the customer controls (issue 20) cost per check: the same build, in one process, one billable Check
for a key with none of them against one with all of them configured (the organisation's spend cap; the key's
unit cap, own rate limit, three allowed networks, products), interleaved. Every control is decided from memory;
the key's unit cap adds its own meter (a dict update per call, one flush statement per interval).

    python -m bench --only controls
"""

import statistics
import time
import uuid

from bench.harness import Fixture, check_request_bytes
from driftlock_kernel import api_keys, context_keys, db, orgs, plans
from driftlock_kernel.billing import Overage

STREAM_DETECT = {"scope": "detect", "billable": "true", "product": "stream", "units": "1"}


async def bench_controls(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    from envoy.service.auth.v3 import external_auth_pb2

    from authz_service.check.assembly import CheckParts, assemble_authorizer
    from authz_service.check.context_signer import ContextSigner
    from authz_service.check.ext_authz import AuthorizationServicer
    from authz_service.check.grants import GrantStore, database_fetch
    from authz_service.check.plan_book import PlanBook, database_load
    from authz_service.usage.meter_store import KEY_TABLES, TEST_TABLES, MeterStore
    from authz_service.usage.metering import Meter
    from authz_service.usage.usage_ledger import UsageLedger

    pool = await db.create_pool(fixture.url, application_name="bench-controls", max_size=2)
    async with pool.acquire() as conn:
        # Limits no benchmark reaches, so that every check runs each stage and is allowed. Both keys are on the
        # same plan, with a rate limit, so both take a token from a bucket.
        await plans.upsert_plan(conn, "bench-controls", included_units=10**12, overage=Overage.SOFT, rate_limit_rps=1e9)
        plain_org = await orgs.create_org(conn, f"bench-{uuid.uuid4().hex[:6]}", plan="bench-controls")
        _plain, plain_secret = await api_keys.create_key(conn, plain_org.id)
        org = await orgs.create_org(conn, f"bench-{uuid.uuid4().hex[:6]}", plan="bench-controls")
        await orgs.set_max_overage_units(conn, org.id, 10**12)
        _key, controlled_secret = await api_keys.create_key(
            conn,
            org.id,
            max_units_per_period=10**15,
            rate_limit_rps=1e6,
            allowed_cidrs=["10.0.0.0/8", "2001:db8::/32", "127.0.0.0/8"],
            products=["stream"],
        )
    store = GrantStore(database_fetch(pool), ttl=300, negative_ttl=5, stale_for=300, max_entries=1000, fetch_timeout=1)
    meter = Meter(UsageLedger(), MeterStore(pool, replica="bench-controls"))
    key_meter = Meter(UsageLedger(), MeterStore(pool, replica="bench-controls", tables=KEY_TABLES), live=False)
    test_meter = Meter(UsageLedger(), MeterStore(pool, replica="bench-controls", tables=TEST_TABLES), live=False)
    authorizer = assemble_authorizer(
        CheckParts(store, PlanBook(database_load(pool)), meter, test_meter, key_meter=key_meter)
    )
    servicer = AuthorizationServicer(
        authorizer,
        ContextSigner(context_keys.ContextKeys(context_keys.EDDSA, (fixture.signing_key,))),
        caller_secret=b"in process: no gRPC call reaches this servicer",
    )
    requests = {}
    for label, secret in (("no controls", plain_secret), ("every control", controlled_secret)):
        request = external_auth_pb2.CheckRequest.FromString(check_request_bytes(secret, STREAM_DETECT))
        request.attributes.source.address.socket_address.address = "127.0.0.1"
        response = await servicer.answer(request)  # warm the caches; and it must be allowed
        parsed = external_auth_pb2.CheckResponse.FromString(response)
        if not parsed.HasField("ok_response"):
            raise RuntimeError(f"bench controls: the {label} key was refused: {parsed.denied_response.body}")
        requests[label] = request

    # Many short rounds, A B A B ..., each timed in CPU seconds of this process (a shared machine's other
    # load then costs wall time, not the figure); the ratio is the median of the rounds' ratios.
    cpu: dict[str, list[float]] = {label: [] for label in requests}
    for _round in range(rounds * 10):
        for label, request in requests.items():
            headers = request.attributes.request.http.headers
            calls, started = 0, time.process_time()
            deadline = time.perf_counter() + seconds / 10
            while time.perf_counter() < deadline:
                for _ in range(200):
                    headers["x-request-id"] = uuid.uuid4().hex
                    await servicer.answer(request)
                calls += 200
            cpu[label].append((time.process_time() - started) / calls)
        await meter.flush_once()
        await key_meter.flush_once()
    await pool.close()
    ratios = [plain / controlled for plain, controlled in zip(cpu["no controls"], cpu["every control"], strict=True)]
    rows = []
    for label, per_check in cpu.items():
        rows.append(
            ("controls", f"billable check, {label}", f"{statistics.median(per_check) * 1e6:.1f} µs CPU/check", "")
        )
    rows.append(("controls", "throughput, every control / none", f"{statistics.median(ratios):.3f}x", "target ≥ 0.97"))
    return rows
