package driftlock

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func mustVerify(t *testing.T, v *Verifier, token string) Context {
	t.Helper()
	c, err := v.Verify(context.Background(), token)
	if err != nil {
		t.Fatalf("refused: %v", err)
	}
	return c
}

func mustRefuse(t *testing.T, v *Verifier, token string, want error) {
	t.Helper()
	if _, err := v.Verify(context.Background(), token); !errors.Is(err, want) {
		t.Fatalf("error = %v, want %v", err, want)
	}
}

func wantFetches(t *testing.T, srv *jwksServer, want int64) {
	t.Helper()
	if got := srv.count(); got != want {
		t.Fatalf("the JWKS was fetched %d times, want %d", got, want)
	}
}

func TestUnknownKidRefetchesAtMostOncePerInterval(t *testing.T) {
	k1, forger := newTestKey("k1", 1), newTestKey("forged", 3)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock) // refetch interval: the default 15 s
	good := k1.sign(t, claimsAt(clock.Now()))
	forged := func(i int) string {
		return signEdDSA(t, forger.priv, fmt.Sprintf("forged-%d", i), claimsAt(clock.Now()))
	}

	mustVerify(t, v, good)
	wantFetches(t, srv, 1)

	// Just fetched: a flood of unknown kids fetches nothing.
	for i := 0; i < 20; i++ {
		mustRefuse(t, v, forged(i), ErrUnknownKey)
	}
	wantFetches(t, srv, 1)

	// Past the interval: the first unknown kid refetches once, the rest of the flood does not.
	clock.Advance(DefaultRefetchInterval)
	for i := 0; i < 20; i++ {
		mustRefuse(t, v, forged(i), ErrUnknownKey)
	}
	wantFetches(t, srv, 2)
	clock.Advance(DefaultRefetchInterval - time.Second)
	mustRefuse(t, v, forged(99), ErrUnknownKey)
	wantFetches(t, srv, 2)
	clock.Advance(time.Second)
	mustRefuse(t, v, forged(100), ErrUnknownKey)
	wantFetches(t, srv, 3)

	// Known keys never wait for or cause a fetch while the cache is fresh.
	mustVerify(t, v, good)
	wantFetches(t, srv, 3)
}

func TestConcurrentUnknownKidsFetchOnce(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
	clock.Advance(time.Minute)

	release := srv.hold()
	defer release()
	var wg sync.WaitGroup
	var unknown int64
	for i := 0; i < 50; i++ {
		token := signEdDSA(t, k1.priv, fmt.Sprintf("k-%d", i), claimsAt(clock.Now()))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := v.Verify(context.Background(), token); errors.Is(err, ErrUnknownKey) {
				atomic.AddInt64(&unknown, 1)
			}
		}()
	}
	waitFor(t, func() bool { return srv.count() == 2 })
	time.Sleep(20 * time.Millisecond)
	release()
	wg.Wait()
	wantFetches(t, srv, 2)
	if unknown != 50 {
		t.Fatalf("%d of 50 were refused as unknown keys", unknown)
	}
}

func TestColdStartConcurrentRequestsShareOneFetch(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	token := k1.sign(t, claimsAt(clock.Now()))

	release := srv.hold()
	defer release()
	var wg sync.WaitGroup
	var accepted int64
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := v.Verify(context.Background(), token); err == nil {
				atomic.AddInt64(&accepted, 1)
			}
		}()
	}
	waitFor(t, func() bool { return srv.count() == 1 })
	time.Sleep(20 * time.Millisecond) // let the others pile up behind the fetch
	release()
	wg.Wait()
	wantFetches(t, srv, 1)
	if accepted != 50 {
		t.Fatalf("%d of 50 accepted; the others did not wait for the first fetch", accepted)
	}
}

