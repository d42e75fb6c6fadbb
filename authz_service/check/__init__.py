"""The check pipeline: one ext_authz Check from Envoy's request to its answer."""
