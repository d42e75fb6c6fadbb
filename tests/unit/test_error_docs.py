"""docs/errors.md lists every code a client can get, with its status: what authz decides (its closed set of
denial codes), what Envoy answers itself (every code in envoy/envoy.yaml), and the contract's table."""

import re
from pathlib import Path

from authz_service.check.decision import HTTP_STATUS

ROOT = Path(__file__).resolve().parents[2]
# The contract's table of what a denied client receives (CONTRACT.md, "What a denied client receives").
CONTRACT = {
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "revoked_api_key": 401,
    "expired_api_key": 401,
    "payment_required": 402,
    "insufficient_scope": 403,
    "org_suspended": 403,
    "ip_not_allowed": 403,
    "product_not_allowed": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "quota_exceeded": 429,
    "rate_limited": 429,
    "spend_cap_reached": 429,
    "key_quota_exceeded": 429,
    "auth_unavailable": 503,
    "service_unavailable": 503,
}


def documented(section: str) -> dict[str, str]:
    """code -> status of the table under a `## ` heading that starts with `section`."""
    text = (ROOT / "docs" / "errors.md").read_text()
    body = text.split("\n## " + section, 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        for code in re.findall(r"`([a-z_]+)`", cells[0]):
            found[code] = cells[1]
    return found


def test_every_code_of_the_contract_is_listed_with_its_status():
    public = documented("The public API")
    assert {code: public.get(code) for code in CONTRACT} == {code: str(status) for code, status in CONTRACT.items()}


def test_every_denial_authz_decides_is_listed_with_its_status():
    public = documented("The public API")
    assert {code.value: public.get(code.value) for code in HTTP_STATUS} == {
        code.value: str(status) for code, status in HTTP_STATUS.items()
    }


def test_every_code_envoy_answers_itself_is_listed():
    config = (ROOT / "envoy" / "envoy.yaml").read_text()
    codes = set(re.findall(r"\bcode: ([a-z_]+)\b", config)) | set(
        re.findall(r"driftlock: \{ code: ([a-z_]+) \}", config)
    )
    assert {"not_found", "service_unavailable", "payload_too_large", "method_not_allowed"} <= codes
    assert codes - set(documented("The public API")) == set()


def test_the_management_api_codes_are_listed():
    management = documented("The management API")
    assert management["operator_only"] == "403" and management["missing_token"] == "401"
    assert {"invalid_token", "wrong_organisation", "not_found", "invalid_argument", "failed_precondition"} <= set(
        management
    )
