package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/driftlock/gateway/go/driftlock"
)

const (
	secret = "a-shared-secret-of-at-least-32-bytes!!"
	orgID  = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
)

// TestMain lets the SIGTERM test run this test binary as the real command.
func TestMain(m *testing.M) {
	if os.Getenv("DRIFTLOCK_ECHO_RUN_MAIN") == "1" {
		os.Args = append([]string{"driftlock-echo"}, strings.Fields(os.Getenv("DRIFTLOCK_ECHO_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var enc = base64.RawURLEncoding

func sign(t *testing.T, header map[string]any, claims map[string]any, signer func([]byte) []byte) string {
	t.Helper()
	h, _ := json.Marshal(header)
	p, _ := json.Marshal(claims)
	input := enc.EncodeToString(h) + "." + enc.EncodeToString(p)
	return input + "." + enc.EncodeToString(signer([]byte(input)))
}

func claims(now time.Time) map[string]any {
	return map[string]any{"iss": "driftlock-gateway", "aud": "driftlock-backend", "sub": orgID,
		"key_id": "key_123", "plan": "pro", "scopes": []string{"detect", "read"}, "env": "live",
		"billable": true, "iat": now.Unix(), "exp": now.Unix() + 300}
}

func hs256Token(t *testing.T) string {
	return sign(t, map[string]any{"alg": "HS256", "typ": "JWT"}, claims(time.Now()), func(in []byte) []byte {
		mac := hmac.New(sha256.New, []byte(secret))
		mac.Write(in)
		return mac.Sum(nil)
	})
}

func TestParseFlags(t *testing.T) {
	env := func(name string) string {
		if name == "DRIFTLOCK_JWT_SECRET" {
			return secret
		}
		return ""
	}
	cases := []struct {
		name    string
		args    []string
		want    *config // nil: an error
		errHelp bool
	}{
		{"JWKS", []string{"-listen", "127.0.0.1:0", "-jwks-url", driftlock.DefaultJWKSURL},
			&config{listen: "127.0.0.1:0", jwksURL: driftlock.DefaultJWKSURL}, false},
		{"HS256 with double dashes", []string{"--hs256-secret-env", "DRIFTLOCK_JWT_SECRET", "--leeway", "5s"},
			&config{listen: "127.0.0.1:9000", secretEnv: "DRIFTLOCK_JWT_SECRET", secret: []byte(secret),
				leeway: 5 * time.Second}, false},
		{"neither mode", []string{"-listen", "127.0.0.1:0"}, nil, false},
		{"both modes", []string{"-jwks-url", driftlock.DefaultJWKSURL, "-hs256-secret-env", "DRIFTLOCK_JWT_SECRET"},
			nil, false},
		{"secret variable unset", []string{"-hs256-secret-env", "NOT_SET"}, nil, false},
		{"stray argument", []string{"-jwks-url", driftlock.DefaultJWKSURL, "extra"}, nil, false},
		{"unknown flag", []string{"-port", "9000"}, nil, false},
		{"help", []string{"--help"}, nil, true},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			got, err := parseFlags(tc.args, env, &out)
			if tc.errHelp {
				if !errors.Is(err, flag.ErrHelp) {
					t.Fatalf("err = %v, want flag.ErrHelp", err)
				}
				for _, f := range []string{"-listen", "-jwks-url", "-hs256-secret-env", "-leeway", "-jwks-cache-ttl",
					"-jwks-refetch-interval"} {
					if !strings.Contains(out.String(), f) {
						t.Fatalf("the help does not mention %s:\n%s", f, out.String())
					}
				}
				return
			}
			if tc.want == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.want.leeway == 0 {
				tc.want.leeway = driftlock.DefaultLeeway
			}
			tc.want.cacheTTL = driftlock.DefaultJWKSCacheTTL
			tc.want.refetchInterval = driftlock.DefaultRefetchInterval
			if !reflect.DeepEqual(got, *tc.want) {
				t.Fatalf("got %+v, want %+v", got, *tc.want)
			}
		})
	}
}

func TestEcho(t *testing.T) {
	v, err := driftlock.NewHS256Verifier([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	h := driftlock.Middleware(v)(http.HandlerFunc(echo))
	token := hs256Token(t)
	r := httptest.NewRequest(http.MethodPost, "/v1/detect?mode=fast", strings.NewReader("12345"))
	r.Header.Set("X-Driftlock-Context", token)
	r.Header.Set("X-Driftlock-Org-Id", "spoofed")
	r.Header.Set("X-Driftlock-Admin", "true")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d: %s", w.Code, w.Body.String())
	}
	var got map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"org_id": orgID, "key_id": "key_123", "plan": "pro", "scopes": []any{"detect", "read"},
		"environment": "live", "billable": true, "method": "POST", "path": "/v1/detect?mode=fast",
		"body_bytes": float64(5),
		"headers": map[string]any{
			"x-driftlock-context": token, "x-driftlock-org-id": orgID, "x-driftlock-key-id": "key_123",
			"x-driftlock-plan": "pro", "x-driftlock-environment": "live", "x-driftlock-billable": "true",
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got  %v\nwant %v", got, want)
	}

	w = httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
	if w.Code != http.StatusUnauthorized || !strings.Contains(w.Body.String(), "missing_context_token") {
		t.Fatalf("no token: status %d, %s", w.Code, w.Body.String())
	}
}

// lineWriter hands each write of serve to the test.
type lineWriter struct{ lines chan string }

func (l lineWriter) Write(p []byte) (int, error) {
	l.lines <- string(p)
	return len(p), nil
}

func listeningAddr(t *testing.T, line string) string {
	t.Helper()
	const prefix = "driftlock-echo listening on "
	if !strings.HasPrefix(line, prefix) {
		t.Fatalf("first line %q", line)
	}
	return strings.Fields(strings.TrimPrefix(line, prefix))[0]
}

func TestServeEdDSAUntilCancelled(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"keys": []any{map[string]any{"kty": "OKP", "crv": "Ed25519",
			"x": enc.EncodeToString(pub), "kid": "k1", "alg": "EdDSA", "use": "sig"}}})
	}))
	defer jwks.Close()
	c, err := parseFlags([]string{"-listen", "127.0.0.1:0", "-jwks-url", jwks.URL}, os.Getenv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := lineWriter{make(chan string, 1)}
	done := make(chan error, 1)
	go func() { done <- serve(ctx, c, out, log.New(io.Discard, "", 0)) }()
	addr := listeningAddr(t, <-out.lines)

	token := sign(t, map[string]any{"alg": "EdDSA", "typ": "JWT", "kid": "k1"}, claims(time.Now()),
		func(in []byte) []byte { return ed25519.Sign(priv, in) })
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/anything", nil)
	req.Header.Set("X-Driftlock-Context", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"org_id":"`+orgID+`"`) {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not stop")
	}
}

func TestSIGTERMExitsZero(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DRIFTLOCK_ECHO_RUN_MAIN=1", "DRIFTLOCK_JWT_SECRET="+secret,
		"DRIFTLOCK_ECHO_ARGS=-listen 127.0.0.1:0 -hs256-secret-env DRIFTLOCK_JWT_SECRET")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		t.Fatalf("no line on stdout; stderr: %s", stderr.String())
	}
	line := lines.Text()
	if !strings.Contains(line, "(HS256, secret from $DRIFTLOCK_JWT_SECRET)") {
		t.Fatalf("line %q", line)
	}
	addr := listeningAddr(t, line)

	for _, tc := range []struct {
		token string
		code  int
	}{{"", http.StatusUnauthorized}, {hs256Token(t), http.StatusOK}} {
		req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/x", nil)
		if tc.token != "" {
			req.Header.Set("X-Driftlock-Context", tc.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Fatalf("status %d, want %d", resp.StatusCode, tc.code)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; stderr: %s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still running 10 s after SIGTERM")
	}
	if lines.Scan() {
		t.Fatalf("more than one line on stdout: %q", lines.Text())
	}
	if !strings.Contains(stderr.String(), "missing_context_token") {
		t.Fatalf("the refusal was not logged: %s", stderr.String())
	}
}
