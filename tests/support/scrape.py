"""Reading a service's /metrics (Prometheus text format) in tests."""

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def scrape_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, f"{url} answered {response.status}"
        return await response.text()


async def sample_sum(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for family in text_string_to_metric_families(await scrape_text(url)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def family_names(text: str) -> set[str]:
    """Every metric family a scrape declares (`# TYPE` lines), including families without samples yet."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
