package driftlock

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"
)

// testdata/standard_webhooks.json: one event of each type signed by the gateway's Python signer
// (python -m driftlock_kernel.event_examples writes it; a Python test fails when it is stale).
type signedFixture struct {
	Secret    string `json:"secret"`
	Timestamp int64  `json:"timestamp"`
	Messages  []struct {
		Type    string            `json:"type"`
		Headers map[string]string `json:"headers"`
		Body    string            `json:"body"`
	} `json:"messages"`
}

func loadFixture(t *testing.T) signedFixture {
	t.Helper()
	raw, err := os.ReadFile("testdata/standard_webhooks.json")
	if err != nil {
		t.Fatal(err)
	}
	var f signedFixture
	if err := json.Unmarshal(raw, &f); err != nil {
		t.Fatal(err)
	}
	if len(f.Messages) < 12 {
		t.Fatalf("expected every catalogue type, got %d messages", len(f.Messages))
	}
	return f
}

func headersOf(m map[string]string) http.Header {
	h := http.Header{}
	for k, v := range m {
		h.Set(k, v)
	}
	return h
}

func fixtureVerifier(t *testing.T, f signedFixture, secrets ...string) *EventVerifier {
	t.Helper()
	if len(secrets) == 0 {
		secrets = []string{f.Secret}
	}
	v, err := NewEventVerifier(secrets, WithEventClock(func() time.Time { return time.Unix(f.Timestamp+10, 0) }))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestEveryEventThePythonSideSignsVerifies(t *testing.T) {
	f := loadFixture(t)
	v := fixtureVerifier(t, f)
	for _, m := range f.Messages {
		event, err := v.Verify(headersOf(m.Headers), []byte(m.Body))
		if err != nil {
			t.Fatalf("%s: %v", m.Type, err)
		}
		if event.Type != m.Type || event.ID != m.Headers["webhook-id"] || event.OrgID == "" ||
			event.Timestamp.Unix() != f.Timestamp {
			t.Fatalf("%s: %+v", m.Type, event)
		}
	}
}

// The test vector published with the Standard Webhooks libraries.
func TestStandardWebhooksPublishedVector(t *testing.T) {
	v, err := NewEventVerifier([]string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
		WithEventClock(func() time.Time { return time.Unix(1614265330, 0) }))
	if err != nil {
		t.Fatal(err)
	}
	h := http.Header{}
	h.Set("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek")
	h.Set("webhook-timestamp", "1614265330")
	h.Set("webhook-signature", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
	_, err = v.Verify(h, []byte(`{"test": 2432232314}`))
	if !errors.Is(err, ErrEventBody) { // signature fine; the body is not one of our events
		t.Fatalf("want ErrEventBody after a valid signature, got %v", err)
	}
}

func TestAlteredOrStaleEventsAreRefused(t *testing.T) {
	f := loadFixture(t)
	m := f.Messages[0]
	v := fixtureVerifier(t, f)
	for name, tc := range map[string]struct {
		mutate func(h http.Header, body []byte) []byte
		want   error
	}{
		"body changed": {func(h http.Header, b []byte) []byte { return bytes.Replace(b, []byte("90"), []byte("91"), 1) }, ErrEventSignature},
		"id changed":   {func(h http.Header, b []byte) []byte { h.Set("webhook-id", "evt_other"); return b }, ErrEventSignature},
		"no signature": {func(h http.Header, b []byte) []byte { h.Del("webhook-signature"); return b }, ErrEventHeaders},
		"v2 only": {func(h http.Header, b []byte) []byte {
			h.Set("webhook-signature", strings.Replace(h.Get("webhook-signature"), "v1,", "v2,", 1))
			return b
		}, ErrEventSignature},
		"timestamp moved": {func(h http.Header, b []byte) []byte { h.Set("webhook-timestamp", "1765022401"); return b }, ErrEventSignature},
	} {
		h := headersOf(m.Headers)
		body := tc.mutate(h, []byte(m.Body))
		if _, err := v.Verify(h, body); !errors.Is(err, tc.want) {
			t.Fatalf("%s: want %v, got %v", name, tc.want, err)
		}
	}
	late, _ := NewEventVerifier([]string{f.Secret}, WithEventClock(func() time.Time { return time.Unix(f.Timestamp+3600, 0) }))
	if _, err := late.Verify(headersOf(m.Headers), []byte(m.Body)); !errors.Is(err, ErrEventTimestamp) {
		t.Fatalf("a replay an hour later: want ErrEventTimestamp, got %v", err)
	}
	other := fixtureVerifier(t, f, "whsec_"+strings.Repeat("A", 32))
	if _, err := other.Verify(headersOf(m.Headers), []byte(m.Body)); !errors.Is(err, ErrEventSignature) {
		t.Fatalf("another secret: want ErrEventSignature, got %v", err)
	}
	rotating := fixtureVerifier(t, f, "whsec_"+strings.Repeat("A", 32), f.Secret)
	if _, err := rotating.Verify(headersOf(m.Headers), []byte(m.Body)); err != nil {
		t.Fatalf("the old and the new secret while rotating: %v", err)
	}
}

func TestEventHandler(t *testing.T) {
	f := loadFixture(t)
	v := fixtureVerifier(t, f)
	var got []*Event
	srv := httptest.NewServer(v.EventHandler(func(_ context.Context, e *Event) error {
		got = append(got, e)
		return nil
	}))
	defer srv.Close()
	post := func(m map[string]string, body string) int {
		req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(body))
		for k, val := range m {
			req.Header.Set(k, val)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	m := f.Messages[2]
	if code := post(m.Headers, m.Body); code != http.StatusNoContent {
		t.Fatalf("a signed event: %d", code)
	}
	if code := post(m.Headers, m.Body+" "); code != http.StatusUnauthorized {
		t.Fatalf("an altered event: %d", code)
	}
	if len(got) != 1 || got[0].Type != "billing.payment_failed" {
		t.Fatalf("handled: %+v", got)
	}
	var data struct {
		RestrictsAt time.Time `json:"restricts_at"`
	}
	if err := json.Unmarshal(got[0].Data, &data); err != nil || data.RestrictsAt.IsZero() {
		t.Fatalf("payment_failed data: %s (%v)", got[0].Data, err)
	}
}
