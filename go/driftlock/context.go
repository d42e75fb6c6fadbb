package driftlock

import (
	"context"
	"time"
)

// Context is what a verified token says about the caller.
type Context struct {
	OrgID       string    // sub: the organisation's id
	KeyID       string    // key_id: the API key the call was made with
	Plan        string    // plan: the plan the gateway applied
	Scopes      []string  // scopes: the key's scopes, e.g. "detect", "read"
	Environment string    // env: "live" or "test"
	Billable    bool      // billable: whether the gateway counted the call
	IssuedAt    time.Time // iat
	ExpiresAt   time.Time // exp
}

// HasScope says whether the key was granted scope s.
func (c Context) HasScope(s string) bool {
	for _, have := range c.Scopes {
		if have == s {
			return true
		}
	}
	return false
}

type contextKey struct{}

// NewContext returns a copy of parent that carries c, as the middleware does (useful in handler tests).
func NewContext(parent context.Context, c Context) context.Context {
	return context.WithValue(parent, contextKey{}, c)
}

// FromContext returns the Context the middleware verified for this request, and whether there is one.
func FromContext(ctx context.Context) (Context, bool) {
	c, ok := ctx.Value(contextKey{}).(Context)
	if ok && c.Scopes != nil {
		// The handler gets its own copy: changing it changes nothing for the next handler.
		c.Scopes = append(make([]string, 0, len(c.Scopes)), c.Scopes...)
	}
	return c, ok
}
