package driftlock

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
)

// The request headers of the gateway's contract.
const (
	HeaderContext     = "X-Driftlock-Context"
	HeaderOrgID       = "X-Driftlock-Org-Id"
	HeaderKeyID       = "X-Driftlock-Key-Id"
	HeaderPlan        = "X-Driftlock-Plan"
	HeaderEnvironment = "X-Driftlock-Environment"
	HeaderBillable    = "X-Driftlock-Billable"
	HeaderRequestID   = "X-Request-Id"

	headerPrefix = "x-driftlock-"
)

// The error codes of the middleware's 401 answers.
const (
	CodeMissingContextToken = "missing_context_token"
	CodeInvalidContextToken = "invalid_context_token"
)

var messages = map[string]string{
	CodeMissingContextToken: "The request carries no x-driftlock-context token.",
	CodeInvalidContextToken: "The x-driftlock-context token is not valid.",
}

// Middleware verifies each request's x-driftlock-context token with v. A request without a valid token is
// answered 401 with the contract's JSON error and never reaches next, so a request that reaches the backend
// around Envoy cannot act for an organisation. A request with one reaches next with its Context (see
// FromContext), with the x-driftlock-org-id, -key-id, -plan, -environment and -billable headers set from the
// token whatever the client sent, and without any other x-driftlock-* header but x-driftlock-context.
func Middleware(v *Verifier) func(http.Handler) http.Handler {
	if v == nil {
		panic("driftlock: Middleware needs a Verifier")
	}
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			values := r.Header.Values(HeaderContext)
			if len(values) == 0 || (len(values) == 1 && strings.TrimSpace(values[0]) == "") {
				v.reject(w, r, CodeMissingContextToken, nil)
				return
			}
			if len(values) > 1 {
				v.reject(w, r, CodeInvalidContextToken, errMultipleTokens)
				return
			}
			c, err := v.Verify(r.Context(), strings.TrimSpace(values[0]))
			if err != nil {
				v.reject(w, r, CodeInvalidContextToken, err)
				return
			}
			r2 := r.WithContext(NewContext(r.Context(), c))
			r2.Header = contractHeaders(r.Header, c)
			next.ServeHTTP(w, r2)
		})
	}
}

type middlewareError string

func (e middlewareError) Error() string { return string(e) }

const errMultipleTokens = middlewareError("more than one x-driftlock-context header")

// contractHeaders returns a copy of h with the contract's headers set from c and every other x-driftlock-*
// header but the token removed. h itself is left as it was.
func contractHeaders(h http.Header, c Context) http.Header {
	out := h.Clone()
	for name := range out {
		if strings.HasPrefix(strings.ToLower(name), headerPrefix) && !strings.EqualFold(name, HeaderContext) {
			delete(out, name)
		}
	}
	out.Set(HeaderOrgID, c.OrgID)
	out.Set(HeaderKeyID, c.KeyID)
	out.Set(HeaderPlan, c.Plan)
	out.Set(HeaderEnvironment, c.Environment)
	out.Set(HeaderBillable, strconv.FormatBool(c.Billable))
	return out
}

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code      string `json:"code"`
	Message   string `json:"message"`
	RequestID string `json:"request_id"`
}

func (v *Verifier) reject(w http.ResponseWriter, r *http.Request, code string, err error) {
	requestID := r.Header.Get(HeaderRequestID)
	if v.logger != nil {
		if err != nil {
			v.logger.Printf("driftlock: refused %s %s (request id %s): %s: %v", r.Method, r.URL.Path,
				quote(requestID), code, err)
		} else {
			v.logger.Printf("driftlock: refused %s %s (request id %s): %s", r.Method, r.URL.Path,
				quote(requestID), code)
		}
	}
	WriteError(w, http.StatusUnauthorized, code, messages[code], requestID)
}

// WriteError answers with the contract's JSON error shape, {"error": {"code", "message", "request_id"}};
// a 401 also gets WWW-Authenticate: Bearer. Handlers may use it for errors of their own.
func WriteError(w http.ResponseWriter, status int, code, message, requestID string) {
	body, _ := json.Marshal(errorBody{Error: errorDetail{Code: code, Message: message, RequestID: requestID}})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	if status == http.StatusUnauthorized {
		h.Set("WWW-Authenticate", `Bearer realm="driftlock", error="`+code+`"`)
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
