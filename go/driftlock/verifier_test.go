package driftlock

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

type tokenCase struct {
	name  string
	token func(t *testing.T) string
	want  error // nil: accepted
}

func runTokenCases(t *testing.T, v *Verifier, cases []tokenCase) {
	t.Helper()
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			c, err := v.Verify(context.Background(), tc.token(t))
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if c.OrgID != testOrgID {
					t.Fatalf("OrgID = %q", c.OrgID)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("error = %v, want %v", err, tc.want)
			}
			if !reflect.DeepEqual(c, Context{}) {
				t.Fatalf("a refused token returned a Context: %+v", c)
			}
		})
	}
}

// segments splits a token for tampering.
func segments(t *testing.T, token string) []string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d segments", len(parts))
	}
	return parts
}

func raw(s string) json.RawMessage { return json.RawMessage(s) }

func TestVerifyEdDSA(t *testing.T) {
	k1, k2 := newTestKey("k1", 1), newTestKey("k2", 2)
	stranger := newTestKey("k1", 9) // claims k1's kid, signs with another key
	srv := newJWKSServer(t, k1, k2)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	now := clock.Now()
	good := claimsAt(now)
	sec := func(d int64) int64 { return now.Unix() + d }
	signed := func(changes map[string]any) func(t *testing.T) string {
		return func(t *testing.T) string { return k1.sign(t, with(good, changes)) }
	}
	header := func(h map[string]any) func(t *testing.T) string {
		return func(t *testing.T) string {
			return signRaw(mustJSON(t, h), mustJSON(t, good), ed25519Signer(k1.priv))
		}
	}
	rawToken := func(s string) func(t *testing.T) string { return func(*testing.T) string { return s } }

	cases := []tokenCase{
		{"valid", signed(nil), nil},
		{"valid with the second published key", func(t *testing.T) string { return k2.sign(t, good) }, nil},
		{"valid with aud an array", signed(map[string]any{"aud": []string{"other", Audience}}), nil},
		{"valid with fractional dates", signed(map[string]any{"iat": float64(sec(0)) + 0.25,
			"exp": float64(sec(300)) + 0.25}), nil},
		{"valid with nbf passed", signed(map[string]any{"nbf": sec(0)}), nil},
		{"valid without typ", header(map[string]any{"alg": "EdDSA", "kid": "k1"}), nil},

		// Times, with the default 30 s leeway.
		{"expired", signed(map[string]any{"iat": sec(-400), "exp": sec(-100)}), ErrExpired},
		{"expired at exactly the leeway", signed(map[string]any{"iat": sec(-330), "exp": sec(-30)}), ErrExpired},
		{"expired but within leeway", signed(map[string]any{"iat": sec(-310), "exp": sec(-10)}), nil},
		{"iat far in the future", signed(map[string]any{"iat": sec(3600), "exp": sec(3900)}), ErrNotYetValid},
		{"iat in the future within leeway", signed(map[string]any{"iat": sec(20), "exp": sec(320)}), nil},
		{"nbf in the future", signed(map[string]any{"nbf": sec(120)}), ErrNotYetValid},
		{"lifetime over 5 minutes", signed(map[string]any{"iat": sec(0), "exp": sec(400)}), ErrLifetime},
		{"lifetime 5 minutes plus leeway", signed(map[string]any{"iat": sec(0), "exp": sec(330)}), nil},
		{"lifetime 1 s over 5 minutes plus leeway", signed(map[string]any{"iat": sec(0), "exp": sec(331)}),
			ErrLifetime},
		{"exp equal to iat", signed(map[string]any{"iat": sec(0), "exp": sec(0)}), ErrClaims},
		{"exp before iat", signed(map[string]any{"iat": sec(0), "exp": sec(-10)}), ErrClaims},

		// Issuer and audience.
		{"wrong audience", signed(map[string]any{"aud": "driftlock-gateway"}), ErrAudience},
		{"audience array without ours", signed(map[string]any{"aud": []string{"a", "b"}}), ErrAudience},
		{"empty audience array", signed(map[string]any{"aud": []string{}}), ErrAudience},
		{"wrong issuer", signed(map[string]any{"iss": "someone-else"}), ErrIssuer},
		{"issuer in another case", signed(map[string]any{"iss": "DriftLock-Gateway"}), ErrIssuer},

		// Tampering.
		{"tampered payload", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			p[1] = enc.EncodeToString(mustJSON(t, with(good, map[string]any{"sub": "another-org"})))
			return strings.Join(p, ".")
		}, ErrSignature},
		{"tampered signature", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			sig, _ := enc.DecodeString(p[2])
			sig[10] ^= 0x01
			p[2] = enc.EncodeToString(sig)
			return strings.Join(p, ".")
		}, ErrSignature},
		{"signature cut short", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			sig, _ := enc.DecodeString(p[2])
			p[2] = enc.EncodeToString(sig[:63])
			return strings.Join(p, ".")
		}, ErrSignature},
		{"empty signature", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			return p[0] + "." + p[1] + "."
		}, ErrSignature},
		{"kid swapped to the other published key", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			p[0] = enc.EncodeToString(mustJSON(t, map[string]any{"alg": "EdDSA", "typ": "JWT", "kid": "k2"}))
			return strings.Join(p, ".")
		}, ErrSignature},
		{"known kid, another key", func(t *testing.T) string { return stranger.sign(t, good) }, ErrSignature},

		// Algorithms: the Verifier's mode decides, never the token.
		{"HS256 token", func(t *testing.T) string { return signHS256(t, testSecret, good) }, ErrAlgorithm},
		{"HS256 signed with the raw public key as secret", func(t *testing.T) string {
			return signHS256(t, k1.pub, good)
		}, ErrAlgorithm},
		{"HS256 signed with the JWK's x as secret", func(t *testing.T) string {
			return signHS256(t, []byte(enc.EncodeToString(k1.pub)), good)
		}, ErrAlgorithm},
		{"HS256 with kid, signed with the JWK as secret", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": "k1"})
			return signRaw(h, mustJSON(t, good), hs256Signer(mustJSON(t, k1.jwk())))
		}, ErrAlgorithm},
		{"alg none, no signature", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "none", "typ": "JWT"})
			return signRaw(h, mustJSON(t, good), func([]byte) []byte { return nil })
		}, ErrAlgorithm},
		{"alg none with kid and a real signature", header(map[string]any{"alg": "none", "kid": "k1"}),
			ErrAlgorithm},
		{"alg NONE", header(map[string]any{"alg": "NONE", "kid": "k1"}), ErrAlgorithm},
		{"alg in lower case", header(map[string]any{"alg": "eddsa", "kid": "k1"}), ErrAlgorithm},
		{"alg Ed25519", header(map[string]any{"alg": "Ed25519", "kid": "k1"}), ErrAlgorithm},
		{"alg ES256", header(map[string]any{"alg": "ES256", "kid": "k1"}), ErrAlgorithm},
		{"alg empty", header(map[string]any{"alg": "", "kid": "k1"}), ErrAlgorithm},
		{"alg missing", header(map[string]any{"typ": "JWT", "kid": "k1"}), ErrAlgorithm},
		{"alg not a string", header(map[string]any{"alg": 1, "kid": "k1"}), ErrMalformed},

		// Keys.
		{"unknown kid", func(t *testing.T) string { return signEdDSA(t, k1.priv, "nope", good) }, ErrUnknownKey},
		{"no kid", header(map[string]any{"alg": "EdDSA", "typ": "JWT"}), ErrUnknownKey},
		{"kid not a string", header(map[string]any{"alg": "EdDSA", "kid": 1}), ErrMalformed},

		// Malformed tokens.
		{"empty", rawToken(""), ErrMalformed},
		{"one segment", rawToken("abc"), ErrMalformed},
		{"two segments", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			return p[0] + "." + p[1]
		}, ErrMalformed},
		{"four segments", func(t *testing.T) string { return k1.sign(t, good) + ".e30" }, ErrMalformed},
		{"only dots", rawToken(".."), ErrMalformed},
		{"header not base64url", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			return "!!" + p[0] + "." + p[1] + "." + p[2]
		}, ErrMalformed},
		{"payload not base64url", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			return p[0] + ".*" + p[1] + "." + p[2]
		}, ErrMalformed},
		{"signature not base64url", func(t *testing.T) string {
			p := segments(t, k1.sign(t, good))
			return p[0] + "." + p[1] + "." + p[2] + "+/"
		}, ErrMalformed},
		{"padded base64", func(t *testing.T) string {
			h := base64.URLEncoding.EncodeToString([]byte(`{"alg":"EdDSA","kid":"k1"}`))
			if !strings.HasSuffix(h, "=") {
				t.Fatalf("header %q has no padding", h)
			}
			input := h + "." + enc.EncodeToString(mustJSON(t, good))
			return input + "." + enc.EncodeToString(ed25519Signer(k1.priv)([]byte(input)))
		}, ErrMalformed},
		{"header not JSON", func(t *testing.T) string {
			return signRaw([]byte(`{"alg":"EdDSA",`), mustJSON(t, good), ed25519Signer(k1.priv))
		}, ErrMalformed},
		{"header a JSON array", func(t *testing.T) string {
			return signRaw([]byte(`["EdDSA"]`), mustJSON(t, good), ed25519Signer(k1.priv))
		}, ErrMalformed},
		{"header null", func(t *testing.T) string {
			return signRaw([]byte(`null`), mustJSON(t, good), ed25519Signer(k1.priv))
		}, ErrMalformed},
		{"header with trailing data", func(t *testing.T) string {
			return signRaw([]byte(`{"alg":"EdDSA","kid":"k1"}{}`), mustJSON(t, good), ed25519Signer(k1.priv))
		}, ErrMalformed},
		{"typ not JWT", header(map[string]any{"alg": "EdDSA", "typ": "JOSE+JSON", "kid": "k1"}), ErrMalformed},
		{"crit header", header(map[string]any{"alg": "EdDSA", "kid": "k1", "crit": []string{"exp"}}),
			ErrMalformed},
		{"oversized", func(t *testing.T) string {
			return k1.sign(t, with(good, map[string]any{"pad": strings.Repeat("x", maxTokenBytes)}))
		}, ErrMalformed},
		{"payload not JSON (signed)", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "EdDSA", "kid": "k1"})
			return signRaw(h, []byte(`{"sub":`), ed25519Signer(k1.priv))
		}, ErrClaims},
		{"payload a JSON array (signed)", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "EdDSA", "kid": "k1"})
			return signRaw(h, []byte(`[1,2]`), ed25519Signer(k1.priv))
		}, ErrClaims},
		{"payload null (signed)", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "EdDSA", "kid": "k1"})
			return signRaw(h, []byte(`null`), ed25519Signer(k1.priv))
		}, ErrClaims},
	}

	// Required claims: each one missing, and of the wrong type or value.
	for _, name := range []string{"iss", "aud", "sub", "key_id", "plan", "scopes", "env", "billable", "iat",
		"exp"} {
		cases = append(cases,
			tokenCase{"missing " + name, signed(map[string]any{name: nil}), ErrClaims},
			tokenCase{name + " null", signed(map[string]any{name: raw("null")}), ErrClaims},
			tokenCase{name + " an object", signed(map[string]any{name: map[string]any{"v": 1}}), ErrClaims},
		)
	}
	wrong := []struct {
		name  string
		value any
	}{
		{"iss", 5}, {"aud", 5}, {"aud", []any{5}}, {"aud", []any{Audience, nil}}, {"sub", 123}, {"sub", ""},
		{"sub", []string{testOrgID}}, {"key_id", false}, {"key_id", ""}, {"plan", 1}, {"plan", ""},
		{"scopes", "detect"}, {"scopes", []any{1}}, {"scopes", []any{"detect", nil}}, {"scopes", []string{""}},
		{"env", "prod"}, {"env", "LIVE"}, {"env", 1}, {"billable", "true"}, {"billable", 1},
		{"iat", "1700000000"}, {"exp", "never"}, {"exp", true}, {"iat", -5}, {"exp", 1e300}, {"nbf", "soon"},
	}
	for _, w := range wrong {
		cases = append(cases, tokenCase{
			name:  w.name + " = " + string(mustJSON(t, w.value)),
			token: signed(map[string]any{w.name: w.value}),
			want:  ErrClaims,
		})
	}

	runTokenCases(t, v, cases)
}

