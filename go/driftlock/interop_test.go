package driftlock

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
)

// Tokens made by PyJWT 2.15.1 (what the gateway signs with), for the claims of claimsAt(testNow):
//
//	priv = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
//	jwt.encode(claims, priv, algorithm="EdDSA", headers={"kid": "gw-2024-01"})
//	jwt.encode(claims, b"a-shared-secret-of-at-least-32-bytes!!", algorithm="HS256")
//
// and the JWKS from jwt.algorithms.OKPAlgorithm.to_jwk(priv.public_key()) with kid, alg and use added.
const (
	pyjwtEdDSAToken = "eyJhbGciOiJFZERTQSIsImtpZCI6Imd3LTIwMjQtMDEiLCJ0eXAiOiJKV1QifQ." +
		"eyJpc3MiOiJkcmlmdGxvY2stZ2F0ZXdheSIsImF1ZCI6ImRyaWZ0bG9jay1iYWNrZW5kIiwic3ViIjoiM2YxYzJkNGUtNWE2Yi00" +
		"YzdkLThlOWYtMGExYjJjM2Q0ZTVmIiwia2V5X2lkIjoia2V5XzEyMyIsInBsYW4iOiJwcm8iLCJzY29wZXMiOlsiZGV0ZWN0Iiwi" +
		"cmVhZCJdLCJlbnYiOiJsaXZlIiwiYmlsbGFibGUiOnRydWUsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAwMzAwfQ." +
		"aB9GOXNtgameqepkMCv59oTxwZEbiHB5ImdBhXNiLtEZF71HrN1AgsJqAIlXrqUJHmoAQo5nBz_m-AI039taBg"
	pyjwtJWKS = `{"keys": [{"x": "6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw", "kty": "OKP", "crv": "Ed25519", ` +
		`"kid": "gw-2024-01", "alg": "EdDSA", "use": "sig"}]}`
	pyjwtHS256Token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." +
		"eyJpc3MiOiJkcmlmdGxvY2stZ2F0ZXdheSIsImF1ZCI6ImRyaWZ0bG9jay1iYWNrZW5kIiwic3ViIjoiM2YxYzJkNGUtNWE2Yi00" +
		"YzdkLThlOWYtMGExYjJjM2Q0ZTVmIiwia2V5X2lkIjoia2V5XzEyMyIsInBsYW4iOiJwcm8iLCJzY29wZXMiOlsiZGV0ZWN0Iiwi" +
		"cmVhZCJdLCJlbnYiOiJsaXZlIiwiYmlsbGFibGUiOnRydWUsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAwMzAwfQ." +
		"Y15If5h5bG-CZvnBqsHR2yvpfztWbHhIZcNhOyvNwDc"
)

func TestPyJWTTokens(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(pyjwtJWKS))
	}))
	defer srv.Close()
	clock := newClock()
	eddsa, err := NewJWKSVerifier(srv.URL, WithClock(clock.Now))
	if err != nil {
		t.Fatal(err)
	}
	hs := newHSVerifier(t, clock)
	for _, tc := range []struct {
		name  string
		v     *Verifier
		token string
	}{
		{"EdDSA", eddsa, pyjwtEdDSAToken},
		{"HS256", hs, pyjwtHS256Token},
	} {
		c, err := tc.v.Verify(context.Background(), tc.token)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if c.OrgID != testOrgID || c.KeyID != "key_123" || c.Plan != "pro" || !c.HasScope("detect") ||
			c.Environment != "live" || !c.Billable || !c.IssuedAt.Equal(testNow) {
			t.Fatalf("%s: %+v", tc.name, c)
		}
	}
	// And each is refused by the other mode.
	if _, err := eddsa.Verify(context.Background(), pyjwtHS256Token); err == nil {
		t.Fatal("the EdDSA verifier accepted PyJWT's HS256 token")
	}
	if _, err := hs.Verify(context.Background(), pyjwtEdDSAToken); err == nil {
		t.Fatal("the HS256 verifier accepted PyJWT's EdDSA token")
	}
}
