"""The base of every error whose message is written for the operator, and how any error is told in one line."""


class OperatorError(Exception):
    """Something the operator can act on; `str(error)` says what, on one line, without secrets."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type's name when it has none), at most `limit` characters."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