func TestVerifyReturnsTheClaims(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	claims := with(claimsAt(clock.Now()), map[string]any{"env": "test", "billable": false,
		"scopes": []string{"read"}, "plan": "free", "key_id": "key_9"})
	c, err := v.Verify(context.Background(), k1.sign(t, claims))
	if err != nil {
		t.Fatal(err)
	}
	want := Context{
		OrgID:       testOrgID,
		KeyID:       "key_9",
		Plan:        "free",
		Scopes:      []string{"read"},
		Environment: "test",
		Billable:    false,
		IssuedAt:    testNow,
		ExpiresAt:   testNow.Add(300 * time.Second),
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got %+v\nwant %+v", c, want)
	}
	if !c.HasScope("read") || c.HasScope("detect") || c.HasScope("") {
		t.Fatalf("HasScope is wrong for %v", c.Scopes)
	}
	empty, err := v.Verify(context.Background(), k1.sign(t, with(claims, map[string]any{"scopes": []string{}})))
	if err != nil {
		t.Fatal(err)
	}
	if empty.Scopes == nil || len(empty.Scopes) != 0 || empty.HasScope("read") {
		t.Fatalf("scopes [] became %#v", empty.Scopes)
	}
}

func TestVerifyHS256(t *testing.T) {
	k1 := newTestKey("k1", 1)
	clock := newClock()
	v := newHSVerifier(t, clock)
	now := clock.Now()
	good := claimsAt(now)
	hs := func(changes map[string]any) func(t *testing.T) string {
		return func(t *testing.T) string { return signHS256(t, testSecret, with(good, changes)) }
	}
	cases := []tokenCase{
		{"valid", hs(nil), nil},
		{"valid with a kid in the header", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": "anything"})
			return signRaw(h, mustJSON(t, good), hs256Signer(testSecret))
		}, nil},
		{"wrong secret", func(t *testing.T) string {
			return signHS256(t, []byte("another-secret-of-at-least-32-bytes!!!"), good)
		}, ErrSignature},
		{"tampered payload", func(t *testing.T) string {
			p := segments(t, signHS256(t, testSecret, good))
			p[1] = enc.EncodeToString(mustJSON(t, with(good, map[string]any{"plan": "enterprise"})))
			return strings.Join(p, ".")
		}, ErrSignature},
		{"truncated MAC", func(t *testing.T) string {
			p := segments(t, signHS256(t, testSecret, good))
			mac, _ := enc.DecodeString(p[2])
			p[2] = enc.EncodeToString(mac[:16])
			return strings.Join(p, ".")
		}, ErrSignature},
		{"EdDSA token", func(t *testing.T) string { return k1.sign(t, good) }, ErrAlgorithm},
		{"alg none", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "none", "typ": "JWT"})
			return signRaw(h, mustJSON(t, good), func([]byte) []byte { return nil })
		}, ErrAlgorithm},
		{"alg HS512 header, HS256 MAC", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "HS512", "typ": "JWT"})
			return signRaw(h, mustJSON(t, good), hs256Signer(testSecret))
		}, ErrAlgorithm},
		{"alg hs256", func(t *testing.T) string {
			h := mustJSON(t, map[string]any{"alg": "hs256", "typ": "JWT"})
			return signRaw(h, mustJSON(t, good), hs256Signer(testSecret))
		}, ErrAlgorithm},
		{"expired", hs(map[string]any{"iat": now.Unix() - 400, "exp": now.Unix() - 100}), ErrExpired},
		{"wrong audience", hs(map[string]any{"aud": "driftlock-gateway"}), ErrAudience},
		{"missing sub", hs(map[string]any{"sub": nil}), ErrClaims},
	}
	runTokenCases(t, v, cases)
}

