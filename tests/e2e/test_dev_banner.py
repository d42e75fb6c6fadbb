"""`dev` as a newcomer meets it: started in a clean environment (embedded PostgreSQL, the local Stripe API), every
line its banner prints is pasted alone into a new terminal in the same folder and works as printed, the played
Stripe events and the local Stripe API agree so that `stripe sync` repairs a lost webhook, and each start gives
the demo organisation a clean billing state and one live key."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from driftlock_cli.supervisor import free_port

BANNER_TIMEOUT_SECONDS = 120
PASTE_TIMEOUT_SECONDS = 90
STACK_NOTE = "driftlock-gateway: using the dev stack running in"


def new_terminal() -> dict[str, str]:
    """What a new terminal has: no setting of the gateway's, no virtual environment."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


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


@dataclass
class Dev:
    process: asyncio.subprocess.Process
    banner: str

    @property
    def org_id(self) -> str:
        return self._found(r"Demo organisation ([0-9a-f-]{36})")

    @property
    def key(self) -> str:
        return self._found(r"\b(dlk_live_[0-9A-Za-z]{38})\b")

    def _found(self, pattern: str) -> str:
        match = re.search(pattern, self.banner)
        assert match is not None, f"{pattern!r} not in the banner:\n{self.banner}"
        return match.group(1)

    def commands(self) -> list[str]:
        """Every line of the banner that is a command to paste, in order."""
        found = []
        for line in self.banner.splitlines():
            if line.startswith("  ") and re.match(r"(curl|export|\S*driftlock-gateway) ", line.strip()):
                found.append(line.strip())
        return found

    def try_it(self) -> str:
        return next(line for line in self.commands() if line.startswith("curl") and self.key in line)

    async def stop(self) -> str:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = await asyncio.wait_for(self.process.communicate(), 60)
        text = rest.decode(errors="replace")
        assert self.process.returncode == 0, self.banner + text
        return text


async def start_dev(folder: Path, ports: dict[str, str], *args: str) -> Dev:
    """`driftlock-gateway dev` started in `folder` from a new terminal (its state in folder/.driftlock)."""
    # A file, not a pipe, for the services' logs: nobody reads them while the test runs, and a full pipe would
    # block dev. Its tail explains a start that failed.
    stderr_path = folder / f"dev-{len(list(folder.glob('dev-*.log')))}.log"
    with stderr_path.open("wb") as stderr:  # the child has its own copy of the file
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "driftlock_cli",
            "dev",
            *args,
            cwd=folder,
            env=new_terminal() | ports | {"PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    seen: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + BANNER_TIMEOUT_SECONDS
    try:
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), max(0.1, deadline - time.monotonic()))
            if not line:
                await process.wait()
                errors = stderr_path.read_text(errors="replace").splitlines()[-30:]
                raise AssertionError(
                    f"dev exited ({process.returncode}) before it was ready:\n"
                    + "".join(seen[-40:])
                    + "\nits stderr ended with:\n"
                    + "\n".join(errors)
                )
            seen.append(line.decode(errors="replace"))
            if seen[-1].startswith("Ctrl-C stops everything"):
                return Dev(process, "".join(seen))
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise


@pytest.fixture
async def devs() -> AsyncIterator[list[Dev]]:
    started: list[Dev] = []
    yield started
    for dev in started:
        if dev.process.returncode is None:
            dev.process.send_signal(signal.SIGINT)
            await asyncio.wait_for(dev.process.communicate(), 60)


def paste(line: str, folder: Path) -> subprocess.CompletedProcess:
    """The line pasted alone into a new terminal in `folder`."""
    return subprocess.run(
        ["bash", "-c", line],
        cwd=folder,
        env=new_terminal(),
        capture_output=True,
        text=True,
        timeout=PASTE_TIMEOUT_SECONDS,
    )


async def paste_until_interrupted(line: str, folder: Path, *, ready: str) -> None:
    """A line that runs until Ctrl-C, pasted alone into a new terminal in `folder`: it must say `ready` on stderr
    (having found the stack by itself), and end with exit 0 on SIGINT."""
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {line}", cwd=folder, env=new_terminal(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    said = ""
    try:
        while ready not in said:
            got = await asyncio.wait_for(process.stderr.readline(), PASTE_TIMEOUT_SECONDS)
            assert got, f"{line}\nended before it was ready:\n{said}"
            said += got.decode(errors="replace")
        assert STACK_NOTE in said, said
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), PASTE_TIMEOUT_SECONDS)
    assert process.returncode == 0, f"{line}\nexit {process.returncode}\n{said}"


