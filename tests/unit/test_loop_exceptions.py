"""The fixture that fails a test when an exception reaches the event loop's handler (support/loop_exceptions.py)."""

import asyncio
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def test_every_async_test_runs_with_the_recorder_installed(fail_on_loop_exceptions):
    handler = asyncio.get_running_loop().get_exception_handler()
    assert handler == fail_on_loop_exceptions.handle


async def test_an_expected_loop_exception_is_allowed(expect_loop_exception):
    async def fails():
        raise RuntimeError("meant to fail")

    with expect_loop_exception("meant to fail"):
        task = asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done()
        del task
        gc.collect()  # "Task exception was never retrieved" is reported when the task is collected


def test_a_test_whose_background_task_died_unobserved_fails(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "from tests.support.loop_exceptions import fail_on_loop_exceptions  # noqa: F401\n"
    )
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            import gc

            async def test_leaks_a_failed_task():
                async def fails():
                    raise ValueError("nobody awaited me")

                task = asyncio.get_running_loop().create_task(fails())
                await asyncio.sleep(0.01)
                del task
                gc.collect()

            async def test_clean():
                await asyncio.sleep(0)

            def test_sync():
                pass
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
         "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=session",
         "-o", "asyncio_default_test_loop_scope=session", "--rootdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "3 passed, 1 error" in output, output  # the leaking test errs at teardown; the others pass
    assert "unexpected exceptions in asynchronous code" in output and "nobody awaited me" in output, output
