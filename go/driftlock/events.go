package driftlock

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Events from the gateway (docs/events.md): POSTs in the Standard Webhooks format (standardwebhooks.com) with
// headers webhook-id, webhook-timestamp and webhook-signature ("v1,<base64 HMAC-SHA256>" entries, space-separated)
// over "<webhook-id>.<webhook-timestamp>.<body>", keyed with the base64-decoded part of a "whsec_" secret.

// DefaultEventTolerance is how far webhook-timestamp may be from now: older messages are refused as replays.
const DefaultEventTolerance = 5 * time.Minute

// MaxEventBytes is the largest body EventHandler reads.
const MaxEventBytes = 1 << 20

// The reasons an event is refused; every error VerifyEvent returns wraps exactly one.
var (
	// ErrEventHeaders: a Standard Webhooks header is missing or malformed.
	ErrEventHeaders = errors.New("event headers missing or malformed")
	// ErrEventTimestamp: webhook-timestamp is further from now than the tolerance.
	ErrEventTimestamp = errors.New("event timestamp outside the tolerance")
	// ErrEventSignature: no v1 signature matches any of the secrets.
	ErrEventSignature = errors.New("event signature invalid")
	// ErrEventBody: the body is not a JSON event {"type","timestamp","data"}.
	ErrEventBody = errors.New("event body malformed")
)

// Event is one verified event. Data holds the type's fields (docs/events.md) and always "org_id".
type Event struct {
	ID        string          // webhook-id: the same on every retry; deduplicate on it
	Type      string          // e.g. "billing.payment_failed"
	Timestamp time.Time       // when it happened
	OrgID     string          // data.org_id
	Data      json.RawMessage // the whole data object
}

// EventVerifier checks events with one or more endpoint secrets (several while one is rotated). It is safe for
// concurrent use.
type EventVerifier struct {
	keys      [][]byte
	tolerance time.Duration
	now       func() time.Time
}

// EventOption configures an EventVerifier.
type EventOption func(*EventVerifier)

// WithEventTolerance sets how far webhook-timestamp may be from now (default 5 min).
func WithEventTolerance(d time.Duration) EventOption {
	return func(v *EventVerifier) { v.tolerance = d }
}

// WithEventClock replaces time.Now (tests).
func WithEventClock(now func() time.Time) EventOption { return func(v *EventVerifier) { v.now = now } }

// NewEventVerifier takes the endpoint's "whsec_..." secrets.
func NewEventVerifier(secrets []string, opts ...EventOption) (*EventVerifier, error) {
	if len(secrets) == 0 {
		return nil, errors.New("driftlock: at least one whsec_ secret is required")
	}
	v := &EventVerifier{tolerance: DefaultEventTolerance, now: time.Now}
	for _, secret := range secrets {
		if !strings.HasPrefix(secret, "whsec_") {
			return nil, errors.New("driftlock: an event secret starts with whsec_")
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
		if err != nil || len(key) == 0 {
			return nil, errors.New("driftlock: an event secret is base64 after whsec_")
		}
		v.keys = append(v.keys, key)
	}
	for _, opt := range opts {
		opt(v)
	}
	return v, nil
}

// Verify checks the headers and body of one delivery and returns the event.
func (v *EventVerifier) Verify(header http.Header, body []byte) (*Event, error) {
	id, stamp, signatures := header.Get("webhook-id"), header.Get("webhook-timestamp"), header.Get("webhook-signature")
	if id == "" || stamp == "" || signatures == "" {
		return nil, fmt.Errorf("%w: webhook-id, webhook-timestamp and webhook-signature are required", ErrEventHeaders)
	}
	seconds, err := strconv.ParseInt(stamp, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("%w: webhook-timestamp is not a number", ErrEventHeaders)
	}
	if skew := v.now().Sub(time.Unix(seconds, 0)); skew > v.tolerance || skew < -v.tolerance {
		return nil, fmt.Errorf("%w: %s", ErrEventTimestamp, skew.Round(time.Second))
	}
	signed := make([]byte, 0, len(id)+len(stamp)+len(body)+2)
	signed = append(append(append(append(append(signed, id...), '.'), stamp...), '.'), body...)
	if !v.matches(signed, signatures) {
		return nil, ErrEventSignature
	}
	var wire struct {
		Type      string          `json:"type"`
		Timestamp time.Time       `json:"timestamp"`
		Data      json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &wire); err != nil || wire.Type == "" || len(wire.Data) == 0 {
		return nil, fmt.Errorf("%w: not {\"type\",\"timestamp\",\"data\"}", ErrEventBody)
	}
	var data struct {
		OrgID string `json:"org_id"`
	}
	if err := json.Unmarshal(wire.Data, &data); err != nil {
		return nil, fmt.Errorf("%w: data is not an object", ErrEventBody)
	}
	return &Event{ID: id, Type: wire.Type, Timestamp: wire.Timestamp, OrgID: data.OrgID, Data: wire.Data}, nil
}

func (v *EventVerifier) matches(signed []byte, header string) bool {
	for _, key := range v.keys {
		mac := hmac.New(sha256.New, key)
		mac.Write(signed)
		expected := mac.Sum(nil)
		for _, entry := range strings.Fields(header) {
			version, value, ok := strings.Cut(entry, ",")
			if !ok || version != "v1" {
				continue
			}
			got, err := base64.StdEncoding.DecodeString(value)
			if err == nil && hmac.Equal(got, expected) {
				return true
			}
		}
	}
	return false
}

// EventHandler verifies each POST and passes the event to handle: 401 for a delivery that fails verification,
// 400 for an unreadable body, 500 when handle fails (the gateway retries), 204 otherwise. Deliveries are at least
// once: handle must deduplicate on Event.ID.
func (v *EventVerifier) EventHandler(handle func(context.Context, *Event) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, MaxEventBytes+1))
		if err != nil || len(body) > MaxEventBytes {
			http.Error(w, "unreadable or oversized body", http.StatusBadRequest)
			return
		}
		event, err := v.Verify(r.Header, body)
		if err != nil {
			http.Error(w, "event verification failed", http.StatusUnauthorized)
			return
		}
		if err := handle(r.Context(), event); err != nil {
			http.Error(w, "event not handled", http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}