func TestJWKSRotation(t *testing.T) {
	oldKey, newKey := newTestKey("2024-01", 1), newTestKey("2024-02", 2)
	srv := newJWKSServer(t, oldKey)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock, WithJWKSCacheTTL(5*time.Minute))
	byOld := func() string { return oldKey.sign(t, claimsAt(clock.Now())) }
	byNew := func() string { return newKey.sign(t, claimsAt(clock.Now())) }

	mustVerify(t, v, byOld())
	mustRefuse(t, v, byNew(), ErrUnknownKey) // not published yet
	wantFetches(t, srv, 1)

	// The gateway publishes the new key beside the old one. Within the refetch interval of the last fetch the
	// new kid is still unknown; after it, the first token with the new kid brings the new set.
	srv.publish(oldKey, newKey)
	mustRefuse(t, v, byNew(), ErrUnknownKey)
	wantFetches(t, srv, 1)
	clock.Advance(DefaultRefetchInterval)
	mustVerify(t, v, byNew())
	wantFetches(t, srv, 2)
	mustVerify(t, v, byOld())

	// The old key is withdrawn: its tokens are accepted until the cache's TTL runs out, then refused.
	srv.publish(newKey)
	clock.Advance(4 * time.Minute)
	mustVerify(t, v, byOld())
	wantFetches(t, srv, 2)
	clock.Advance(time.Minute)
	mustRefuse(t, v, byOld(), ErrUnknownKey)
	wantFetches(t, srv, 3)
	mustVerify(t, v, byNew())
	wantFetches(t, srv, 3)
}

func TestJWKSServerDownKeepsTheOldKeys(t *testing.T) {
	k1, k2 := newTestKey("k1", 1), newTestKey("k2", 2)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	var logs bytes.Buffer
	v := newEdDSAVerifier(t, srv, clock, WithErrorLog(log.New(&logs, "", 0)))
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))

	srv.setDown(true)
	clock.Advance(DefaultJWKSCacheTTL)
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now()))) // the refresh fails; k1 is still held
	wantFetches(t, srv, 2)
	if !strings.Contains(logs.String(), "still using the 1 keys held") || !strings.Contains(logs.String(), "503") {
		t.Fatalf("the failed fetch was not logged: %q", logs.String())
	}
	for i := 0; i < 10; i++ {
		mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
	}
	mustRefuse(t, v, k2.sign(t, claimsAt(clock.Now())), ErrUnknownKey)
	wantFetches(t, srv, 2) // retried at most once per refetch interval
	clock.Advance(DefaultRefetchInterval)
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
	wantFetches(t, srv, 3)

	// The gateway comes back with a new key.
	srv.setDown(false)
	srv.publish(k1, k2)
	clock.Advance(DefaultRefetchInterval)
	mustVerify(t, v, k2.sign(t, claimsAt(clock.Now())))
	wantFetches(t, srv, 4)

	// Gone altogether (connection refused): still the old keys.
	srv.Close()
	clock.Advance(DefaultJWKSCacheTTL)
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
	mustVerify(t, v, k2.sign(t, claimsAt(clock.Now())))
	if err := v.Refresh(context.Background()); err == nil {
		t.Fatal("Refresh with the server gone did not fail")
	}
	mustVerify(t, v, k2.sign(t, claimsAt(clock.Now())))
}

func TestJWKSColdStartWithTheServerDown(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	srv.setDown(true)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	token := func() string { return k1.sign(t, claimsAt(clock.Now())) }

	mustRefuse(t, v, token(), ErrKeysUnavailable)
	mustRefuse(t, v, token(), ErrKeysUnavailable)
	wantFetches(t, srv, 1)
	// While no keys are held, the refetch interval is capped at a second.
	clock.Advance(time.Second)
	mustRefuse(t, v, token(), ErrKeysUnavailable)
	wantFetches(t, srv, 2)

	srv.setDown(false)
	clock.Advance(time.Second)
	mustVerify(t, v, token())
	wantFetches(t, srv, 3)

	// A server that is not even listening.
	gone := newJWKSServer(t, k1)
	gone.Close()
	v2 := newEdDSAVerifier(t, gone, clock)
	mustRefuse(t, v2, token(), ErrKeysUnavailable)
	if err := v2.Refresh(context.Background()); err == nil {
		t.Fatal("Refresh of a closed server did not fail")
	}
}

func TestWaitForJWKSEndsWithTheRequestContext(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	release := srv.hold()
	defer release()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := v.Verify(ctx, k1.sign(t, claimsAt(clock.Now()))); !errors.Is(err, ErrKeysUnavailable) {
		t.Fatalf("error = %v, want ErrKeysUnavailable", err)
	}
	// The fetch goes on without the request that started it, and serves the next one.
	release()
	waitFor(t, func() bool { return v.Refresh(context.Background()) == nil })
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
}

func TestRefreshIgnoresTheRefetchInterval(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	v := newEdDSAVerifier(t, srv, newClock())
	for i := 1; i <= 3; i++ {
		if err := v.Refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
		wantFetches(t, srv, int64(i))
	}
	hs := newHSVerifier(t, newClock())
	if err := hs.Refresh(context.Background()); err != nil {
		t.Fatalf("Refresh in HS256 mode: %v", err)
	}
}

