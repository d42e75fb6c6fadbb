"""Shared code of the DriftLock gateway: settings, database, schema, key format and the CLI."""
