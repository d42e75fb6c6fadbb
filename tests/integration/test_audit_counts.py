"""Denials that name no known key are counted per minute, source and code; denials of a known key are counted per
minute, key and code, the first of each kept whole in audit_log."""

import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta

from authz_service.check.audit import AuditEntry, AuditLog


def denial(source: str, code: str = "invalid_api_key", *, key_id: str | None = None) -> AuditEntry:
    return AuditEntry(
        datetime.now(UTC),
        f"req-{uuid.uuid4()}",
        str(uuid.uuid4()) if key_id else None,
        key_id,
        "POST",
        "/api/v1/stream/detect",
        "deny",
        code,
        source,
    )


def an_address() -> str:
    return f"198.51.{random.randrange(256)}.{random.randrange(1, 255)}"


async def test_ten_thousand_denials_of_unknown_keys_from_one_address_are_a_row_per_minute(pool):
    source = an_address()
    audit = AuditLog(pool)
    for _ in range(10_000):
        audit.add(denial(source))
    for _ in range(50):
        audit.add(denial(source, "missing_api_key"))
    assert await audit.write_counts()
    rows = await pool.fetch("SELECT code, count FROM driftlock.audit_denials WHERE source = $1", source)
    by_code: dict[str, list[int]] = {}
    for row in rows:
        by_code.setdefault(row["code"], []).append(row["count"])
    assert sum(by_code["invalid_api_key"]) == 10_000 and len(by_code["invalid_api_key"]) <= 2  # a minute's edge
    assert sum(by_code["missing_api_key"]) == 50
    assert await pool.fetchval("SELECT count(*) FROM driftlock.audit_log WHERE source = $1", source) == 0
    print(f"\n10,050 denials naming no key: {len(rows)} audit rows")


async def test_replicas_add_their_counts_to_the_same_row(pool):
    source = an_address()
    first, second = AuditLog(pool), AuditLog(pool)
    for audit in (first, second, first):
        for _ in range(7):
            audit.add(denial(source))
        assert await audit.write_counts()
    counts = await pool.fetch("SELECT count FROM driftlock.audit_denials WHERE source = $1", source)
    assert sum(row["count"] for row in counts) == 21


async def test_the_first_denial_of_a_known_key_per_minute_and_code_is_a_row_the_rest_are_counted(pool):
    source, key_id = an_address(), str(uuid.uuid4())
    audit = AuditLog(pool)
    minute = datetime.now(UTC).replace(second=1, microsecond=0)  # one minute for all, whenever the test runs
    codes = ["revoked_api_key"] + ["rate_limited"] * 5_000 + ["quota_exceeded"] * 3
    for n, code in enumerate(codes):
        entry = denial(f"198.51.100.{n % 100}" if n else source, code, key_id=key_id)
        audit.add(dataclasses.replace(entry, at=minute))
    assert await audit.write_once() and await audit.write_counts()
    rows = await pool.fetch("SELECT code, source FROM driftlock.audit_log WHERE key_id = $1 ORDER BY id", key_id)
    assert [(r["code"], r["source"]) for r in rows] == [
        ("revoked_api_key", source),
        ("rate_limited", "198.51.100.1"),
        ("quota_exceeded", "198.51.100.1"),  # n = 5,001
    ]
    counted = await pool.fetch(
        "SELECT code, count, source, org_id FROM driftlock.audit_denials WHERE key_id = $1 ORDER BY code", key_id
    )
    assert [(r["code"], r["count"], r["source"]) for r in counted] == [
        ("quota_exceeded", 2, "*"),
        ("rate_limited", 4_999, "*"),
    ]
    assert all(r["org_id"] is not None for r in counted)
    # The next minute keeps its first denial whole again.
    audit.add(dataclasses.replace(denial(source, "rate_limited", key_id=key_id), at=minute + timedelta(minutes=1)))
    assert await audit.write_once()
    assert await pool.fetchval("SELECT count(*) FROM driftlock.audit_log WHERE key_id = $1", key_id) == 4


async def test_two_keys_refused_in_the_same_minute_are_counted_apart_and_unknown_keys_beside_them(pool):
    first, second, source = str(uuid.uuid4()), str(uuid.uuid4()), an_address()
    audit = AuditLog(pool)
    minute = datetime.now(UTC).replace(second=1, microsecond=0)
    for key_id in (first, second, None):
        for _ in range(3):
            audit.add(dataclasses.replace(denial(source, "rate_limited", key_id=key_id), at=minute))
    assert await audit.write_counts()
    rows = await pool.fetch(
        """SELECT key_id::text, count FROM driftlock.audit_denials
           WHERE minute = $1 AND (key_id = ANY($2::uuid[]) OR source = $3)""",
        minute.replace(second=0),
        [first, second],
        source,
    )
    assert sorted((r["key_id"] or "", r["count"]) for r in rows) == sorted([(first, 2), (second, 2), ("", 3)])


async def test_denials_through_the_edge_are_counted_for_the_clients_address(gateway, pool):
    """authz's own denial of an unknown (well-formed, valid-checksum) key, through Envoy, lands in the counts."""
    from driftlock_kernel.keys import Environment, generate_key
    from tests.support.http import raw_request
    from tests.support.net import eventually

    before = await pool.fetchval(
        "SELECT coalesce(sum(count), 0) FROM driftlock.audit_denials WHERE source = '127.0.0.1' AND code = $1",
        "invalid_api_key",
    )
    for _ in range(3):
        key = generate_key(Environment.LIVE).secret
        response = await raw_request(gateway.port, "POST", "/api/v1/stream/detect", {"X-API-Key": key}, b"{}")
        assert response.status == 401

    async def counted() -> bool:
        total = await pool.fetchval(
            "SELECT coalesce(sum(count), 0) FROM driftlock.audit_denials WHERE source = '127.0.0.1' AND code = $1",
            "invalid_api_key",
        )
        return total - before == 3

    await eventually(counted, within=10, what="the denials counted in audit_denials", interval=0.2)
