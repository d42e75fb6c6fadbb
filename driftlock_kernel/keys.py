"""What an API key is: its format (generation, parsing with checksum, the stored hash), its environment and the
scopes it may carry.

A key reads `dlk_<env>_<32 random base62 characters><6 base62 characters of CRC32>`. The random part carries
about 190 bits, so a plain SHA-256 of the whole key is a safe stored form: there is nothing to brute-force, and
unlike a slow password hash it costs a microsecond on the hot path. The checksum lets authz turn away a typo
or a made-up key without a database look-up.
"""

import hashlib
import re
import secrets
import string
import zlib
from dataclasses import dataclass
from enum import StrEnum

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
RANDOM_LENGTH = 32
CHECKSUM_LENGTH = 6
# How much of the key `keys list` may show: the environment prefix and the first characters of the random part.
DISPLAY_RANDOM_CHARS = 6

_KEY = re.compile(rf"dlk_(live|test)_([0-9A-Za-z]{{{RANDOM_LENGTH}}})([0-9A-Za-z]{{{CHECKSUM_LENGTH}}})")
# Anything that looks like a key, well-formed or not (a typo of a real key is still most of a secret): the
# prefix, also percent-encoded or in another letter case, and the base62 characters after it (and any
# percent-escapes among them).
_KEY_LIKE = re.compile(r"dlk(?:_|%5f)(live|test)(?:_|%5f)[0-9a-z%]*", re.IGNORECASE)
REDACTED = "[redacted]"


class Environment(StrEnum):
    LIVE = "live"
    TEST = "test"


class Scope(StrEnum):
    """What a key may call; each route of Envoy's route table names the scope it needs."""

    DETECT = "detect"
    INGEST = "ingest"
    READ = "read"


ALL_SCOPES = tuple(Scope)


def parse_scopes(text: str) -> tuple[Scope, ...]:
    """`detect,read` -> the scopes, in order, without repeats; ValueError with a message fit for a user."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("at least one scope is needed: " + ", ".join(ALL_SCOPES))
    unknown = [name for name in names if name not in ALL_SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}: choose from " + ", ".join(ALL_SCOPES))
    return tuple(dict.fromkeys(Scope(name) for name in names))


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str
    environment: Environment
    display_prefix: str
    hash: bytes


@dataclass(frozen=True, slots=True)
class ParsedKey:
    environment: Environment
    hash: bytes


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(ALPHABET[remainder])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def hash_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def generate_key(environment: Environment) -> NewKey:
    body = f"dlk_{environment.value}_" + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LENGTH))
    secret = body + _checksum(body)
    return NewKey(
        secret=secret,
        environment=environment,
        display_prefix=display_prefix(secret),
        hash=hash_key(secret),
    )


def display_prefix(secret: str) -> str:
    return secret[: len("dlk_live_") + DISPLAY_RANDOM_CHARS]


def parse_key(candidate: str) -> ParsedKey | None:
    """Return the key's environment and hash, or None when it is not a well-formed key with a valid checksum."""
    match = _KEY.fullmatch(candidate)
    if match is None:
        return None
    body_length = len(candidate) - CHECKSUM_LENGTH
    if not secrets.compare_digest(_checksum(candidate[:body_length]), match.group(3)):
        return None
    return ParsedKey(environment=Environment(match.group(1)), hash=hash_key(candidate))


def redact_keys(text: str) -> str:
    """`text` with everything of the key format replaced by its environment prefix and `[redacted]`, so that a
    key a client put in a path, a query or a header value never reaches a log line or a stored row."""
    if "dlk" not in text.lower():
        return text
    return _KEY_LIKE.sub(lambda m: f"dlk_{m.group(1).lower()}_{REDACTED}", text)
