"""The one place an `Authorizer` is assembled: from its parts and the settings that tune it.

authz's composition root (server.py), the workers, the tests and the benchmarks all build the pipeline here, so
what production runs and what they measure or test is put together the same way; they differ only in the parts
they hand in (a grant store over a fake fetch, meters over an in-memory store) and the settings they pass.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from authz_service import metrics
from authz_service.check.audit import AuditLog
from authz_service.check.authorizer import Authorizer, SpendCapReached
from authz_service.check.grants import Fetch, GrantStore, database_fetch
from authz_service.check.key_index import KeyIndex
from authz_service.check.key_last_used import LastUsedRecorder
from authz_service.check.lookup_budget import LookupBudget
from authz_service.check.plan_book import PlanBook, database_load
from authz_service.check.rate_limit import RateLimiter, SharedLimits
from authz_service.usage import spill_dirs
from authz_service.usage.alerts import AlertNotifier
from authz_service.usage.meter_store import KEY_TABLES, TEST_TABLES, MeterStore
from authz_service.usage.metering import Meter
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel import edge_timeouts
from driftlock_kernel.settings import Settings

DEFAULT_SETTINGS = Settings()


@dataclass
class CheckParts:
    """What a check reads (grants, plans) and counts with (the live meter, the test keys' meter), and the optional
    parts around it."""

    store: GrantStore
    plans: PlanBook
    meter: Meter
    test_meter: Meter
    limiter: RateLimiter = field(default_factory=RateLimiter)
    shared_limits: SharedLimits | None = None
    audit: AuditLog | None = None
    last_used: LastUsedRecorder | None = None
    # Usage per key, for keys with a cap of their own (max_units_per_period); never billed.
    key_meter: Meter | None = None
    # Told once per organisation and period when this replica first refuses a call for the spend cap.
    on_spend_cap_reached: SpendCapReached | None = None


def assemble_authorizer(
    parts: CheckParts, settings: Settings = DEFAULT_SETTINGS, *, clock: Callable[[], float] = time.time
) -> Authorizer:
    return Authorizer(
        parts.store,
        parts.plans,
        parts.meter,
        test_meter=parts.test_meter,
        limiter=parts.limiter,
        shared_limits=parts.shared_limits,
        audit=parts.audit,
        policy=settings.billing_policy(),
        clock=clock,
        last_used=parts.last_used,
        exact_margin_units=settings.quota_exact_margin_units,
        reserve_timeout=settings.database_lookup_timeout_seconds,
        key_meter=parts.key_meter,
        on_spend_cap_reached=parts.on_spend_cap_reached,
    )


def grant_store(fetch: Fetch, settings: Settings = DEFAULT_SETTINGS, index: KeyIndex | None = None) -> GrantStore:
    """The key cache over `fetch`, sized and timed by the settings; with `index` (every key's hash prefix), a
    key that is not in it is refused from memory rather than rationed."""
    return GrantStore(
        fetch,
        index=index,
        ttl=settings.key_cache_ttl_seconds,
        negative_ttl=settings.key_cache_negative_ttl_seconds,
        stale_for=settings.key_cache_stale_seconds,
        max_entries=settings.key_cache_max_entries,
        max_unknown_entries=settings.key_cache_unknown_max_entries,
        budget=LookupBudget(
            overall=settings.unknown_key_lookups_per_second,
            per_source=settings.unknown_key_lookups_per_source_per_second,
        ),
        fetch_timeout=settings.database_lookup_timeout_seconds,
        on_result=metrics.CHECK_STATS.cache_event,
    )


def database_parts(
    pool: asyncpg.Pool,
    settings: Settings = DEFAULT_SETTINGS,
    *,
    replica: str,
    spill_dir: Path | None = None,
    notifier: AlertNotifier | None = None,
    index: KeyIndex | None = None,
) -> CheckParts:
    """The parts as production has them over a database: grants and plans read from it, usage counted into it
    (test keys' usage in tables of its own, never billed)."""
    store = grant_store(database_fetch(pool, timeout=settings.database_lookup_timeout_seconds), settings, index)
    meter = Meter(
        UsageLedger(stale_after=settings.usage_refresh_seconds),
        MeterStore(pool, replica=replica, rollups=settings.usage_rollups),  # with the usage history
        flush_interval=settings.meter_flush_interval_seconds,
        load_timeout=settings.database_lookup_timeout_seconds,
        org_labels=settings.org_id_metric_labels,
        notifier=notifier,
        spill_dir=spill_dir,
        # Alerts and refusals at a cap wait as long as a refund may take.
        refund_window=edge_timeouts.refund_window(settings),
    )
    test_meter = Meter(
        UsageLedger(stale_after=settings.usage_refresh_seconds),
        MeterStore(pool, replica=replica, tables=TEST_TABLES),
        flush_interval=settings.meter_flush_interval_seconds,
        load_timeout=settings.database_lookup_timeout_seconds,
        spill_dir=spill_dir / spill_dirs.TEST_SUBDIR if spill_dir is not None else None,
        live=False,
    )
    key_meter = Meter(
        UsageLedger(stale_after=settings.usage_refresh_seconds),
        MeterStore(pool, replica=replica, tables=KEY_TABLES),
        flush_interval=settings.meter_flush_interval_seconds,
        load_timeout=settings.database_lookup_timeout_seconds,
        spill_dir=spill_dir / spill_dirs.KEYS_SUBDIR if spill_dir is not None else None,
        live=False,
    )
    return CheckParts(store, PlanBook(database_load(pool)), meter, test_meter, key_meter=key_meter)
