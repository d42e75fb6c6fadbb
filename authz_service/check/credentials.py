"""Finding the API key in a request's headers. Pure: headers in, a parsed key or the reason there is none."""

from collections.abc import Mapping

from authz_service.check.decision import DenyCode
from driftlock_kernel.keys import ParsedKey, parse_key


def read_credential(headers: Mapping[str, str]) -> ParsedKey | DenyCode:
    """The parsed key from `Authorization: Bearer <key>` or `X-API-Key: <key>`, or why there is none.

    Envoy hands header names lower-cased and joins a repeated header's values with commas, which no
    well-formed key contains, so a repeated header fails the format check. An Authorization header of another
    scheme is not ours and is ignored. Two different keys in one request are refused rather than guessed between.
    """
    bearer = None
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            bearer = value.strip()
    api_key = (headers.get("x-api-key") or "").strip()
    if not bearer and not api_key:
        return DenyCode.MISSING_API_KEY
    if bearer and api_key and bearer != api_key:
        return DenyCode.INVALID_API_KEY
    parsed = parse_key(bearer or api_key)
    return DenyCode.INVALID_API_KEY if parsed is None else parsed
