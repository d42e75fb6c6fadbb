package driftlock

import (
	"bytes"
	"context"
	"encoding/json"
	"log"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"
)

// seen records what the wrapped handler got.
type seen struct {
	called  bool
	header  http.Header
	context Context
	hasCtx  bool
}

func (s *seen) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.called = true
		s.header = r.Header.Clone()
		s.context, s.hasCtx = FromContext(r.Context())
		w.WriteHeader(http.StatusNoContent)
	})
}

type errorAnswer struct {
	Error struct {
		Code      string `json:"code"`
		Message   string `json:"message"`
		RequestID string `json:"request_id"`
	} `json:"error"`
}

func serve(h http.Handler, headers http.Header) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodPost, "/v1/detect?x=1", strings.NewReader(`{}`))
	for name, values := range headers {
		for _, value := range values {
			r.Header.Add(name, value)
		}
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func TestMiddlewareRefuses(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	good := claimsAt(clock.Now())
	var logs bytes.Buffer
	v := newEdDSAVerifier(t, srv, clock, WithErrorLog(log.New(&logs, "", 0)))
	down := newJWKSServer(t, k1)
	down.setDown(true)
	cold := newEdDSAVerifier(t, down, clock)

	cases := []struct {
		name      string
		v         *Verifier
		headers   http.Header
		code      string
		requestID string
	}{
		{"no token", v, http.Header{"X-Request-Id": {"req-1"}}, CodeMissingContextToken, "req-1"},
		{"no token, no request id", v, http.Header{}, CodeMissingContextToken, ""},
		{"empty token", v, http.Header{"X-Driftlock-Context": {" "}, "X-Request-Id": {"req-2"}},
			CodeMissingContextToken, "req-2"},
		{"spoofed headers only", v, http.Header{"X-Driftlock-Org-Id": {testOrgID},
			"X-Driftlock-Plan": {"enterprise"}}, CodeMissingContextToken, ""},
		{"garbage token", v, http.Header{"X-Driftlock-Context": {"not-a-jwt"}, "X-Request-Id": {"req-3"}},
			CodeInvalidContextToken, "req-3"},
		{"expired token", v, http.Header{"X-Driftlock-Context": {k1.sign(t, with(good, map[string]any{
			"iat": clock.Now().Unix() - 1000, "exp": clock.Now().Unix() - 700}))}}, CodeInvalidContextToken, ""},
		{"HS256 token against EdDSA", v, http.Header{"X-Driftlock-Context": {signHS256(t, k1.pub, good)}},
			CodeInvalidContextToken, ""},
		{"two tokens", v, http.Header{"X-Driftlock-Context": {k1.sign(t, good), k1.sign(t, good)}},
			CodeInvalidContextToken, ""},
		{"JWKS down at cold start", cold, http.Header{"X-Driftlock-Context": {k1.sign(t, good)},
			"X-Request-Id": {"req-4"}}, CodeInvalidContextToken, "req-4"},
		{"request id with quotes", v, http.Header{"X-Request-Id": {`a"b\c`}}, CodeMissingContextToken, `a"b\c`},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			var s seen
			w := serve(Middleware(tc.v)(s.handler()), tc.headers)
			if s.called {
				t.Fatal("the handler was called")
			}
			if w.Code != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", w.Code)
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Fatalf("content-type %q", ct)
			}
			if wa := w.Header().Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer ") ||
				!strings.Contains(wa, tc.code) {
				t.Fatalf("WWW-Authenticate %q", wa)
			}
			if cc := w.Header().Get("Cache-Control"); cc != "no-store" {
				t.Fatalf("cache-control %q", cc)
			}
			var body errorAnswer
			dec := json.NewDecoder(bytes.NewReader(w.Body.Bytes()))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&body); err != nil {
				t.Fatalf("body %q: %v", w.Body.String(), err)
			}
			if body.Error.Code != tc.code || body.Error.RequestID != tc.requestID || body.Error.Message == "" {
				t.Fatalf("body %q", w.Body.String())
			}
			// The JSON object has exactly the contract's keys, request_id included when empty.
			var shape map[string]map[string]any
			_ = json.Unmarshal(w.Body.Bytes(), &shape)
			if len(shape) != 1 || len(shape["error"]) != 3 {
				t.Fatalf("body shape %q", w.Body.String())
			}
		})
	}
	if !strings.Contains(logs.String(), "invalid_context_token") || strings.Contains(logs.String(), "eyJ") {
		t.Fatalf("the log should say why, and never show a token: %q", logs.String())
	}
}

