// Command driftlock-echo is a stand-in for the Go backend behind the DriftLock gateway: every path, wrapped in
// the driftlock middleware, answers JSON with the verified context, the method, the path and the x-driftlock-*
// headers it received. Requests without a valid x-driftlock-context token get the middleware's 401.
//
//	driftlock-echo -listen 127.0.0.1:9000 -jwks-url http://127.0.0.1:8082/.well-known/jwks.json
//	DRIFTLOCK_JWT_SECRET=... driftlock-echo -listen 127.0.0.1:9000 -hs256-secret-env DRIFTLOCK_JWT_SECRET
//
// It prints one line to stdout once it listens ("driftlock-echo listening on ADDR ...", with the port it
// got when given port 0), logs refusals to stderr, and exits 0 on SIGTERM or SIGINT.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/driftlock/gateway/go/driftlock"
)

const maxBody = 10 << 20

type config struct {
	listen          string
	jwksURL         string
	secretEnv       string
	secret          []byte
	leeway          time.Duration
	cacheTTL        time.Duration
	refetchInterval time.Duration
}

const usageText = `driftlock-echo: a stand-in for the Go backend behind the DriftLock gateway.

Every path is served through the driftlock middleware and answers JSON with the verified
context (org_id, key_id, plan, scopes, environment, billable), the method, the path and the
x-driftlock-* headers received. Give exactly one of -jwks-url (EdDSA) or -hs256-secret-env (HS256).

  driftlock-echo -listen 127.0.0.1:9000 -jwks-url http://127.0.0.1:8082/.well-known/jwks.json
  DRIFTLOCK_JWT_SECRET=... driftlock-echo -hs256-secret-env DRIFTLOCK_JWT_SECRET

Prints one line to stdout when listening; exits 0 on SIGTERM or SIGINT.

Flags:
`

func parseFlags(args []string, getenv func(string) string, output io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("driftlock-echo", flag.ContinueOnError)
	fs.SetOutput(output)
	fs.Usage = func() {
		fmt.Fprint(output, usageText)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.listen, "listen", "127.0.0.1:9000", "`address` to listen on, host:port (port 0: any free port)")
	fs.StringVar(&c.jwksURL, "jwks-url", "", "verify EdDSA tokens with the keys at this JWKS `URL` (the gateway's is "+
		driftlock.DefaultJWKSURL+")")
	fs.StringVar(&c.secretEnv, "hs256-secret-env", "", "verify HS256 tokens with the secret in this environment "+
		"`variable` (e.g. DRIFTLOCK_JWT_SECRET)")
	fs.DurationVar(&c.leeway, "leeway", driftlock.DefaultLeeway, "clock skew allowed on exp and iat")
	fs.DurationVar(&c.cacheTTL, "jwks-cache-ttl", driftlock.DefaultJWKSCacheTTL,
		"how long fetched JWKS keys are used before the JWKS is fetched again")
	fs.DurationVar(&c.refetchInterval, "jwks-refetch-interval", driftlock.DefaultRefetchInterval,
		"least time between two JWKS fetches (on an unknown kid, or while the gateway is down)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	switch {
	case c.jwksURL != "" && c.secretEnv != "":
		return c, errors.New("give -jwks-url or -hs256-secret-env, not both")
	case c.jwksURL == "" && c.secretEnv == "":
		return c, errors.New("give -jwks-url (EdDSA) or -hs256-secret-env (HS256); see -help")
	case c.secretEnv != "":
		secret := getenv(c.secretEnv)
		if secret == "" {
			return c, fmt.Errorf("the environment variable %s (-hs256-secret-env) is not set", c.secretEnv)
		}
		c.secret = []byte(secret)
	}
	return c, nil
}

func (c config) verifier(logger *log.Logger) (*driftlock.Verifier, error) {
	opts := []driftlock.Option{
		driftlock.WithLeeway(c.leeway),
		driftlock.WithJWKSCacheTTL(c.cacheTTL),
		driftlock.WithRefetchInterval(c.refetchInterval),
		driftlock.WithErrorLog(logger),
	}
	if c.secret != nil {
		return driftlock.NewHS256Verifier(c.secret, opts...)
	}
	return driftlock.NewJWKSVerifier(c.jwksURL, opts...)
}

// echoed is the answer to every request that the middleware lets through.
type echoed struct {
	OrgID       string            `json:"org_id"`
	KeyID       string            `json:"key_id"`
	Plan        string            `json:"plan"`
	Scopes      []string          `json:"scopes"`
	Environment string            `json:"environment"`
	Billable    bool              `json:"billable"`
	Method      string            `json:"method"`
	Path        string            `json:"path"`
	Headers     map[string]string `json:"headers"`
	BodyBytes   int64             `json:"body_bytes"`
}

func echo(w http.ResponseWriter, r *http.Request) {
	c, ok := driftlock.FromContext(r.Context())
	if !ok { // only when the handler is used without the middleware
		driftlock.WriteError(w, http.StatusInternalServerError, "internal_error", "No verified context.",
			r.Header.Get(driftlock.HeaderRequestID))
		return
	}
	n, _ := io.Copy(io.Discard, io.LimitReader(r.Body, maxBody))
	headers := map[string]string{}
	names := make([]string, 0, len(r.Header))
	for name := range r.Header {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		lower := strings.ToLower(name)
		if strings.HasPrefix(lower, "x-driftlock-") {
			headers[lower] = strings.Join(r.Header[name], ", ")
		}
	}
	scopes := c.Scopes
	if scopes == nil {
		scopes = []string{}
	}
	body, _ := json.Marshal(echoed{
		OrgID:       c.OrgID,
		KeyID:       c.KeyID,
		Plan:        c.Plan,
		Scopes:      scopes,
		Environment: c.Environment,
		Billable:    c.Billable,
		Method:      r.Method,
		Path:        r.URL.RequestURI(),
		Headers:     headers,
		BodyBytes:   n,
	})
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}

// serve listens and serves until ctx ends, then shuts down gracefully.
func serve(ctx context.Context, c config, stdout io.Writer, logger *log.Logger) error {
	v, err := c.verifier(logger)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           driftlock.Middleware(v)(http.HandlerFunc(echo)),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          logger,
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	if c.secret != nil {
		fmt.Fprintf(stdout, "driftlock-echo listening on %s (HS256, secret from $%s)\n", ln.Addr(), c.secretEnv)
	} else {
		fmt.Fprintf(stdout, "driftlock-echo listening on %s (EdDSA, keys from %s)\n", ln.Addr(), c.jwksURL)
		// Warm the key cache. A failure is logged by the verifier, and a gateway that is not up yet is asked
		// again on the next request (at most once a second until keys are fetched).
		go func() {
			fetch, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			_ = v.Refresh(fetch)
		}()
	}
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil {
		return err
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func main() {
	c, err := parseFlags(os.Args[1:], os.Getenv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "driftlock-echo: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := serve(ctx, c, os.Stdout, log.New(os.Stderr, "driftlock-echo: ", log.LstdFlags)); err != nil {
		fmt.Fprintf(os.Stderr, "driftlock-echo: %v\n", err)
		stop()
		os.Exit(1)
	}
}
