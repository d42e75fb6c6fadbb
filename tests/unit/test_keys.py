import hashlib

import pytest

from driftlock_kernel.keys import CHECKSUM_LENGTH, Environment, display_prefix, generate_key, parse_key


@pytest.mark.parametrize("environment", list(Environment))
def test_generated_key_has_the_documented_shape(environment):
    new = generate_key(environment)
    assert new.secret.startswith(f"dlk_{environment.value}_")
    assert len(new.secret) == len("dlk_live_") + 32 + CHECKSUM_LENGTH
    assert new.secret[len("dlk_live_") :].isalnum()
    assert new.hash == hashlib.sha256(new.secret.encode()).digest()
    assert new.display_prefix == new.secret[: len("dlk_live_") + 6]


def test_generated_keys_are_distinct():
    assert len({generate_key(Environment.LIVE).secret for _ in range(1000)}) == 1000


@pytest.mark.parametrize("environment", list(Environment))
def test_parse_accepts_a_generated_key(environment):
    new = generate_key(environment)
    parsed = parse_key(new.secret)
    assert parsed is not None
    assert parsed.environment is environment
    assert parsed.hash == new.hash


def test_parse_rejects_every_single_character_change():
    secret = generate_key(Environment.LIVE).secret
    start = len("dlk_live_")
    for position in range(start, len(secret)):
        replacement = "A" if secret[position] != "A" else "B"
        tampered = secret[:position] + replacement + secret[position + 1 :]
        assert parse_key(tampered) is None, f"change at {position} went unnoticed"


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "dlk_live_",
        "dlk_prod_" + "a" * 38,
        "DLK_LIVE_" + "a" * 38,
        "dlk_live_" + "a" * 37,
        "dlk_live_" + "a" * 39,
        "dlk_live_" + "a" * 31 + "-" + "a" * 6,
        "sk_live_whatever",
    ],
)
def test_parse_rejects_malformed_candidates(candidate):
    assert parse_key(candidate) is None


def test_environment_is_covered_by_the_checksum():
    live = generate_key(Environment.LIVE).secret
    assert parse_key(live.replace("dlk_live_", "dlk_test_", 1)) is None


def test_display_prefix_reveals_only_six_random_characters():
    secret = generate_key(Environment.TEST).secret
    assert display_prefix(secret) == secret[:15]