func TestMiddlewarePassesTheVerifiedContext(t *testing.T) {
	k1 := newTestKey("k1", 1)
	srv := newJWKSServer(t, k1)
	clock := newClock()
	v := newEdDSAVerifier(t, srv, clock)
	claims := with(claimsAt(clock.Now()), map[string]any{"billable": false, "env": "test"})
	token := k1.sign(t, claims)

	var s seen
	sent := http.Header{
		"X-Driftlock-Context": {token},
		// A client talking to the backend directly, around Envoy, claiming to be someone else:
		"X-Driftlock-Org-Id":      {"00000000-0000-0000-0000-000000000000"},
		"X-Driftlock-Key-Id":      {"key_admin"},
		"X-Driftlock-Plan":        {"enterprise", "pro"},
		"X-Driftlock-Environment": {"live"},
		"X-Driftlock-Billable":    {"true"},
		"X-Driftlock-Admin":       {"true"},
		"X-Driftlock-Scopes":      {"admin"},
		"X-Request-Id":            {"req-9"},
		"X-Other":                 {"kept"},
	}
	r := httptest.NewRequest(http.MethodGet, "/v1/usage", nil)
	for name, values := range sent {
		r.Header[name] = values
	}
	r.Header["x-driftlock-lowercase"] = []string{"set without canonical form"}
	w := httptest.NewRecorder()
	Middleware(v)(s.handler()).ServeHTTP(w, r)

	if !s.called || w.Code != http.StatusNoContent {
		t.Fatalf("handler called %v, status %d, body %q", s.called, w.Code, w.Body.String())
	}
	want := http.Header{
		"X-Driftlock-Context":     {token},
		"X-Driftlock-Org-Id":      {testOrgID},
		"X-Driftlock-Key-Id":      {"key_123"},
		"X-Driftlock-Plan":        {"pro"},
		"X-Driftlock-Environment": {"test"},
		"X-Driftlock-Billable":    {"false"},
		"X-Request-Id":            {"req-9"},
		"X-Other":                 {"kept"},
	}
	if !reflect.DeepEqual(s.header, want) {
		t.Fatalf("the handler got headers\n%v\nwant\n%v", s.header, want)
	}
	if !s.hasCtx {
		t.Fatal("no Context in the request's context")
	}
	wantCtx := Context{OrgID: testOrgID, KeyID: "key_123", Plan: "pro", Scopes: []string{"detect", "read"},
		Environment: "test", Billable: false, IssuedAt: testNow, ExpiresAt: testNow.Add(300 * time.Second)}
	if !reflect.DeepEqual(s.context, wantCtx) {
		t.Fatalf("Context %+v, want %+v", s.context, wantCtx)
	}
	// The caller's request is left as it came.
	if got := r.Header.Get("X-Driftlock-Org-Id"); got != "00000000-0000-0000-0000-000000000000" {
		t.Fatalf("the original request was changed: %q", got)
	}
}

func TestMiddlewareHS256(t *testing.T) {
	clock := newClock()
	v := newHSVerifier(t, clock)
	var s seen
	h := Middleware(v)(s.handler())
	w := serve(h, http.Header{"X-Driftlock-Context": {signHS256(t, testSecret, claimsAt(clock.Now()))}})
	if w.Code != http.StatusNoContent || s.context.OrgID != testOrgID || s.header.Get(HeaderBillable) != "true" {
		t.Fatalf("status %d, context %+v", w.Code, s.context)
	}
	k1 := newTestKey("k1", 1)
	s = seen{}
	w = serve(h, http.Header{"X-Driftlock-Context": {k1.sign(t, claimsAt(clock.Now()))}})
	if w.Code != http.StatusUnauthorized || s.called {
		t.Fatalf("an EdDSA token in HS256 mode: status %d, handler called %v", w.Code, s.called)
	}
}

func TestFromContext(t *testing.T) {
	if _, ok := FromContext(context.Background()); ok {
		t.Fatal("FromContext found a Context in an empty context")
	}
	c := Context{OrgID: testOrgID, Scopes: []string{"read"}}
	ctx := NewContext(context.Background(), c)
	got, ok := FromContext(ctx)
	if !ok || got.OrgID != testOrgID || !got.HasScope("read") {
		t.Fatalf("FromContext = %+v, %v", got, ok)
	}
	got.Scopes[0] = "admin" // a handler changing its copy does not change the request's
	again, _ := FromContext(ctx)
	if !again.HasScope("read") || again.HasScope("admin") {
		t.Fatalf("scopes were shared: %v", again.Scopes)
	}
	empty, _ := FromContext(NewContext(context.Background(), Context{Scopes: []string{}}))
	if empty.Scopes == nil {
		t.Fatal("empty scopes became nil")
	}
}

func TestWriteError(t *testing.T) {
	w := httptest.NewRecorder()
	WriteError(w, http.StatusForbidden, "insufficient_scope", "The key lacks the scope.", "r1")
	if w.Code != http.StatusForbidden || w.Header().Get("WWW-Authenticate") != "" ||
		w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d, headers %v", w.Code, w.Header())
	}
	want := `{"error":{"code":"insufficient_scope","message":"The key lacks the scope.","request_id":"r1"}}`
	if w.Body.String() != want {
		t.Fatalf("body %s", w.Body.String())
	}
}

func TestMiddlewareNeedsAVerifier(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("Middleware(nil) did not panic")
		}
	}()
	Middleware(nil)
}
