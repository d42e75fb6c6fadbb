package driftlock

import (
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Tokens are built here by hand, the way PyJWT builds them: base64url(header) "." base64url(payload) "."
// base64url(signature), without padding.

var enc = base64.RawURLEncoding

const testOrgID = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"

var testSecret = []byte("a-shared-secret-of-at-least-32-bytes!!")

// testNow is a fixed moment; every test clock starts there.
var testNow = time.Unix(1_700_000_000, 0)

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *fakeClock { return &fakeClock{now: testNow} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// claimsAt are the claims the gateway sends for a call at now.
func claimsAt(now time.Time) map[string]any {
	return map[string]any{
		"iss":      Issuer,
		"aud":      Audience,
		"sub":      testOrgID,
		"key_id":   "key_123",
		"plan":     "pro",
		"scopes":   []string{"detect", "read"},
		"env":      "live",
		"billable": true,
		"iat":      now.Unix(),
		"exp":      now.Unix() + 300,
	}
}

// with returns a copy of claims with the given claims set, and those given as nil removed.
func with(claims map[string]any, changes map[string]any) map[string]any {
	out := make(map[string]any, len(claims))
	for k, v := range claims {
		out[k] = v
	}
	for k, v := range changes {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = v
		}
	}
	return out
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// signRaw builds a token from raw header and payload bytes; sign gets the signing input.
func signRaw(header, payload []byte, sign func(input []byte) []byte) string {
	input := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	return input + "." + enc.EncodeToString(sign([]byte(input)))
}

func ed25519Signer(priv ed25519.PrivateKey) func([]byte) []byte {
	return func(input []byte) []byte { return ed25519.Sign(priv, input) }
}

func hs256Signer(secret []byte) func([]byte) []byte {
	return func(input []byte) []byte {
		mac := hmac.New(sha256.New, secret)
		mac.Write(input)
		return mac.Sum(nil)
	}
}

func signEdDSA(t testing.TB, priv ed25519.PrivateKey, kid string, claims map[string]any) string {
	t.Helper()
	header := mustJSON(t, map[string]any{"alg": "EdDSA", "typ": "JWT", "kid": kid})
	return signRaw(header, mustJSON(t, claims), ed25519Signer(priv))
}

func signHS256(t testing.TB, secret []byte, claims map[string]any) string {
	t.Helper()
	header := mustJSON(t, map[string]any{"alg": "HS256", "typ": "JWT"})
	return signRaw(header, mustJSON(t, claims), hs256Signer(secret))
}

// testKey is an Ed25519 key pair with a kid, made from a fixed seed so that failures repeat.
type testKey struct {
	kid  string
	pub  ed25519.PublicKey
	priv ed25519.PrivateKey
}

func newTestKey(kid string, seed byte) testKey {
	s := make([]byte, ed25519.SeedSize)
	for i := range s {
		s[i] = seed
	}
	priv := ed25519.NewKeyFromSeed(s)
	return testKey{kid: kid, pub: priv.Public().(ed25519.PublicKey), priv: priv}
}

func (k testKey) jwk() map[string]any {
	return map[string]any{"kty": "OKP", "crv": "Ed25519", "x": enc.EncodeToString(k.pub), "kid": k.kid,
		"alg": "EdDSA", "use": "sig"}
}

func (k testKey) sign(t testing.TB, claims map[string]any) string {
	t.Helper()
	return signEdDSA(t, k.priv, k.kid, claims)
}

// jwksServer plays the gateway's management listener: it publishes the keys it is given, counts the
// requests it gets, and can be taken down (503) or made to answer a body of the test's choosing.
type jwksServer struct {
	*httptest.Server
	requests int64

	mu   sync.Mutex
	keys []testKey
	down bool
	body []byte
	gate chan struct{} // when set, requests wait for it to close
}

func newJWKSServer(t testing.TB, keys ...testKey) *jwksServer {
	s := &jwksServer{keys: keys}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		atomic.AddInt64(&s.requests, 1)
		if r.URL.Path != "/.well-known/jwks.json" {
			http.NotFound(w, r)
			return
		}
		s.mu.Lock()
		gate := s.gate
		s.mu.Unlock()
		if gate != nil {
			<-gate
		}
		s.mu.Lock()
		down, body := s.down, s.body
		if body == nil {
			set := []map[string]any{}
			for _, k := range s.keys {
				set = append(set, k.jwk())
			}
			body, _ = json.Marshal(map[string]any{"keys": set})
		}
		s.mu.Unlock()
		if down {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) jwksURL() string { return s.URL + "/.well-known/jwks.json" }

func (s *jwksServer) publish(keys ...testKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys = keys
}

func (s *jwksServer) setDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
}

func (s *jwksServer) setBody(body []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.body = body
}

// hold makes requests wait until the returned function is called.
func (s *jwksServer) hold() (release func()) {
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.gate = nil
			s.mu.Unlock()
			close(gate)
		})
	}
}

func (s *jwksServer) count() int64 { return atomic.LoadInt64(&s.requests) }

func newEdDSAVerifier(t testing.TB, srv *jwksServer, clock *fakeClock, opts ...Option) *Verifier {
	t.Helper()
	opts = append([]Option{WithClock(clock.Now)}, opts...)
	v, err := NewJWKSVerifier(srv.jwksURL(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func newHSVerifier(t testing.TB, clock *fakeClock, opts ...Option) *Verifier {
	t.Helper()
	opts = append([]Option{WithClock(clock.Now)}, opts...)
	v, err := NewHS256Verifier(testSecret, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
