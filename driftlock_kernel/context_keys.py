"""The keys behind the `x-driftlock-context` token: Ed25519 signing keys with their `kid` (EdDSA, the default),
or the HS256 secret shared with the backend; the public JWKS; and verification as a backend does it.

Signing keys are configured as `kid:key` entries, where key is the base64url (no padding) of the 32-byte
Ed25519 private key, either in DRIFTLOCK_CONTEXT_SIGNING_KEYS (comma-separated) or in the file named by
DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE (one per line; blank lines and `#` comments are ignored). A bare key, without
`kid:`, gets its RFC 7638 thumbprint as kid. The first entry signs; every entry is published in the JWKS, so a
new key can be published before it signs and an old one kept until its last tokens expire:

    1. DRIFTLOCK_CONTEXT_SIGNING_KEYS=old:...,new:...   published, old signs  (wait one JWKS refetch: 15 s)
    2. DRIFTLOCK_CONTEXT_SIGNING_KEYS=new:...,old:...   new signs             (wait 5 min + leeway)
    3. DRIFTLOCK_CONTEXT_SIGNING_KEYS=new:...
"""

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from driftlock_kernel import tokens
from driftlock_kernel.settings import Settings, SettingsError

EDDSA = "EdDSA"
HS256 = "HS256"
KID = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def thumbprint(public: Ed25519PublicKey) -> str:
    """RFC 7638: SHA-256 of the key's required members in lexicographic order, without whitespace."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": _b64(_public_bytes(public))}, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True)
class Ed25519Key:
    kid: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> "Ed25519Key":
        private = Ed25519PrivateKey.from_private_bytes(secrets.token_bytes(KEY_BYTES))
        return cls(kid or thumbprint(private.public_key()), private)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def entry(self) -> str:
        """The key as configured: `kid:key` (a secret: whoever holds it can mint context tokens)."""
        raw = self.private_key.private_bytes_raw()
        return f"{self.kid}:{_b64(raw)}"

    def public_jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64(_public_bytes(self.public_key)),
            "kid": self.kid,
            "alg": EDDSA,
            "use": "sig",
        }


def parse_entries(text: str, *, what: str) -> tuple[Ed25519Key, ...]:
    """`kid:key` entries separated by commas or lines -> keys, in order; SettingsError naming `what` (never a key)."""
    found: list[Ed25519Key] = []
    entries = [part.strip() for line in text.splitlines() for part in line.split("#", 1)[0].split(",")]
    for number, entry in enumerate((entry for entry in entries if entry), start=1):
        kid, sep, encoded = entry.rpartition(":")
        if sep and not KID.fullmatch(kid):
            raise SettingsError(f"{what}: entry {number} has a kid that is not 1-64 of A-Z a-z 0-9 . _ -")
        try:
            raw_key = _unb64(encoded.strip())
            if len(raw_key) != KEY_BYTES:
                raise ValueError(f"{len(raw_key)} bytes")
            private = Ed25519PrivateKey.from_private_bytes(raw_key)
        except ValueError:
            raise SettingsError(
                f"{what}: entry {number} is not kid:key with key the base64url of a 32-byte Ed25519 private key"
            ) from None
        found.append(Ed25519Key(kid if sep else thumbprint(private.public_key()), private))
    if not found:
        raise SettingsError(f"{what} names no key")
    kids = [key.kid for key in found]
    duplicate = next((kid for kid in kids if kids.count(kid) > 1), None)
    if duplicate is not None:
        raise SettingsError(f"{what}: kid {duplicate!r} appears twice")
    return tuple(found)


@dataclass(frozen=True)
class ContextKeys:
    """What signs context tokens, and what verifies them."""

    algorithm: str  # EDDSA or HS256
    ed25519: tuple[Ed25519Key, ...] = ()  # EdDSA: the first signs, all are published
    hs256_secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.algorithm == EDDSA and not self.ed25519:
            raise ValueError("EdDSA context tokens need at least one Ed25519 key")
        if self.algorithm == HS256 and not self.hs256_secret:
            raise ValueError("HS256 context tokens need a secret")

    @property
    def signing_kid(self) -> str | None:
        return self.ed25519[0].kid if self.algorithm == EDDSA else None

    def signing_key(self) -> Ed25519PrivateKey | bytes:
        if self.algorithm == EDDSA:
            return self.ed25519[0].private_key
        assert self.hs256_secret is not None
        return self.hs256_secret

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public keys, as published at /.well-known/jwks.json (none for HS256: that secret is shared)."""
        return {"keys": [key.public_jwk() for key in self.ed25519] if self.algorithm == EDDSA else []}

    def verify(self, token: str) -> dict:
        """What a backend does with a context token (the demo backend and the tests do the same)."""
        if self.algorithm == HS256:
            assert self.hs256_secret is not None
            return tokens.verify(token, self.hs256_secret, algorithm=HS256)
        return verify_with_jwks(token, self.jwks())


def verify_with_jwks(token: str, jwks: Mapping[str, object]) -> dict:
    """Verify an EdDSA context token with the key its `kid` names in a JWKS document."""
    kid = jwt.get_unverified_header(token).get("kid")
    keys = jwks.get("keys")
    for jwk in keys if isinstance(keys, list) else []:
        if isinstance(jwk, dict) and jwk.get("kid") == kid and jwk.get("kty") == "OKP":
            public = Ed25519PublicKey.from_public_bytes(_unb64(str(jwk["x"])))
            return tokens.verify(token, public, algorithm=EDDSA)
    raise jwt.InvalidKeyError(f"no key with kid {kid!r} in the JWKS")


def load(settings: Settings) -> ContextKeys:
    """The context-token keys the settings name, checked; SettingsError with one line per problem."""
    if settings.context_token_algorithm == HS256:
        return ContextKeys(HS256, hs256_secret=settings.require_jwt_secret())
    settings.optional_jwt_secret()  # a secret that is set must still be a sound one
    inline, path = settings.context_signing_keys, settings.context_signing_keys_file
    if inline and path:
        raise SettingsError("set DRIFTLOCK_CONTEXT_SIGNING_KEYS or DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE, not both")
    if inline:
        return ContextKeys(EDDSA, parse_entries(inline, what="DRIFTLOCK_CONTEXT_SIGNING_KEYS"))
    if path:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise SettingsError(
                f"DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE: cannot read {path}: {error.strerror or error}"
            ) from None
        return ContextKeys(EDDSA, parse_entries(text, what=f"DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE ({path})"))
    raise SettingsError(
        "EdDSA context tokens need a signing key: set DRIFTLOCK_CONTEXT_SIGNING_KEYS or "
        "DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE (`driftlock-gateway jwks generate-key` makes one), or "
        "DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM=HS256"
    )


def write_key_file(path: Path, keys: tuple[Ed25519Key, ...]) -> None:
    """A key file readable by this user only (what `dev` generates)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(
        "# Ed25519 keys that sign x-driftlock-context tokens (kid:key); the first signs, all are published.\n"
        + "".join(f"{key.entry()}\n" for key in keys)
    )
