"""The `x-driftlock-context` token's contract with the backend: an HS256 JWT with these issuer and audience."""

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