type countingTransport struct{ n int64 }

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	atomic.AddInt64(&c.n, 1)
	return http.DefaultTransport.RoundTrip(r)
}

func TestWithHTTPClient(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	transport := &countingTransport{}
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock, WithHTTPClient(&http.Client{Transport: transport}))
	mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
	if atomic.LoadInt64(&transport.n) != 1 {
		t.Fatalf("the given client made %d requests, want 1", transport.n)
	}
}

func TestJWKSDocuments(t *testing.T) {
	k1, k2 := newTestKey("k1", 1), newTestKey("k2", 2)
	jwk := func(k testKey, changes map[string]any) string {
		return string(mustJSON(t, with(k.jwk(), changes)))
	}
	set := func(keys ...string) string { return `{"keys":[` + strings.Join(keys, ",") + `]}` }
	rsa := `{"kty":"RSA","kid":"rsa1","n":"sXch","e":"AQAB","alg":"RS256","use":"sig"}`
	cases := []struct {
		name   string
		body   string
		usable []testKey // nil: the document is refused
	}{
		{"two keys", set(jwk(k1, nil), jwk(k2, nil)), []testKey{k1, k2}},
		{"without alg and use", set(jwk(k1, map[string]any{"alg": nil, "use": nil})), []testKey{k1}},
		{"an RSA key is skipped", set(rsa, jwk(k2, nil)), []testKey{k2}},
		{"an encryption key is skipped", set(jwk(k1, map[string]any{"use": "enc"}), jwk(k2, nil)),
			[]testKey{k2}},
		{"a key for another alg is skipped", set(jwk(k1, map[string]any{"alg": "ES256"}), jwk(k2, nil)),
			[]testKey{k2}},
		{"an X25519 key is skipped", set(jwk(k1, map[string]any{"crv": "X25519"}), jwk(k2, nil)),
			[]testKey{k2}},
		{"not JSON", `{"keys":`, nil},
		{"no keys array", `{}`, nil},
		{"keys not an array", `{"keys":{}}`, nil},
		{"empty keys", `{"keys":[]}`, nil},
		{"only an RSA key", set(rsa), nil},
		{"x of the wrong length", set(jwk(k1, map[string]any{"x": enc.EncodeToString(k1.pub[:31])})), nil},
		{"x not base64url", set(jwk(k1, map[string]any{"x": "***"})), nil},
		{"x missing", set(jwk(k1, map[string]any{"x": nil})), nil},
		{"no kid", set(jwk(k1, map[string]any{"kid": nil})), nil},
		{"kid twice", set(jwk(k1, nil), jwk(k2, map[string]any{"kid": "k1"})), nil},
		{"a key that is not an object", set(`"k1"`), nil},
		{"over 1 MiB", set(jwk(k1, map[string]any{"pad": strings.Repeat("x", maxJWKSBytes)})), nil},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			srv := newJWKSServer(t, k1, k2)
			clock := newClock()
			v := newEdDSAVerifier(t, srv, clock)
			// Start from a good set, so that a refused document is seen to keep it.
			if err := v.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
			srv.publish(k2)
			srv.setBody([]byte(tc.body))
			err := v.Refresh(context.Background())
			if tc.usable == nil {
				if err == nil {
					t.Fatal("the document was accepted")
				}
				mustVerify(t, v, k1.sign(t, claimsAt(clock.Now())))
				mustVerify(t, v, k2.sign(t, claimsAt(clock.Now())))
				return
			}
			if err != nil {
				t.Fatalf("the document was refused: %v", err)
			}
			for _, k := range []testKey{k1, k2} {
				usable := false
				for _, u := range tc.usable {
					usable = usable || u.kid == k.kid
				}
				_, err := v.Verify(context.Background(), k.sign(t, claimsAt(clock.Now())))
				if usable != (err == nil) {
					t.Fatalf("kid %s: usable %v, but Verify says %v", k.kid, usable, err)
				}
			}
		})
	}
}

func TestJWKSStatusNotOK(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v, err := NewJWKSVerifier(srv.URL+"/not-the-jwks", WithClock(clock.Now))
	if err != nil {
		t.Fatal(err)
	}
	mustRefuse(t, v, k1.sign(t, claimsAt(clock.Now())), ErrKeysUnavailable)
	if err := v.Refresh(context.Background()); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("Refresh = %v, want a 404 error", err)
	}
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
