"""The JWTs of the contract: the `x-driftlock-context` token the backend receives (issued by authz), and the
service token the backend presents to authz's usage API.
"""

import time

import jwt

ISSUER = "driftlock-gateway"
AUDIENCE = "driftlock-backend"
MAX_LIFETIME_SECONDS = 300


def verify(token: str, secret: bytes) -> dict:
    """What the backend does with the token (the demo backend and the tests do the same)."""
    return jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"require": ["iss", "aud", "sub", "iat", "exp"]},
    )


# The backend calls authz's usage API with a token of its own: same secret, the roles reversed.
SERVICE_ISSUER = "driftlock-backend"
SERVICE_AUDIENCE = "driftlock-gateway"


def mint_service_token(secret: bytes, *, lifetime_seconds: int = MAX_LIFETIME_SECONDS) -> str:
    """What the backend sends as `authorization: Bearer ...` to the usage API (the tests and the CLI mint one too)."""
    now = int(time.time())
    claims = {"iss": SERVICE_ISSUER, "aud": SERVICE_AUDIENCE, "iat": now, "exp": now + lifetime_seconds}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_service_token(token: str, secret: bytes) -> dict:
    claims = jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience=SERVICE_AUDIENCE,
        issuer=SERVICE_ISSUER,
        options={"require": ["iss", "aud", "iat", "exp"]},
    )
    if claims["exp"] - claims["iat"] > MAX_LIFETIME_SECONDS:
        raise jwt.InvalidTokenError("token lifetime above 5 minutes")
    return claims
