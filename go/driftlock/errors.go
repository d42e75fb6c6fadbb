package driftlock

import "errors"

// The reasons a token is refused. Every error that Verify returns wraps exactly one of them, so callers can
// tell the reasons apart with errors.Is; the middleware answers all of them alike (401 invalid_context_token)
// and never tells the client which one it was.
var (
	// ErrMalformed: not three base64url segments, a header that is not a JSON object, an oversized token.
	ErrMalformed = errors.New("malformed token")
	// ErrAlgorithm: the header's alg is not the one this Verifier is configured for (including "none").
	ErrAlgorithm = errors.New("token algorithm not accepted")
	// ErrUnknownKey: an EdDSA token without a kid, or with a kid that the JWKS does not publish.
	ErrUnknownKey = errors.New("token signing key unknown")
	// ErrKeysUnavailable: no JWKS has been fetched yet, and fetching one failed or is rate-limited.
	ErrKeysUnavailable = errors.New("signing keys unavailable")
	// ErrSignature: the signature does not match the header and payload.
	ErrSignature = errors.New("token signature invalid")
	// ErrClaims: a required claim is missing or of the wrong type or value, or the payload is not a JSON object.
	ErrClaims = errors.New("token claims invalid")
	// ErrIssuer: iss is not "driftlock-gateway".
	ErrIssuer = errors.New("token issuer not accepted")
	// ErrAudience: aud is not, and does not contain, "driftlock-backend".
	ErrAudience = errors.New("token audience not accepted")
	// ErrExpired: exp has passed by more than the leeway.
	ErrExpired = errors.New("token expired")
	// ErrNotYetValid: iat (or nbf, when present) is in the future by more than the leeway.
	ErrNotYetValid = errors.New("token not yet valid")
	// ErrLifetime: exp - iat is above MaxLifetime plus the leeway.
	ErrLifetime = errors.New("token lifetime too long")
)