func TestLeewayOption(t *testing.T) {
	clock := newClock()
	now := clock.Now().Unix()
	token := signHS256(t, testSecret, with(claimsAt(clock.Now()), map[string]any{"iat": now - 305,
		"exp": now - 5}))
	strict := newHSVerifier(t, clock, WithLeeway(0))
	if _, err := strict.Verify(context.Background(), token); !errors.Is(err, ErrExpired) {
		t.Fatalf("leeway 0: %v, want ErrExpired", err)
	}
	loose := newHSVerifier(t, clock, WithLeeway(10*time.Second))
	if _, err := loose.Verify(context.Background(), token); err != nil {
		t.Fatalf("leeway 10 s: %v", err)
	}
}

func TestConstructorsRefuseBadConfiguration(t *testing.T) {
	cases := []struct {
		name string
		make func() (*Verifier, error)
	}{
		{"short HS256 secret", func() (*Verifier, error) { return NewHS256Verifier([]byte("short")) }},
		{"no HS256 secret", func() (*Verifier, error) { return NewHS256Verifier(nil) }},
		{"empty JWKS URL", func() (*Verifier, error) { return NewJWKSVerifier("") }},
		{"relative JWKS URL", func() (*Verifier, error) { return NewJWKSVerifier("/.well-known/jwks.json") }},
		{"JWKS URL of another scheme", func() (*Verifier, error) { return NewJWKSVerifier("file:///etc/jwks") }},
		{"negative leeway", func() (*Verifier, error) {
			return NewHS256Verifier(testSecret, WithLeeway(-time.Second))
		}},
		{"leeway over 5 minutes", func() (*Verifier, error) {
			return NewHS256Verifier(testSecret, WithLeeway(time.Hour))
		}},
		{"nil clock", func() (*Verifier, error) { return NewHS256Verifier(testSecret, WithClock(nil)) }},
		{"zero cache TTL", func() (*Verifier, error) {
			return NewJWKSVerifier(DefaultJWKSURL, WithJWKSCacheTTL(0))
		}},
		{"negative refetch interval", func() (*Verifier, error) {
			return NewJWKSVerifier(DefaultJWKSURL, WithRefetchInterval(-time.Second))
		}},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			if v, err := tc.make(); err == nil || v != nil {
				t.Fatalf("got %v, %v; want an error", v, err)
			}
		})
	}
	v, err := NewJWKSVerifier(DefaultJWKSURL)
	if err != nil || v.Algorithm() != "EdDSA" {
		t.Fatalf("NewJWKSVerifier(default) = %v, %v", v, err)
	}
	secret := append([]byte(nil), testSecret...)
	h, err := NewHS256Verifier(secret)
	if err != nil || h.Algorithm() != "HS256" {
		t.Fatalf("NewHS256Verifier = %v, %v", h, err)
	}
	token := signHS256(t, testSecret, claimsAt(time.Now()))
	secret[0] ^= 0xff // the caller's slice changing later does not change the verifier's secret
	if _, err := h.Verify(context.Background(), token); err != nil {
		t.Fatalf("secret was not copied: %v", err)
	}
}
