"""Calling the management API and UsageService as their callers do: an admin token signed with the session's
DRIFTLOCK_ADMIN_TOKEN_SECRET, over gRPC (metadata) or JSON through Envoy's management listener."""

import json
import uuid
from dataclasses import dataclass

from driftlock_kernel.tokens import mint_admin_token
from tests.support.http import RawResponse, raw_request


def admin_token(secret: str, *, issuer: str = "tests", subject: str | None = "tester", org_id=None, **kwargs) -> str:
    return mint_admin_token(secret.encode(), issuer=issuer, subject=subject, org_id=org_id, **kwargs)


def admin_metadata(secret: str, **claims) -> list[tuple[str, str]]:
    """gRPC metadata carrying an admin token (for UsageService and the management services)."""
    return [("authorization", f"Bearer {admin_token(secret, **claims)}")]


@dataclass
class JsonApi:
    """The JSON management API on Envoy's management listener."""

    port: int
    secret: str

    async def call(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        token: str | None = None,
        org_id: uuid.UUID | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> RawResponse:
        """`token` given: sent as is ("" sends none); else a fresh admin token (restricted to `org_id`, if given)."""
        bearer = admin_token(self.secret, org_id=org_id) if token is None else token
        sent = {"Content-Type": "application/json", **(headers or {})}
        if bearer:
            sent["Authorization"] = f"Bearer {bearer}"
        payload = b"" if body is None else json.dumps(body).encode()
        return await raw_request(self.port, method, path, sent, payload)


def signing_key_env() -> dict[str, str]:
    """The environment an authz process started by hand needs for its context tokens: one fresh Ed25519 key."""
    from driftlock_kernel.context_keys import Ed25519Key

    return {"DRIFTLOCK_CONTEXT_SIGNING_KEYS": Ed25519Key.generate().entry()}
