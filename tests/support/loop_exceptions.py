"""Fail a test when an exception reaches the event loop's exception handler, as asyncpg's `_testbase` does.

What reaches the handler is what no code awaited: a task that died with nobody to retrieve its exception, a
callback that raised, a transport that failed in the background. The loop only logs those, so a test would pass
while a background part of the service is broken. `fail_on_loop_exceptions` (autouse in tests/conftest.py)
records every such context during an async test and fails the test at teardown, each context formatted as
asyncpg formats it. A test that provokes one on purpose says so with `expect_loop_exception`.
"""

import asyncio
import contextlib
import inspect
import re
import textwrap
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_asyncio

Context = dict[str, Any]


class LoopExceptions:
    """The exception handler a test's loop runs while the test runs: it keeps each context, then hands it on to
    the handler that was there before (by default the loop's, which logs it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.contexts: list[Context] = []
        self._expected: list[tuple[str, list[Context]]] = []
        self._previous = loop.get_exception_handler()

    def install(self) -> None:
        self.loop.set_exception_handler(self.handle)

    def remove(self) -> None:
        self.loop.set_exception_handler(self._previous)

    def handle(self, loop: asyncio.AbstractEventLoop, context: Context) -> None:
        for pattern, seen in self._expected:
            if re.search(pattern, _text(context)):
                seen.append(context)
                return
        self.contexts.append(context)
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    @contextlib.contextmanager
    def expect(self, pattern: str) -> Iterator[None]:
        """Within the block, contexts whose message or exception matches `pattern` are expected: they do not fail
        the test, and the block fails unless at least one arrived."""
        seen: list[Context] = []
        entry = (pattern, seen)
        self._expected.append(entry)
        try:
            yield
        finally:
            self._expected.remove(entry)
        if not seen:
            raise AssertionError(f"no exception matching {pattern!r} reached the event loop's exception handler")

    def report(self) -> str:
        return "unexpected exceptions in asynchronous code:\n" + "\n".join(
            _format(context, n) for n, context in enumerate(self.contexts, 1)
        )


def _text(context: Context) -> str:
    exception = context.get("exception")
    return f"{context.get('message', '')} {type(exception).__name__ if exception else ''}: {exception or ''}"


def _format(context: Context, n: int) -> str:
    message = context.get("message", "Unhandled exception in event loop")
    lines = []
    for key in sorted(context):
        if key in {"message", "exception"}:
            continue
        value = context[key]
        if key == "source_traceback":
            text = "Object created at (most recent call last):\n" + "".join(traceback.format_list(value)).rstrip()
        else:
            try:
                text = repr(value)
            except Exception as error:  # a broken __repr__ must not hide the report
                text = f"Exception in __repr__ {error!r}; value type: {type(value)!r}"
        lines.append(f"[{key}]: {text}\n\n")
    exception = context.get("exception")
    if exception is not None:
        lines.append("[exception]:\n")
        lines.append(textwrap.indent("".join(traceback.format_exception(exception)), "  "))
    return f"{n:02d}. {message}:\n{textwrap.indent(''.join(lines), '    ')}\n"


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def fail_on_loop_exceptions(request: pytest.FixtureRequest) -> Any:
    """Autouse: fail an async test when an exception reached the loop's handler while it ran."""
    if not inspect.iscoroutinefunction(getattr(request, "function", None)):
        yield None
        return
    recorder = LoopExceptions(asyncio.get_running_loop())
    recorder.install()
    try:
        yield recorder
    finally:
        recorder.remove()
    if recorder.contexts:
        pytest.fail(recorder.report(), pytrace=False)


@pytest.fixture
def expect_loop_exception(fail_on_loop_exceptions: LoopExceptions | None):
    """`with expect_loop_exception("pattern"):` around what is meant to send an exception to the loop."""
    if fail_on_loop_exceptions is None:
        raise RuntimeError("expect_loop_exception is for async tests")
    return fail_on_loop_exceptions.expect
