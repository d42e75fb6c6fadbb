package driftlock

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"sync"
	"time"
)

const (
	maxJWKSBytes = 1 << 20
	// fetchTimeout bounds a fetch whatever the HTTP client's own timeout is.
	fetchTimeout = 10 * time.Second
	// coldRefetchInterval caps the refetch interval while no keys are held, so that a backend started before
	// the gateway does not refuse every token for a whole interval.
	coldRefetchInterval = time.Second
)

// keySet is the gateway's JWKS as last fetched. Keys are used for ttl after a successful fetch; past that,
// an unknown kid, or while nothing has been fetched, a fetch is started, at most one at a time and at most
// one per refetchInterval. A failed fetch keeps the keys held before.
type keySet struct {
	url             string
	client          *http.Client
	ttl             time.Duration
	refetchInterval time.Duration
	now             func() time.Time
	logger          *log.Logger

	mu          sync.Mutex
	keys        map[string]ed25519.PublicKey // nil until a fetch succeeds
	fetchedAt   time.Time
	attempted   bool
	attemptedAt time.Time
	lastErr     error
	inflight    *fetchCall
}

type fetchCall struct {
	done chan struct{}
	err  error // set before done is closed
}

// key returns the public key published under kid.
func (s *keySet) key(ctx context.Context, kid string) (ed25519.PublicKey, error) {
	s.mu.Lock()
	now := s.now()
	key, known := s.keys[kid]
	if known && now.Sub(s.fetchedAt) < s.ttl {
		s.mu.Unlock()
		return key, nil
	}
	// Stale, unknown or nothing fetched yet: fetch, unless one is running or the last was too recent.
	call, started := s.inflight, false
	if call == nil && s.mayFetch(now) {
		call, started = s.start(now), true
	}
	s.mu.Unlock()

	// A stale key serves everyone but the request that started the refresh, which waits for the new set.
	if call == nil || (known && !started) {
		return s.lookup(kid)
	}
	select {
	case <-call.done:
	case <-ctx.Done():
		if known {
			return key, nil
		}
		return nil, fmt.Errorf("%w: waiting for the JWKS: %v", ErrKeysUnavailable, ctx.Err())
	}
	return s.lookup(kid)
}

func (s *keySet) lookup(kid string) (ed25519.PublicKey, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys == nil {
		if s.lastErr != nil {
			return nil, fmt.Errorf("%w: no JWKS fetched yet: %v", ErrKeysUnavailable, s.lastErr)
		}
		return nil, fmt.Errorf("%w: no JWKS fetched yet", ErrKeysUnavailable)
	}
	key, ok := s.keys[kid]
	if !ok {
		return nil, fmt.Errorf("%w: kid %s is not in the JWKS", ErrUnknownKey, quote(kid))
	}
	return key, nil
}

// mayFetch says whether the refetch interval allows a fetch now; s.mu is held.
func (s *keySet) mayFetch(now time.Time) bool {
	if !s.attempted {
		return true
	}
	interval := s.refetchInterval
	if s.keys == nil && interval > coldRefetchInterval {
		interval = coldRefetchInterval
	}
	return now.Sub(s.attemptedAt) >= interval
}

// start begins a fetch in the background; s.mu is held and no fetch is running.
func (s *keySet) start(now time.Time) *fetchCall {
	call := &fetchCall{done: make(chan struct{})}
	s.inflight = call
	s.attempted = true
	s.attemptedAt = now
	go s.run(call)
	return call
}

func (s *keySet) run(call *fetchCall) {
	keys, err := s.fetch()
	s.mu.Lock()
	if err == nil {
		s.keys = keys
		s.fetchedAt = s.now()
	} else if s.logger != nil {
		held := "no keys held yet"
		if s.keys != nil {
			held = fmt.Sprintf("still using the %d keys held", len(s.keys))
		}
		s.logger.Printf("driftlock: fetching the JWKS from %s failed, %s: %v", s.url, held, err)
	}
	s.lastErr = err
	s.inflight = nil
	s.mu.Unlock()
	call.err = err
	close(call.done)
}

// refresh fetches now (joining a fetch already running) and waits for the outcome.
func (s *keySet) refresh(ctx context.Context) error {
	s.mu.Lock()
	call := s.inflight
	if call == nil {
		call = s.start(s.now())
	}
	s.mu.Unlock()
	select {
	case <-call.done:
		return call.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *keySet) fetch() (map[string]ed25519.PublicKey, error) {
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxJWKSBytes))
		return nil, fmt.Errorf("GET %s: status %d", s.url, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: reading the body: %v", s.url, err)
	}
	if len(body) > maxJWKSBytes {
		return nil, fmt.Errorf("GET %s: body is over %d bytes", s.url, maxJWKSBytes)
	}
	return parseJWKS(body)
}

// jwk is the part of an RFC 7517 / RFC 8037 key that matters here.
type jwk struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
}

// parseJWKS returns the set's Ed25519 signing keys by kid. Keys of other kinds are skipped; a set with no
// usable key, or with one kid twice, is refused as a whole, so that the keys held before stay in use.
func parseJWKS(body []byte) (map[string]ed25519.PublicKey, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("JWKS is not JSON: %v", err)
	}
	if set.Keys == nil {
		return nil, errors.New("JWKS has no keys array")
	}
	keys := make(map[string]ed25519.PublicKey, len(set.Keys))
	for i, raw := range set.Keys {
		var k jwk
		if err := json.Unmarshal(raw, &k); err != nil {
			return nil, fmt.Errorf("JWKS key %d: %v", i, err)
		}
		if k.Kty != "OKP" || k.Crv != "Ed25519" || (k.Alg != "" && k.Alg != algEdDSA) ||
			(k.Use != "" && k.Use != "sig") {
			continue
		}
		if k.Kid == "" {
			return nil, fmt.Errorf("JWKS key %d has no kid", i)
		}
		x, err := b64.DecodeString(k.X)
		if err != nil || len(x) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("JWKS key %s: x is not a base64url %d-byte key", quote(k.Kid),
				ed25519.PublicKeySize)
		}
		if _, dup := keys[k.Kid]; dup {
			return nil, fmt.Errorf("JWKS has kid %s twice", quote(k.Kid))
		}
		keys[k.Kid] = ed25519.PublicKey(x)
	}
	if len(keys) == 0 {
		return nil, errors.New("JWKS has no Ed25519 signing key")
	}
	return keys, nil
}
