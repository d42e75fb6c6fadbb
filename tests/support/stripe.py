"""Playing Stripe against a running webhook service: signed deliveries over real HTTP, and the service itself
run in this process on a free port (real aiohttp server, its own database pool)."""

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from billing_webhooks.app import create_app
from driftlock_cli import stripe_player
from driftlock_kernel.settings import Settings

SECRET = "whsec_" + secrets.token_urlsafe(32)
# The secret being rotated out: Stripe signs with both while both are live.
OLD_SECRET = "whsec_" + secrets.token_urlsafe(32)
UNKNOWN_SECRET = "whsec_" + secrets.token_urlsafe(32)


@dataclass
class Reply:
    status: int
    body: Any

    @property
    def outcome(self) -> str | None:
        return self.body.get("outcome") if isinstance(self.body, dict) else None


class Stripe:
    """Sends events to one webhook URL the way Stripe does."""

    def __init__(self, url: str, secret: str = SECRET):
        self.url = url
        self.secret = secret

    async def deliver(
        self,
        event: dict | bytes,
        *,
        secret: str | None = None,
        timestamp: int | None = None,
        signature: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        body = event if isinstance(event, bytes) else stripe_player.encode(event)
        sent = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        if signature is None:
            signature = stripe_player.sign(body, secret or self.secret, timestamp)
        if signature:
            sent["Stripe-Signature"] = signature
        sent.update(headers or {})
        async with aiohttp.ClientSession() as session, session.post(self.url, data=body, headers=sent) as response:
            text = await response.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return Reply(response.status, parsed)

    async def send(self, event_type: str, **options) -> tuple[dict, Reply]:
        """Build an event with stripe_player.build_event and deliver it; return both."""
        event = stripe_player.build_event(event_type, **options)
        return event, await self.deliver(event)


class InProcessWebhooks:
    """create_app() served by aiohttp on 127.0.0.1:port, as `driftlock-gateway webhooks` would serve it."""

    def __init__(self, database_url: str, secrets_: tuple[str, ...] = (SECRET, OLD_SECRET)):
        # Behind a transaction pooler exactly when the services the tests start are (DRIFTLOCK_DB_TRANSACTION_POOLER).
        pooler = Settings.from_env().database_transaction_pooler
        self.settings = Settings(
            database_url=database_url, stripe_webhook_secrets=secrets_, database_transaction_pooler=pooler
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int) -> "InProcessWebhooks":
        self._runner = web.AppRunner(create_app(self.settings), access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = port
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/stripe/webhook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def metric(base_url: str, name: str, **labels: str) -> float:
    """The current value of one sample on the service's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    _status, text = await get(f"{base_url}/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def now() -> int:
    return int(time.time())
