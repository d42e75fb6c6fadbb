"""The CLI's management commands against a real database: keys show|update|roll, orgs list|set-plan, jwks,
admin-token; each change in the audit log with the operator as the caller."""

import json
import secrets
import time
import uuid

import pytest

from driftlock_kernel import admin_audit, context_keys
from driftlock_kernel.tokens import verify_admin_token
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.http import raw_request


@pytest.fixture
def cli(database_url):
    def run(*args: str, env: dict[str, str] | None = None):
        return run_cli(*args, database_url=database_url, env=env)

    return run


def test_keys_show_update_and_roll(cli):
    org = cli("orgs", "create", "CLI keys", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--name", "first", "--scopes", "detect", "--json").json()
    shown = cli("keys", "show", key["id"], "--json").json()
    assert (shown["name"], shown["scopes"], shown["metadata"], shown["last_used_at"]) == ("first", ["detect"], {}, None)
    assert "key" not in shown

    updated = cli(
        "keys", "update", key["id"], "--name", "renamed", "--scopes", "detect,read", "--expires-in", "1h",
        "--metadata", '{"owner": "ops"}', "--json",
    ).json()  # fmt: skip
    assert (updated["name"], updated["scopes"], updated["metadata"]) == (
        "renamed",
        ["detect", "read"],
        {"owner": "ops"},
    )
    assert updated["expires_at"].endswith("Z")
    assert cli("keys", "update", key["id"], "--no-expiry", "--json").json()["expires_at"] is None

    rolled = cli("keys", "roll", key["id"], "--overlap", "24h", "--json").json()
    assert rolled["old_key_id"] == key["id"] and rolled["id"] != key["id"]
    assert rolled["key"].startswith("dlk_live_") and rolled["key"] != key["key"]
    assert (rolled["name"], rolled["scopes"], rolled["metadata"]) == ("renamed", ["detect", "read"], {"owner": "ops"})
    assert rolled["old_expires_at"].endswith("Z")
    assert cli("keys", "show", key["id"], "--json").json()["rolled_to"] == rolled["id"]
    text = cli("keys", "roll", rolled["id"])
    assert text.code == 0 and "only time" in text.stdout


def test_orgs_list_and_set_plan(cli):
    org = cli("orgs", "create", "CLI plans", "--json").json()
    listed = cli("orgs", "list", "--json").json()["orgs"]
    assert org["id"] in [o["id"] for o in listed]
    changed = cli("orgs", "set-plan", org["id"], "tests-unlimited", "--json").json()
    assert (changed["id"], changed["plan"]) == (org["id"], "tests-unlimited")
    assert cli("orgs", "show", org["id"], "--json").json()["plan"] == "tests-unlimited"


async def test_cli_changes_are_audited_with_the_operator(cli, pool):
    org = cli("orgs", "create", "Audited", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--json").json()
    cli("keys", "roll", key["id"], "--json").json()
    cli("orgs", "suspend", org["id"], "--json").json()
    async with pool.acquire() as conn:
        entries = await admin_audit.actions(conn, org_id=uuid.UUID(org["id"]))
    assert [e.action for e in reversed(entries)] == ["orgs.create", "keys.create", "keys.roll", "orgs.suspend"]
    assert {(e.actor_issuer, e.method, e.code) for e in entries} == {(admin_audit.CLI_ISSUER, "cli", "ok")}
    assert all(e.actor_subject for e in entries)


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (("keys", "roll", "not-a-uuid"), "malformed key id", 2),
        (("keys", "roll", str(uuid.uuid4()), "--overlap", "90d"), "at most 30d", 2),
        (("keys", "roll", str(uuid.uuid4())), "no API key", 1),
        (("keys", "update", str(uuid.uuid4())), "nothing to change", 1),
        (("keys", "update", str(uuid.uuid4()), "--metadata", "[1]"), "JSON object", 2),
        (("keys", "update", str(uuid.uuid4()), "--name", "x"), "no API key", 1),
        (("orgs", "set-plan", str(uuid.uuid4()), "free"), "no organisation", 1),
        (("jwks", "generate-key", "--kid", "bad kid!"), "kid", 2),
        (("admin-token", "--lifetime", "1h"), "at most 5m", 2),
    ],
)
def test_mistakes_are_one_line(cli, args, fragment, code):
    result = cli(*args)
    assert_one_line_error(result, fragment)
    assert result.code == code


def test_a_revoked_key_cannot_be_rolled(cli):
    org = cli("orgs", "create", "Revoked roll", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--json").json()
    cli("keys", "revoke", key["id"], "--json").json()
    assert_one_line_error(cli("keys", "roll", key["id"]), "revoked")


async def test_jwks_prints_what_the_gateway_serves(cli, gateway, context_signing_keys):
    printed = cli("jwks", env={"DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE": str(context_signing_keys[1])})
    assert printed.code == 0, printed.stderr
    served = await raw_request(gateway.management_port, "GET", "/.well-known/jwks.json")
    assert json.loads(printed.stdout) == served.json() == context_signing_keys[0].jwks()
    hs256 = cli(
        "jwks",
        "--json",
        env={"DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM": "HS256", "DRIFTLOCK_JWT_SECRET": secrets.token_urlsafe(32)},
    )
    assert hs256.json() == {"keys": []}
    assert_one_line_error(cli("jwks", env={"DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE": "/nonexistent"}), "cannot read")


def test_a_generated_key_is_one_that_configures_the_gateway(cli):
    made = cli("jwks", "generate-key", "--kid", "k-2027", "--json").json()
    (key,) = context_keys.parse_entries(made["entry"], what="test")
    assert key.kid == made["kid"] == "k-2027" and key.public_jwk() == made["public_jwk"]
    assert made["entry"] not in cli("jwks", "generate-key", "--kid", "k-2027").stdout  # a new key each time
    bare = cli("jwks", "generate-key", "--json").json()
    assert bare["kid"] == context_keys.thumbprint(context_keys.parse_entries(bare["entry"], what="t")[0].public_key)


def test_admin_token_mints_what_the_api_accepts(cli, admin_secret):
    env = {"DRIFTLOCK_ADMIN_TOKEN_SECRET": admin_secret}
    org_id = uuid.uuid4()
    result = cli("admin-token", "--issuer", "dashboard", "--subject", "user-7", "--org", str(org_id), env=env)
    assert result.code == 0 and result.stdout.count("\n") == 1
    caller = verify_admin_token(result.stdout.strip(), admin_secret.encode())
    assert (caller.issuer, caller.subject, caller.org_id) == ("dashboard", "user-7", org_id)
    short = cli("admin-token", "--lifetime", "90s", "--json", env=env).json()
    assert short["expires_in"] == 90 and verify_admin_token(short["token"], admin_secret.encode(), now=time.time())
    assert_one_line_error(cli("admin-token"), "DRIFTLOCK_ADMIN_TOKEN_SECRET")
