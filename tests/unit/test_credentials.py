import pytest

from authz_service.check.credentials import read_credential
from authz_service.check.decision import DenyCode
from driftlock_kernel.keys import Environment, generate_key

KEY = generate_key(Environment.LIVE)
OTHER = generate_key(Environment.LIVE)


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {KEY.secret}"},
        {"authorization": f"bearer {KEY.secret}"},
        {"authorization": f"  Bearer   {KEY.secret}  "},
        {"x-api-key": KEY.secret},
        {"authorization": f"Bearer {KEY.secret}", "x-api-key": KEY.secret},
        {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": KEY.secret},
    ],
)
def test_key_is_found_in_either_header(headers):
    parsed = read_credential(headers)
    assert not isinstance(parsed, DenyCode)
    assert parsed.hash == KEY.hash


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer "}, {"x-api-key": ""}, {"authorization": "Basic dXNlcjpwYXNz"}, {"x-api-key": "  "}],
)
def test_no_key_is_missing(headers):
    assert read_credential(headers) is DenyCode.MISSING_API_KEY


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer not-a-key"},
        {"x-api-key": KEY.secret[:-1]},
        {"x-api-key": f"{KEY.secret},{KEY.secret}"},  # a repeated header, as Envoy joins it
        {"authorization": f"Bearer {KEY.secret}", "x-api-key": OTHER.secret},
    ],
)
def test_malformed_or_ambiguous_key_is_invalid(headers):
    assert read_credential(headers) is DenyCode.INVALID_API_KEY
