"""Running the real `driftlock-gateway` command, as an operator would."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        return json.loads(self.stdout)


def run_cli(
    *args: str,
    database_url: str | None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    inherit: bool = True,
) -> CliResult:
    """`inherit=False`: the CLI sees only `env` (and `database_url`), not the test session's own settings (its
    DATABASE_LISTEN_URL, its pooler flag), as when an operator runs it beside a stack of its own."""
    environ = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} if inherit else {}
    if database_url is not None:
        environ["DATABASE_URL"] = database_url
    # A dev stack running in this checkout must not lend the CLI its settings (driftlock_cli/dev_state.py).
    environ.setdefault("DRIFTLOCK_DEV_DIR", os.devnull + ".driftlock-none")
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "driftlock_cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """What every user mistake gets: nothing on stdout, one line on stderr naming the problem, no traceback."""
    assert result.code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
