// Package driftlock verifies, in a Go backend behind the DriftLock gateway, the x-driftlock-context token
// that the gateway's ext_authz service signs for every request it lets through.
//
// The token is a JWT with iss "driftlock-gateway", aud "driftlock-backend", sub (the organisation id),
// key_id, plan, scopes, env ("live" or "test"), billable, iat and exp (at most 5 minutes apart). It is signed
// with EdDSA (Ed25519) by a key published in the gateway's JWKS, or, where configured, with HS256 and a
// shared secret. A Verifier accepts exactly one of the two: the token never chooses.
//
//	v, err := driftlock.NewJWKSVerifier(driftlock.DefaultJWKSURL)
//	if err != nil {
//		log.Fatal(err)
//	}
//	http.ListenAndServe(addr, driftlock.Middleware(v)(mux))
//
// and in a handler:
//
//	c, _ := driftlock.FromContext(r.Context())
//	if !c.HasScope("detect") { ... }
package driftlock
