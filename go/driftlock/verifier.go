package driftlock

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/url"
	"time"
)

// The token's contract with the gateway.
const (
	Issuer      = "driftlock-gateway"
	Audience    = "driftlock-backend"
	MaxLifetime = 300 * time.Second

	// MinHS256SecretBytes is the shortest HS256 secret accepted; the gateway refuses shorter ones too.
	MinHS256SecretBytes = 32

	DefaultLeeway          = 30 * time.Second
	DefaultJWKSCacheTTL    = 5 * time.Minute
	DefaultRefetchInterval = 15 * time.Second
	// DefaultJWKSURL is the gateway's management listener as it is set up by default.
	DefaultJWKSURL = "http://127.0.0.1:8082/.well-known/jwks.json"

	algEdDSA = "EdDSA"
	algHS256 = "HS256"
)

// Verifier checks x-driftlock-context tokens. It accepts exactly one algorithm, chosen by its constructor:
// EdDSA with keys from the gateway's JWKS (NewJWKSVerifier) or HS256 with a shared secret (NewHS256Verifier).
// A Verifier is safe for concurrent use.
type Verifier struct {
	alg    string
	secret []byte  // HS256
	keys   *keySet // EdDSA
	leeway time.Duration
	now    func() time.Time
	logger *log.Logger
}

type options struct {
	leeway          time.Duration
	client          *http.Client
	now             func() time.Time
	ttl             time.Duration
	refetchInterval time.Duration
	logger          *log.Logger
}

// Option configures a Verifier.
type Option func(*options)

// WithLeeway sets the clock skew allowed on exp, iat and nbf, and added to MaxLifetime (default 30 s; 0 to 5 min).
func WithLeeway(d time.Duration) Option { return func(o *options) { o.leeway = d } }

// WithHTTPClient sets the client that fetches the JWKS (default: a client with a 5 s timeout).
func WithHTTPClient(c *http.Client) Option { return func(o *options) { o.client = c } }

// WithClock sets the source of the current time, for tests (default time.Now).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithJWKSCacheTTL sets how long fetched keys are used before the JWKS is fetched again (default 5 min). A key
// the gateway stops publishing is refused at most this long (plus the refetch interval) after it went.
func WithJWKSCacheTTL(d time.Duration) Option { return func(o *options) { o.ttl = d } }

// WithRefetchInterval sets the least time between two JWKS fetches that are not forced by Refresh (default
// 15 s), so that tokens with unknown kids, or a gateway that is down, cost at most one fetch per interval.
// While no keys have been fetched yet, the interval is at most one second.
func WithRefetchInterval(d time.Duration) Option {
	return func(o *options) { o.refetchInterval = d }
}

// WithErrorLog sets where the middleware logs why it refused a token and where failed JWKS fetches are logged
// (default: nowhere). Tokens are never logged.
func WithErrorLog(l *log.Logger) Option { return func(o *options) { o.logger = l } }

func buildOptions(opts []Option) (options, error) {
	o := options{
		leeway:          DefaultLeeway,
		now:             time.Now,
		ttl:             DefaultJWKSCacheTTL,
		refetchInterval: DefaultRefetchInterval,
	}
	for _, opt := range opts {
		opt(&o)
	}
	if o.leeway < 0 || o.leeway > MaxLifetime {
		return o, fmt.Errorf("driftlock: leeway %v is outside 0..%v", o.leeway, MaxLifetime)
	}
	if o.now == nil {
		return o, errors.New("driftlock: the clock is nil")
	}
	if o.ttl <= 0 {
		return o, fmt.Errorf("driftlock: JWKS cache TTL %v is not positive", o.ttl)
	}
	if o.refetchInterval < 0 {
		return o, fmt.Errorf("driftlock: refetch interval %v is negative", o.refetchInterval)
	}
	if o.client == nil {
		o.client = &http.Client{Timeout: 5 * time.Second}
	}
	return o, nil
}

// NewJWKSVerifier returns a Verifier that accepts EdDSA (Ed25519) tokens signed by a key published at jwksURL
// (an http or https URL, usually DefaultJWKSURL). Keys are fetched on first use, not here: a gateway that is
// not up yet does not stop the backend from starting. Call Refresh to fetch them up front.
func NewJWKSVerifier(jwksURL string, opts ...Option) (*Verifier, error) {
	u, err := url.Parse(jwksURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("driftlock: JWKS URL %q is not an absolute http(s) URL", jwksURL)
	}
	o, err := buildOptions(opts)
	if err != nil {
		return nil, err
	}
	keys := &keySet{
		url:             jwksURL,
		client:          o.client,
		ttl:             o.ttl,
		refetchInterval: o.refetchInterval,
		now:             o.now,
		logger:          o.logger,
	}
	return &Verifier{alg: algEdDSA, keys: keys, leeway: o.leeway, now: o.now, logger: o.logger}, nil
}

