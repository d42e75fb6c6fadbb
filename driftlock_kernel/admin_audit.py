"""Management actions in the audit log: who (the admin token's `iss` and `sub`, or the operator at the CLI), what
(`keys.roll`, `orgs.suspend`, ...), on which organisation and key, with what outcome and detail.

A change is recorded in the transaction that makes it, so no change goes unrecorded and no record describes a
change that was rolled back.
"""

import os
import pwd
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from driftlock_kernel import db

CLI_ISSUER = "driftlock-gateway-cli"


@dataclass(frozen=True, slots=True)
class Actor:
    issuer: str
    subject: str | None = None


def cli_actor() -> Actor:
    """The operator running the CLI: the local user name (from the password database, not the environment)."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return Actor(CLI_ISSUER, user)


async def record(
    conn: db.Connection,
    actor: Actor,
    action: str,
    *,
    org_id: uuid.UUID | None = None,
    key_id: uuid.UUID | None = None,
    code: str = "ok",
    request_id: str | None = None,
    via: str = "cli",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One audit entry; `via` is the transport ("grpc" or "cli"), `code` "ok" or why the action was refused."""
    await conn.execute(
        """INSERT INTO driftlock.audit_log
               (at, request_id, org_id, key_id, method, path, decision, code,
                actor_issuer, actor_subject, action, detail)
           VALUES (now(), $1, $2, $3, $4, NULL, $5, $6, $7, $8, $9, $10)""",
        request_id,
        org_id,
        key_id,
        via,
        "allow" if code == "ok" else "deny",
        code,
        actor.issuer,
        actor.subject,
        action,
        dict(detail) if detail else None,
    )


@dataclass(frozen=True, slots=True)
class ActionEntry:
    """A management entry as read back (tests, and whoever inspects the log)."""

    at: Any
    request_id: str | None
    org_id: uuid.UUID | None
    key_id: uuid.UUID | None
    method: str | None
    decision: str
    code: str
    actor_issuer: str | None
    actor_subject: str | None
    action: str | None
    detail: dict | None


async def actions(conn: db.Connection, *, org_id: uuid.UUID | None = None, limit: int = 100) -> list[ActionEntry]:
    """The latest management entries, newest first (of one organisation, if given)."""
    rows = await conn.fetch(
        """SELECT at, request_id, org_id, key_id, method, decision, code, actor_issuer, actor_subject, action, detail
           FROM driftlock.audit_log
           WHERE action IS NOT NULL AND ($1::uuid IS NULL OR org_id = $1)
           ORDER BY at DESC, id DESC LIMIT $2""",
        org_id,
        limit,
    )
    return [db.from_row(ActionEntry, row) for row in rows]
