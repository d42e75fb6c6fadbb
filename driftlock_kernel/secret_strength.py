"""Whether a configured secret can be guessed: refused at start-up, with how to make one that cannot.

A secret that signs tokens or proves who calls must be random. Length alone lets through 32 spaces, 32 times `a`,
`changeme` four times or `whsec_` with nothing after it, so a secret must also pass three cheap tests that any
generated secret passes: it does not repeat a shorter pattern, it is not mostly a run of consecutive
characters (`abcdef…`, `123456…`), and its characters carry enough information: the length times the
entropy of the distribution of its characters, at least `MIN_BITS`. A random secret of 32 hexadecimal
characters scored 91 or more on that (the least of 300,000 drawn), 32 base64 characters 126 or more;
`password` four times scores 88.
This cannot tell a passphrase made of words from a random string; it turns away the secrets that are
obviously not random, which is what placeholders and hand-typed values are.
"""

import itertools
import math
from collections import Counter

MIN_BITS = 90.0
HOW_TO_MAKE_ONE = (
    "generate one with `openssl rand -base64 48` (or `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
)


def estimated_bits(secret: str) -> float:
    """Length times the Shannon entropy of the secret's character distribution, in bits."""
    counts = Counter(secret)
    length = len(secret)
    return -sum(n * math.log2(n / length) for n in counts.values())


def _repeats_a_pattern(secret: str) -> bool:
    length = len(secret)
    for period in range(1, length // 2 + 1):
        if all(secret[i] == secret[i % period] for i in range(length)):
            return True
    return False


def _mostly_a_run(secret: str) -> bool:
    steps = [ord(b) - ord(a) for a, b in itertools.pairwise(secret)]
    return sum(1 for step in steps if step in (1, -1)) > len(steps) / 2


def weakness(secret: str, *, min_bytes: int) -> str | None:
    """Why the secret can be guessed (a phrase for "… is …"), or None when it passes."""
    size = len(secret.encode())
    if size < min_bytes:
        return f"too short ({size} bytes; at least {min_bytes} are needed)"
    if not secret.strip():
        return "only whitespace"
    if _repeats_a_pattern(secret):
        return "a repeated pattern"
    if _mostly_a_run(secret):
        return "mostly a run of consecutive characters"
    bits = estimated_bits(secret)
    if bits < MIN_BITS:
        return f"too uniform (about {bits:.0f} bits of entropy; at least {MIN_BITS:.0f} are needed)"
    return None