// NewHS256Verifier returns a Verifier that accepts HS256 tokens signed with secret (the gateway's
// DRIFTLOCK_JWT_SECRET, at least MinHS256SecretBytes long). The secret is copied.
func NewHS256Verifier(secret []byte, opts ...Option) (*Verifier, error) {
	if len(secret) < MinHS256SecretBytes {
		return nil, fmt.Errorf("driftlock: HS256 secret is %d bytes; at least %d are required", len(secret),
			MinHS256SecretBytes)
	}
	o, err := buildOptions(opts)
	if err != nil {
		return nil, err
	}
	s := append([]byte(nil), secret...)
	return &Verifier{alg: algHS256, secret: s, leeway: o.leeway, now: o.now, logger: o.logger}, nil
}

// Algorithm is the one JOSE alg this Verifier accepts: "EdDSA" or "HS256".
func (v *Verifier) Algorithm() string { return v.alg }

// Refresh fetches the JWKS now, whatever the cache and the refetch interval say, and waits for it (or for
// ctx). On failure the keys fetched before stay in use. In HS256 mode it does nothing.
func (v *Verifier) Refresh(ctx context.Context) error {
	if v.keys == nil {
		return nil
	}
	return v.keys.refresh(ctx)
}

// Verify checks token and returns what it says. The error wraps one of the Err* reasons of this package.
// ctx bounds only the wait for a JWKS fetch.
func (v *Verifier) Verify(ctx context.Context, token string) (Context, error) {
	t, err := parseToken(token)
	if err != nil {
		return Context{}, err
	}
	// The configured mode decides the algorithm, never the token.
	if t.alg != v.alg {
		return Context{}, fmt.Errorf("%w: alg %s, want %s", ErrAlgorithm, quote(t.alg), v.alg)
	}
	switch v.alg {
	case algHS256:
		mac := hmac.New(sha256.New, v.secret)
		mac.Write(t.signingInput)
		if !hmac.Equal(mac.Sum(nil), t.signature) {
			return Context{}, fmt.Errorf("%w: HMAC mismatch", ErrSignature)
		}
	case algEdDSA:
		if t.kid == "" {
			return Context{}, fmt.Errorf("%w: no kid in the header", ErrUnknownKey)
		}
		key, err := v.keys.key(ctx, t.kid)
		if err != nil {
			return Context{}, err
		}
		if len(t.signature) != ed25519.SignatureSize || !ed25519.Verify(key, t.signingInput, t.signature) {
			return Context{}, fmt.Errorf("%w: Ed25519 signature does not verify with kid %s", ErrSignature,
				quote(t.kid))
		}
	default:
		return Context{}, fmt.Errorf("%w: verifier has no algorithm", ErrAlgorithm)
	}
	c, err := parseClaims(t.payload)
	if err != nil {
		return Context{}, err
	}
	if err := v.checkClaims(c); err != nil {
		return Context{}, err
	}
	return c.context(), nil
}

func (v *Verifier) checkClaims(c *claims) error {
	if c.iss != Issuer {
		return fmt.Errorf("%w: iss %s", ErrIssuer, quote(c.iss))
	}
	if !c.hasAudience(Audience) {
		return fmt.Errorf("%w: aud %s", ErrAudience, quote(fmt.Sprint(c.aud)))
	}
	if !c.exp.After(c.iat) {
		return fmt.Errorf("%w: exp is not after iat", ErrClaims)
	}
	if lifetime := c.exp.Sub(c.iat); lifetime > MaxLifetime+v.leeway {
		return fmt.Errorf("%w: exp - iat is %v, at most %v", ErrLifetime, lifetime, MaxLifetime)
	}
	now := v.now()
	if !now.Before(c.exp.Add(v.leeway)) {
		return fmt.Errorf("%w: exp was %v ago", ErrExpired, now.Sub(c.exp).Round(time.Second))
	}
	if c.iat.After(now.Add(v.leeway)) {
		return fmt.Errorf("%w: iat is %v ahead", ErrNotYetValid, c.iat.Sub(now).Round(time.Second))
	}
	if c.nbf != nil && c.nbf.After(now.Add(v.leeway)) {
		return fmt.Errorf("%w: nbf is %v ahead", ErrNotYetValid, c.nbf.Sub(now).Round(time.Second))
	}
	return nil
}

// quote shows an attacker-chosen string in an error: quoted, and cut to a readable length.
func quote(s string) string {
	const max = 64
	if len(s) > max {
		s = s[:max] + "..."
	}
	return fmt.Sprintf("%q", s)
}
