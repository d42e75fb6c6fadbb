"""The base of every error whose message is written for the operator (and printed by the CLI as one line)."""


class OperatorError(Exception):
    """Something the operator can act on; `str(error)` says what, on one line, without secrets."""
