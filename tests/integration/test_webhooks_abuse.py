"""The unauthenticated webhook service against clients that pay nothing: slow heads and bodies are cut, and a flood
of bad signatures costs a log line a minute, not one each."""

import asyncio
import contextlib
import logging

import pytest
from aiohttp import web

from billing_webhooks.app import app_runner, create_app
from driftlock_kernel.settings import Settings
from tests.support.net import free_port
from tests.support.stripe import SECRET, Stripe


@pytest.fixture
async def service(database_url):
    settings = Settings(database_url=database_url, stripe_webhook_secrets=(SECRET,))
    runner = app_runner(create_app(settings, body_timeout=0.3), header_timeout=0.3)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def closed_by_the_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent before closing the connection; fails the test if it does not close within `within`."""
    return await asyncio.wait_for(reader.read(), within)


async def test_a_connection_that_never_finishes_its_request_head_is_closed(service):
    reader, writer = await asyncio.open_connection("127.0.0.1", service)
    writer.write(b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # and then nothing
    await writer.drain()
    await closed_by_the_server(reader, within=10)
    writer.close()


async def test_the_shipped_header_timeout_closes_a_head_trickling_in_within_seconds(database_url):
    """The service's own port takes connections from anyone who reaches it: a head sent a byte at a time is cut
    at the shipped header timeout (5 s), however steadily the bytes come (1,000 such connections were held 15 s)."""
    settings = Settings(database_url=database_url, stripe_webhook_secrets=(SECRET,))
    runner = app_runner(create_app(settings))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):  # the server closing is what the test waits for
                for byte in b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        sender = asyncio.ensure_future(trickle())
        try:
            # Closed with bytes of ours unread, the connection may end in a reset rather than an orderly close.
            with contextlib.suppress(ConnectionResetError):
                await closed_by_the_server(reader, within=8)
        finally:
            sender.cancel()
            writer.close()
    finally:
        await runner.cleanup()


async def test_a_body_that_does_not_arrive_in_time_is_a_408(service):
    reader, writer = await asyncio.open_connection("127.0.0.1", service)
    writer.write(
        b'POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=00\r\nContent-Length: 1000\r\n\r\n{"id"'
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"request_timeout"), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")


async def test_a_flood_of_bad_signatures_is_two_log_lines(service, caplog):
    caplog.set_level(logging.INFO, logger="billing_webhooks.inbox.webhook")
    stripe = Stripe(f"http://127.0.0.1:{service}/stripe/webhook")
    for _ in range(300):
        reply = await stripe.deliver(b'{"id": "evt_forged"}', signature="t=1,v1=00")
        assert reply.status == 400
    lines = [r for r in caplog.records if r.name == "billing_webhooks.inbox.webhook" and "refused" in r.getMessage()]
    assert len(lines) == 1  # the first; the other 299 are counted and written as one line when the minute ends
    assert lines[0].getMessage() == "refused a delivery: signature mismatch"