def answer(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("dev_args", [(), ("--tls",)], ids=["http", "tls"])
async def test_every_line_of_the_banner_works_pasted_alone_in_a_new_terminal(tmp_path, devs, dev_args):
    dev = await start_dev(tmp_path, dev_ports(), *dev_args)
    devs.append(dev)
    commands = dev.commands()
    if dev_args:
        # HTTPS with a local CA's certificate, which every printed line that reaches the edge trusts by name.
        assert "public API (Envoy)  https://127.0.0.1:" in dev.banner
        assert "--cacert " in dev.try_it()
        assert all("--url https://" in line for line in commands if " send-event " in line and "--skip" not in line)
    # What the README promises a newcomer: a call, the management API, the usage at Stripe, Stripe's dunning loop
    # and the repair from Stripe's API.
    assert any(line.startswith("curl") and dev.key in line for line in commands), dev.banner
    assert any(" admin-token)" in line for line in commands), dev.banner
    assert any(" stripe sync --org " in line for line in commands), dev.banner
    for line in commands:
        if " events listen " in line:
            # It listens until Ctrl-C: pasted, it says where it listens, and Ctrl-C ends it cleanly.
            await paste_until_interrupted(line, tmp_path, ready="Listening on ")
            continue
        done = paste(line, tmp_path)
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        if line.startswith("curl"):
            reply = json.loads(done.stdout)
            assert "error" not in reply, (line, reply)
        elif "driftlock-gateway " in line and not line.startswith("export"):
            # The CLI found the stack by itself, and said so on stderr.
            assert STACK_NOTE in done.stderr, done.stderr
        if " invoice.payment_failed " in line:
            # Eight days past due is past the grace days: the printed curl now answers 402.
            reply = json.loads(paste(dev.try_it(), tmp_path).stdout)
            assert reply.get("error", {}).get("code") == "payment_required", reply
        if " stripe sync " in line:
            assert "changed stored state" in done.stdout and " 0 changed" not in done.stdout, done.stdout
    # After the repair from Stripe's API, the demo serves again.
    reply = json.loads(paste(dev.try_it(), tmp_path).stdout)
    assert "error" not in reply and reply["headers"]["x-driftlock-billable"] == "true", reply
    shown = answer(paste(f"{sys.executable} -m driftlock_cli orgs show {dev.org_id} --json", tmp_path))
    assert shown["billing_status"] == "active" and shown["past_due_since"] is None, shown

    stopped = await dev.stop()
    assert "Stopped." in stopped
    # The stack is gone, and so is what told the CLI about it.
    assert not (tmp_path / ".driftlock" / "stack.json").exists()
    done = paste(f"{sys.executable} -m driftlock_cli stripe exports list --org {dev.org_id}", tmp_path)
    assert done.returncode != 0 and STACK_NOTE not in done.stderr


async def test_each_start_resets_the_demo_billing_and_keeps_one_key_and_reset_starts_clean(tmp_path, devs):
    ports = dev_ports()
    first = await start_dev(tmp_path, ports)
    devs.append(first)
    cli = f"{sys.executable} -m driftlock_cli"
    canceled = paste(f"{cli} stripe send-event customer.subscription.deleted --org {first.org_id}", tmp_path)
    assert canceled.returncode == 0, canceled.stderr
    shown = answer(paste(f"{cli} orgs show {first.org_id} --json", tmp_path))
    assert (shown["plan"], shown["billing_status"]) == ("free", "canceled")
    await first.stop()

    second = await start_dev(tmp_path, ports)
    devs.append(second)
    assert second.org_id == first.org_id
    assert "(plan dev-metered, billing none; 1 earlier demo key(s) revoked)" in second.banner, second.banner
    shown = answer(paste(f"{cli} orgs show {second.org_id} --json", tmp_path))
    assert (shown["plan"], shown["billing_status"], shown["stripe_subscription_id"]) == ("dev-metered", "none", None)
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{ports['DRIFTLOCK_ENVOY_PORT']}/api/v1/stream/detect"
        async with session.get(url, headers={"Authorization": f"Bearer {second.key}"}) as response:
            assert response.status == 200, await response.text()
        async with session.get(url, headers={"Authorization": f"Bearer {first.key}"}) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "revoked_api_key"
    keys = answer(paste(f"{cli} keys list --org {second.org_id} --json", tmp_path))["keys"]
    assert [k["revoked_at"] is None for k in keys].count(True) == 1, keys
    # `dev --reset` refuses while the stack runs: it would pull the database from under it.
    refused = paste(f"{cli} dev --reset", tmp_path)
    assert refused.returncode != 0 and "is running" in refused.stderr and "Traceback" not in refused.stderr
    await second.stop()

    clean = await start_dev(tmp_path, ports, "--reset")
    devs.append(clean)
    assert "Reset " in clean.banner and "pgdata" in clean.banner
    assert clean.org_id != first.org_id
    assert "(plan dev-metered, billing none)" in clean.banner, clean.banner
    keys = answer(paste(f"{cli} keys list --org {clean.org_id} --json", tmp_path))["keys"]
    assert len(keys) == 1
    await clean.stop()
