"""The management API on authz's port: admin tokens, keys, organisations, usage."""
