"""The union of several workers' scrapes, as the parent of `authz --workers N` serves it."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from driftlock_cli.authz_workers import union_of


def worker_scrape(checks: int, pending: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("driftlock_authz_checks_total", "checks", ["decision"], registry=registry)
    counter.labels(decision="allow").inc(checks)
    Gauge("driftlock_meter_pending_units", "pending", registry=registry).set(pending)
    Histogram("driftlock_authz_check_duration_seconds", "time", buckets=(0.001, 1.0), registry=registry).observe(0.01)
    Counter("driftlock_usage_refunded_units_total", "refunds", ["product"], registry=registry)  # no sample yet
    return generate_latest(registry).decode()


def served(texts: list[str]) -> str:
    registry = CollectorRegistry(auto_describe=False)

    class Union:
        def collect(self):
            return union_of(enumerate(texts))

    registry.register(Union())
    return generate_latest(registry).decode()


def test_each_family_once_every_sample_with_its_worker():
    text = served([worker_scrape(3, 1), worker_scrape(5, 2)])
    for family in (
        "driftlock_authz_checks_total",
        "driftlock_meter_pending_units",
        "driftlock_authz_check_duration_seconds",
        "driftlock_usage_refunded_units_total",  # declared, so that rules and tests find it before any refund
    ):
        assert text.count(f"# TYPE {family} ") == 1, family
        assert text.count(f"# HELP {family} ") == 1, family
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert all(s.labels["worker"] in {"0", "1"} for s in samples)
    allowed = {s.labels["worker"]: s.value for s in samples if s.name == "driftlock_authz_checks_total"}
    assert allowed == {"0": 3.0, "1": 5.0}
    buckets = [s for s in samples if s.name == "driftlock_authz_check_duration_seconds_bucket"]
    assert {(s.labels["worker"], s.labels["le"]) for s in buckets} == {
        (w, le) for w in ("0", "1") for le in ("0.001", "1.0", "+Inf")
    }


def test_a_family_of_another_type_is_left_out_rather_than_exported_wrong():
    other = "# HELP driftlock_meter_pending_units pending\n# TYPE driftlock_meter_pending_units counter\n"
    other += "driftlock_meter_pending_units_total 7.0\n"
    text = served([worker_scrape(1, 4), other])
    pending = [
        s for f in text_string_to_metric_families(text) if f.name == "driftlock_meter_pending_units" for s in f.samples
    ]
    assert [(s.labels["worker"], s.value) for s in pending] == [("0", 4.0)]
