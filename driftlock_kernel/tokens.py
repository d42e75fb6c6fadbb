"""The JWTs of the contract: the `x-driftlock-context` token the backend receives (issued by authz, see
context_keys.py for its keys), and the admin token that callers of the management API and UsageService present.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

ISSUER = "driftlock-gateway"
AUDIENCE = "driftlock-backend"
MAX_LIFETIME_SECONDS = 300


def verify(token: str, key: Any, *, algorithm: str = "HS256") -> dict:
    """What the backend does with a context token: exactly one algorithm, the contract's issuer and audience."""
    return jwt.decode(
        token,
        key,
        algorithms=[algorithm],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"require": ["iss", "aud", "sub", "iat", "exp"]},
    )


# --- the admin token ------------------------------------------------------------------------------------------
# HS256 with DRIFTLOCK_ADMIN_TOKEN_SECRET. `iss` names the caller (the dashboard's server, the Go backend, an
# operator), `sub` who it acts for, if anyone; `org_id` restricts it to one organisation.

ADMIN_AUDIENCE = "driftlock-gateway"
# A token minted on another host may be a little ahead or behind.
ADMIN_LEEWAY_SECONDS = 30
MAX_ISSUER_LENGTH = 200


class InvalidAdminToken(Exception):
    """Why a token was refused, in words fit for the caller (never the token)."""


@dataclass(frozen=True, slots=True)
class AdminCaller:
    issuer: str
    subject: str | None
    org_id: uuid.UUID | None  # None: every organisation

    def may_touch(self, org_id: uuid.UUID) -> bool:
        return self.org_id is None or self.org_id == org_id


def mint_admin_token(
    secret: bytes,
    *,
    issuer: str,
    subject: str | None = None,
    org_id: uuid.UUID | str | None = None,
    lifetime_seconds: int = MAX_LIFETIME_SECONDS,
    now: float | None = None,
) -> str:
    """A token for the management API and UsageService (what the dashboard's server and the backend mint)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": issuer, "aud": ADMIN_AUDIENCE, "iat": issued, "exp": issued + lifetime_seconds}
    if subject is not None:
        claims["sub"] = subject
    if org_id is not None:
        claims["org_id"] = str(org_id)
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_admin_token(token: str, secret: bytes, *, now: float | None = None) -> AdminCaller:
    moment = time.time() if now is None else now
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            audience=ADMIN_AUDIENCE,
            # Times are checked below against `moment`, so that the one clock decides.
            options={"require": ["iss", "aud", "exp"], "verify_iat": False, "verify_exp": False, "verify_nbf": False},
        )
    except jwt.exceptions.InvalidSubjectError:
        raise InvalidAdminToken(f"the token's sub must be a string of at most {MAX_ISSUER_LENGTH} characters") from None
    except jwt.InvalidAudienceError:
        raise InvalidAdminToken(f"the token's aud must be {ADMIN_AUDIENCE!r}") from None
    except jwt.MissingRequiredClaimError as error:
        raise InvalidAdminToken(f"the token has no {error.claim!r} claim") from None
    except jwt.InvalidSignatureError:
        raise InvalidAdminToken("the token's signature does not verify with DRIFTLOCK_ADMIN_TOKEN_SECRET") from None
    except jwt.PyJWTError as error:
        raise InvalidAdminToken(f"the token is not valid: {error}") from None
    issuer, subject = claims["iss"], claims.get("sub")
    if not isinstance(issuer, str) or not 0 < len(issuer) <= MAX_ISSUER_LENGTH:
        raise InvalidAdminToken(f"the token's iss must name the caller (1 to {MAX_ISSUER_LENGTH} characters)")
    exp = claims["exp"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise InvalidAdminToken("the token's exp must be a number (seconds since 1970)")
    if exp <= moment - ADMIN_LEEWAY_SECONDS:
        raise InvalidAdminToken("the token has expired")
    if exp > moment + MAX_LIFETIME_SECONDS + ADMIN_LEEWAY_SECONDS:
        raise InvalidAdminToken("the token's exp is more than 5 minutes ahead")
    iat = claims.get("iat")
    if iat is not None and (not isinstance(iat, int | float) or iat > moment + ADMIN_LEEWAY_SECONDS):
        raise InvalidAdminToken("the token's iat is in the future")
    if subject is not None and (not isinstance(subject, str) or len(subject) > MAX_ISSUER_LENGTH):
        raise InvalidAdminToken(f"the token's sub must be a string of at most {MAX_ISSUER_LENGTH} characters")
    # Only a token with no org_id claim at all is an operator's: `"org_id": null` (what `{"org_id":
    # user.org_id}` mints for a user without an organisation), "" or a list must never widen a token.
    scope = None
    if "org_id" in claims:
        org_id = claims["org_id"]
        try:
            scope = uuid.UUID(org_id) if isinstance(org_id, str) else None
        except ValueError:
            scope = None
        if scope is None:
            raise InvalidAdminToken("the token's org_id must be an organisation id (a UUID string)")
    return AdminCaller(issuer, subject, scope)
