"""`events endpoints …`, `events deliveries list` and `events listen`, run as an operator runs them, against the
session's gateway (which delivers events of its database, with private URLs allowed as under dev)."""

import asyncio
import json
import os
import signal
import sys

from tests.support.cli import assert_one_line_error, run_cli
from tests.support.net import eventually, free_port
from tests.support.webhook_receiver import WebhookReceiver

PRIVATE_OK = {"DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS": "true"}


async def test_endpoints_add_list_test_deliveries_remove(gateway, make_org, database_url):
    org = await make_org()
    receiver = await WebhookReceiver("").start()
    try:
        added = run_cli(
            "events", "endpoints", "add", "--org", str(org.id), receiver.url, "--json",
            database_url=database_url, env=PRIVATE_OK,
        ).json()  # fmt: skip
        assert added["secret"].startswith("whsec_") and added["enabled"] is True
        receiver.secret = added["secret"]
        listed = run_cli("events", "endpoints", "list", "--org", str(org.id), "--json", database_url=database_url)
        assert [e["id"] for e in listed.json()["endpoints"]] == [added["id"]]
        assert added["secret"] not in listed.stdout
        tested = run_cli("events", "endpoints", "test", added["id"], "--json", database_url=database_url).json()

        async def delivered() -> bool:
            return bool(receiver.of_type("event_endpoint.test"))

        await eventually(delivered, within=15, what="the test event delivered by the gateway")
        assert receiver.of_type("event_endpoint.test")[0].verified
        assert receiver.of_type("event_endpoint.test")[0].webhook_id == tested["event_id"]

        async def listed_delivered() -> bool:
            found = run_cli(
                "events", "deliveries", "list", "--endpoint", added["id"], "--json", database_url=database_url
            ).json()["deliveries"]
            return [d["state"] for d in found] == ["delivered"]

        await eventually(listed_delivered, within=10, what="the delivery listed as delivered")
        failed = run_cli("events", "deliveries", "list", "--state", "failed", "--json", database_url=database_url)
        assert all(d["state"] == "failed" for d in failed.json()["deliveries"])
        removed = run_cli("events", "endpoints", "remove", added["id"], "--json", database_url=database_url).json()
        assert removed["removed"] is True
    finally:
        await receiver.stop()


async def test_refused_urls_and_bad_arguments_are_one_line_errors(make_org, database_url):
    org = await make_org()
    for url, fragment in (
        ("http://127.0.0.1:9/x", "loopback"),
        ("http://10.0.0.1/x", "private"),
        ("gopher://example.com/", "http"),
    ):
        result = run_cli("events", "endpoints", "add", "--org", str(org.id), url, database_url=database_url,
                         env={"DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS": "false"})  # fmt: skip
        assert_one_line_error(result, fragment)
    metadata = run_cli(
        "events", "endpoints", "add", "--org", str(org.id), "http://169.254.169.254/", database_url=database_url,
        env=PRIVATE_OK,
    )  # fmt: skip
    assert_one_line_error(metadata, "metadata")
    unknown = run_cli("events", "endpoints", "add", "--org", str(org.id), "https://example.com/x", "--types",
                      "key.exploded", database_url=database_url)  # fmt: skip
    assert unknown.code != 0 and "key.exploded" in unknown.stderr and "Traceback" not in unknown.stderr
    listed = run_cli("events", "endpoints", "list", "--org", str(org.id), "--json", database_url=database_url)
    assert listed.json()["endpoints"] == []


async def test_events_listen_prints_each_verified_event(gateway, make_org, database_url):
    org = await make_org()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "driftlock_cli", "events", "listen", "--org", str(org.id), "--port", str(port), "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:

        async def listening() -> bool:
            found = run_cli("events", "endpoints", "list", "--org", str(org.id), "--json", database_url=database_url)
            return len(found.json()["endpoints"]) == 1

        await eventually(listening, within=20, what="the listener's endpoint created")
        assert run_cli("orgs", "suspend", str(org.id), database_url=database_url).code == 0
        assert listener.stdout is not None
        line = await asyncio.wait_for(listener.stdout.readline(), 20)
        event = json.loads(line)
        assert event["type"] == "org.suspended" and event["verified"] is True
        assert event["data"]["org_id"] == str(org.id)
        listener.send_signal(signal.SIGINT)  # Ctrl-C: stops and removes its endpoint
        await asyncio.wait_for(listener.wait(), 20)
        found = run_cli("events", "endpoints", "list", "--org", str(org.id), "--json", database_url=database_url)
        assert found.json()["endpoints"] == []
    finally:
        if listener.returncode is None:
            listener.terminate()
            await listener.wait()
