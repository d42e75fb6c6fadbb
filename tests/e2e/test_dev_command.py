"""The README's first command, `driftlock-gateway dev`, as a new user runs it: the stack comes up, the printed curl
line is served, the printed exports make the CLI (and `doctor`) work against it, and Ctrl-C stops everything."""

import asyncio
import json
import os
import re
import shlex
import signal
import sys
import time

import aiohttp
import pytest

from driftlock_cli.supervisor import free_port
from tests.support.cli import run_cli

BANNER_TIMEOUT_SECONDS = 120


async def read_banner(process: asyncio.subprocess.Process, seen: list[str]) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + BANNER_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        if not line:
            raise AssertionError("dev exited before it was ready:\n" + "".join(seen[-40:]))
        seen.append(line.decode(errors="replace"))
        if "Ctrl-C stops everything." in seen[-1]:
            return
    raise AssertionError("dev printed no banner in time:\n" + "".join(seen[-40:]))


def found_in(banner: str, pattern: str) -> re.Match[str]:
    match = re.search(pattern, banner)
    assert match is not None, f"{pattern!r} not in the banner:\n{banner}"
    return match


def exports_of(banner: str) -> dict[str, str]:
    """The `export NAME=VALUE` lines the banner prints, evaluated as a shell would."""
    found = {}
    for line in banner.splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        for word in shlex.split(line.removeprefix("export ")):
            name, _, value = word.partition("=")
            cat = re.fullmatch(r"\$\(cat (.+)\)", value)
            found[name] = open(cat.group(1)).read().strip() if cat else value
    return found


@pytest.fixture
def dev_ports() -> dict[str, str]:
    return {
        "DRIFTLOCK_ENVOY_PORT": str(free_port()),
        "DRIFTLOCK_ENVOY_ADMIN_PORT": str(free_port()),
        "DRIFTLOCK_ENVOY_STATS_PORT": str(free_port()),
        "DRIFTLOCK_ADMIN_PORT": str(free_port()),
        "DRIFTLOCK_AUTHZ_PORT": str(free_port()),
        "DRIFTLOCK_AUTHZ_METRICS_PORT": str(free_port()),
        "DRIFTLOCK_WEBHOOKS_PORT": str(free_port()),
        "DRIFTLOCK_BACKEND": f"127.0.0.1:{free_port()}",
    }


@pytest.fixture
async def dev_database_url(databases) -> str:
    """A database of its own: dev migrates it and puts a metered plan in it that other tests must not see."""
    if not await databases.can_create():
        pytest.skip("the server named by DATABASE_URL does not let this user create databases")
    return await databases.create("driftlock_dev")


async def test_dev_serves_the_printed_curl_and_stops_everything_on_ctrl_c(dev_database_url, dev_ports, tmp_path):
    database_url = dev_database_url
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DRIFTLOCK_", "STRIPE_")) and k not in ("DATABASE_URL", "DATABASE_LISTEN_URL")
    }
    environ |= dev_ports | {"DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "driftlock_cli",
        "dev",
        "--state-dir",
        str(tmp_path / "state"),
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    seen: list[str] = []
    try:
        await read_banner(process, seen)
        banner = "".join(seen)
        key = found_in(banner, r"\b(dlk_live_[0-9A-Za-z]{38})\b").group(1)
        curl = re.search(r"curl -H 'Authorization: Bearer (\S+)' (http://\S+)", banner)
        assert curl is not None and curl.group(1) == key
        assert curl.group(2).startswith(f"http://127.0.0.1:{dev_ports['DRIFTLOCK_ENVOY_PORT']}/")
        async with aiohttp.ClientSession() as session:
            async with session.get(curl.group(2), headers={"Authorization": f"Bearer {key}"}) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["headers"]["x-driftlock-billable"] == "true"

        # dev never prints a DATABASE_URL of the operator's own (it may hold a password): it is the one dev had.
        assert "export DATABASE_URL" not in banner
        cli_env = environ | exports_of(banner)
        org_id = found_in(banner, r"Demo organisation ([0-9a-f-]{36})").group(1)
        # The CLI as the operator runs it beside dev: with what dev printed, not this test session's settings.
        shown = run_cli(
            "orgs", "show", org_id, "--json", database_url=cli_env["DATABASE_URL"], env=cli_env, inherit=False
        )
        assert shown.json()["id"] == org_id
        doctor = run_cli(
            "doctor", "--json", database_url=cli_env["DATABASE_URL"], env=cli_env, timeout=120, inherit=False
        )
        failed = [check for check in json.loads(doctor.stdout)["checks"] if not check["ok"]]
        assert failed == [] and doctor.code == 0, failed
        # The events of the demo organisation, watched the way the banner says (dev allows a local endpoint).
        listen = re.search(r"(\S+) events listen --org ([0-9a-f-]{36})", banner)
        assert listen is not None and listen.group(2) == org_id, banner
        await watch_events_as_printed(cli_env, org_id)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, "".join(seen) + rest.decode(errors="replace")
    assert "Stopped." in rest.decode(errors="replace")
    # Every child went with it: nothing answers on the stack's ports any more.
    for name in ("DRIFTLOCK_ENVOY_PORT", "DRIFTLOCK_AUTHZ_PORT", "DRIFTLOCK_WEBHOOKS_PORT"):
        with pytest.raises(OSError):
            _reader, writer = await asyncio.open_connection("127.0.0.1", int(dev_ports[name]))
            writer.close()


async def watch_events_as_printed(cli_env: dict[str, str], org_id: str) -> None:
    port = free_port()
    listener = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "driftlock_cli", "events", "listen", "--org", org_id, "--port", str(port), "--json",
        env=cli_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # the endpoint exists once the listener has printed where it listens
            found = run_cli(
                "events", "endpoints", "list", "--org", org_id, "--json",
                database_url=cli_env["DATABASE_URL"], env=cli_env, inherit=False,
            )  # fmt: skip
            if found.json()["endpoints"]:
                break
            assert time.monotonic() < deadline, "events listen created no endpoint"
            await asyncio.sleep(0.2)
        suspended = run_cli("orgs", "suspend", org_id, database_url=cli_env["DATABASE_URL"], env=cli_env, inherit=False)
        assert suspended.code == 0, suspended.stderr
        assert listener.stdout is not None
        event = json.loads(await asyncio.wait_for(listener.stdout.readline(), 30))
        assert (event["type"], event["verified"], event["data"]["org_id"]) == ("org.suspended", True, org_id)
        run_cli("orgs", "resume", org_id, database_url=cli_env["DATABASE_URL"], env=cli_env, inherit=False)
    finally:
        listener.send_signal(signal.SIGINT)
        await asyncio.wait_for(listener.wait(), 30)
