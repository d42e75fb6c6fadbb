package driftlock

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"
)

// maxTokenBytes bounds the work an oversized header can cause; the gateway's tokens are well under 1 KiB.
const maxTokenBytes = 8 << 10

// b64 is base64url without padding, refusing non-zero trailing bits so that each token has one spelling.
var b64 = base64.RawURLEncoding.Strict()

// token is a JWS in compact form, split and decoded but not yet verified.
type token struct {
	alg          string
	kid          string
	signingInput []byte // base64url(header) "." base64url(payload), as received
	payload      []byte
	signature    []byte
}

func parseToken(raw string) (*token, error) {
	if raw == "" {
		return nil, fmt.Errorf("%w: empty", ErrMalformed)
	}
	if len(raw) > maxTokenBytes {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(raw), maxTokenBytes)
	}
	parts := strings.Split(raw, ".")
	if len(parts) != 3 {
		return nil, fmt.Errorf("%w: %d segments, want 3", ErrMalformed, len(parts))
	}
	headerJSON, err := b64.DecodeString(parts[0])
	if err != nil {
		return nil, fmt.Errorf("%w: header is not base64url: %v", ErrMalformed, err)
	}
	payload, err := b64.DecodeString(parts[1])
	if err != nil {
		return nil, fmt.Errorf("%w: payload is not base64url: %v", ErrMalformed, err)
	}
	signature, err := b64.DecodeString(parts[2])
	if err != nil {
		return nil, fmt.Errorf("%w: signature is not base64url: %v", ErrMalformed, err)
	}
	header, err := jsonObject(headerJSON)
	if err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrMalformed, err)
	}
	t := &token{
		signingInput: []byte(raw[:len(parts[0])+1+len(parts[1])]),
		payload:      payload,
		signature:    signature,
	}
	alg, ok := header["alg"]
	if !ok {
		return nil, fmt.Errorf("%w: header has no alg", ErrAlgorithm)
	}
	if t.alg, err = jsonString(alg); err != nil {
		return nil, fmt.Errorf("%w: header alg: %v", ErrMalformed, err)
	}
	if kid, ok := header["kid"]; ok {
		if t.kid, err = jsonString(kid); err != nil {
			return nil, fmt.Errorf("%w: header kid: %v", ErrMalformed, err)
		}
	}
	if typ, ok := header["typ"]; ok {
		s, err := jsonString(typ)
		if err != nil || !strings.EqualFold(s, "JWT") {
			return nil, fmt.Errorf("%w: header typ is not JWT", ErrMalformed)
		}
	}
	// RFC 7515 4.1.11: extensions marked critical must be understood, and we understand none.
	if _, ok := header["crit"]; ok {
		return nil, fmt.Errorf("%w: header has crit", ErrMalformed)
	}
	return t, nil
}

// claims are the payload's claims, checked for presence and type (not yet for value).
type claims struct {
	iss      string
	aud      []string
	sub      string
	keyID    string
	plan     string
	scopes   []string
	env      string
	billable bool
	iat      time.Time
	exp      time.Time
	nbf      *time.Time
}

func parseClaims(payload []byte) (*claims, error) {
	m, err := jsonObject(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: payload: %v", ErrClaims, err)
	}
	c := &claims{}
	var errs []string
	need := func(name string) json.RawMessage {
		raw, ok := m[name]
		if !ok {
			errs = append(errs, name+" missing")
		}
		return raw
	}
	str := func(name string, nonEmpty bool) string {
		raw := need(name)
		if raw == nil {
			return ""
		}
		s, err := jsonString(raw)
		if err == nil && nonEmpty && s == "" {
			err = fmt.Errorf("empty")
		}
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", name, err))
		}
		return s
	}
	date := func(name string, raw json.RawMessage) time.Time {
		t, err := jsonNumericDate(raw)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", name, err))
		}
		return t
	}

	c.iss = str("iss", false)
	if raw := need("aud"); raw != nil {
		if c.aud, err = jsonAudience(raw); err != nil {
			errs = append(errs, fmt.Sprintf("aud: %v", err))
		}
	}
	c.sub = str("sub", true)
	c.keyID = str("key_id", true)
	c.plan = str("plan", true)
	if raw := need("scopes"); raw != nil {
		if c.scopes, err = jsonStrings(raw); err != nil {
			errs = append(errs, fmt.Sprintf("scopes: %v", err))
		}
	}
	if raw := need("env"); raw != nil {
		c.env, err = jsonString(raw)
		if err == nil && c.env != "live" && c.env != "test" {
			err = fmt.Errorf("%s is neither live nor test", quote(c.env))
		}
		if err != nil {
			errs = append(errs, fmt.Sprintf("env: %v", err))
		}
	}
	if raw := need("billable"); raw != nil {
		raw = bytes.TrimSpace(raw)
		switch string(raw) {
		case "true":
			c.billable = true
		case "false":
		default:
			errs = append(errs, "billable: not a boolean")
		}
	}
	if raw := need("iat"); raw != nil {
		c.iat = date("iat", raw)
	}
	if raw := need("exp"); raw != nil {
		c.exp = date("exp", raw)
	}
	if raw, ok := m["nbf"]; ok {
		nbf := date("nbf", raw)
		c.nbf = &nbf
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %s", ErrClaims, strings.Join(errs, "; "))
	}
	return c, nil
}

func (c *claims) hasAudience(want string) bool {
	for _, a := range c.aud {
		if a == want {
			return true
		}
	}
	return false
}

func (c *claims) context() Context {
	return Context{
		OrgID:       c.sub,
		KeyID:       c.keyID,
		Plan:        c.plan,
		Scopes:      c.scopes,
		Environment: c.env,
		Billable:    c.billable,
		IssuedAt:    c.iat,
		ExpiresAt:   c.exp,
	}
}

// The JSON helpers below refuse null where encoding/json would silently leave a zero value.

func jsonObject(data []byte) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("not a JSON object: %v", err)
	}
	if m == nil {
		return nil, fmt.Errorf("not a JSON object: null")
	}
	return m, nil
}

func jsonString(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '"' {
		return "", fmt.Errorf("not a string")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("not a string: %v", err)
	}
	return s, nil
}

func jsonStrings(raw json.RawMessage) ([]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '[' {
		return nil, fmt.Errorf("not an array of strings")
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("not an array of strings: %v", err)
	}
	out := make([]string, 0, len(items))
	for _, item := range items {
		s, err := jsonString(item)
		if err == nil && s == "" {
			err = fmt.Errorf("empty string")
		}
		if err != nil {
			return nil, fmt.Errorf("an item: %v", err)
		}
		out = append(out, s)
	}
	return out, nil
}

// jsonAudience reads aud: a string, or an array of strings (RFC 7519 4.1.3).
func jsonAudience(raw json.RawMessage) ([]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) > 0 && raw[0] == '"' {
		s, err := jsonString(raw)
		if err != nil {
			return nil, err
		}
		return []string{s}, nil
	}
	return jsonStrings(raw)
}

// maxNumericDate is far beyond any real token and well inside what time.Unix takes.
const maxNumericDate = 1e11

func jsonNumericDate(raw json.RawMessage) (time.Time, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || !(raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9')) {
		return time.Time{}, fmt.Errorf("not a number")
	}
	var f float64
	if err := json.Unmarshal(raw, &f); err != nil {
		return time.Time{}, fmt.Errorf("not a number: %v", err)
	}
	if math.IsNaN(f) || f < 0 || f > maxNumericDate {
		return time.Time{}, fmt.Errorf("%v is out of range", f)
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), nil
}
