"""A Standard Webhooks receiver for tests: verifies every POST with its own implementation of the scheme (not the
product's signer), and answers from a script (then 200)."""

import asyncio
import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from aiohttp import web

from tests.support.net import free_port


def verify_standard_webhook(secret: str, headers: dict[str, str], body: bytes, *, tolerance: int = 300) -> bool:
    """standardwebhooks.com, written from the specification: the key is the base64 after `whsec_`; the signed
    content is "<webhook-id>.<webhook-timestamp>.<body>"; any `v1,<base64>` entry of the space-separated header
    may match; the timestamp must be within `tolerance` seconds."""
    msg_id, stamp, signature = (headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signature):
        return False
    if abs(time.time() - int(stamp)) > tolerance:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    expected = hmac.new(key, msg_id.encode() + b"." + stamp.encode() + b"." + body, hashlib.sha256).digest()
    for entry in signature.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return True
    return False


@dataclass
class Delivered:
    webhook_id: str
    body: dict
    verified: bool
    answered: str


class WebhookReceiver:
    """Answers are taken in order: an int status, "timeout" (sleeps `slow_seconds`), or "redirect"; then 200."""

    def __init__(self, secret: str, answers: list[int | str] | None = None, *, slow_seconds: float = 3.0):
        self.secret = secret
        self.answers = list(answers or [])
        self.slow_seconds = slow_seconds
        self.received: list[Delivered] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = self.answers.pop(0) if self.answers else 200
        self.received.append(
            Delivered(
                headers.get("webhook-id", ""),
                json.loads(body),
                verify_standard_webhook(self.secret, headers, body),
                str(answer),
            )
        )
        if answer == "timeout":
            await asyncio.sleep(self.slow_seconds)
            return web.Response(status=200)
        if answer == "redirect":
            return web.Response(status=307, headers={"location": f"http://127.0.0.1:{self.port}/elsewhere"})
        return web.Response(status=int(answer), text="x" * 100_000 if int(answer) >= 400 else "ok")

    async def start(self, port: int | None = None) -> "WebhookReceiver":
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        app.router.add_post("/elsewhere", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = port or self.port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def acknowledged(self) -> list[Delivered]:
        return [d for d in self.received if d.answered == "200"]

    def of_type(self, event_type: str) -> list[Delivered]:
        return [d for d in self.acknowledged() if d.body["type"] == event_type]
