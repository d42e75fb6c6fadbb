"""The ext_authz service Envoy calls on every request."""
