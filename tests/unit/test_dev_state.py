"""The CLI beside a dev stack: it takes the stack's settings from the nearest .driftlock/stack.json while the
stack runs, never over a setting of the environment's own, and says so."""

import io
import json
import os
import subprocess
import sys

from driftlock_cli import dev_state


def write_stack(folder, env, pid=None):
    state = folder / ".driftlock"
    state.mkdir(parents=True, exist_ok=True)
    (state / dev_state.STACK_FILE).write_text(json.dumps({"pid": pid or os.getpid(), "env": env}))
    return state


def test_a_running_stack_lends_what_the_environment_lacks_from_a_folder_below_and_says_so(tmp_path):
    write_stack(tmp_path, {"DATABASE_URL": "postgresql://dev", "STRIPE_WEBHOOK_SECRET": "whsec_dev"})
    below = tmp_path / "go" / "pkg"
    below.mkdir(parents=True)
    environ = {"STRIPE_WEBHOOK_SECRET": "whsec_mine"}
    err = io.StringIO()
    assert dev_state.adopt(environ, below, err) == ["DATABASE_URL"]
    assert environ == {"STRIPE_WEBHOOK_SECRET": "whsec_mine", "DATABASE_URL": "postgresql://dev"}
    assert err.getvalue().startswith("driftlock-gateway: using the dev stack running in ")
    assert "whsec" not in err.getvalue() and "postgresql://dev" not in err.getvalue()  # names, never values


def test_a_stack_that_is_gone_lends_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_stack(tmp_path, {"DATABASE_URL": "postgresql://dev"}, pid=int(dead.stdout))
    environ: dict[str, str] = {}
    err = io.StringIO()
    assert dev_state.adopt(environ, tmp_path, err) == [] and environ == {}
    assert "not running" in err.getvalue()


def test_the_named_dev_dir_is_the_only_place_looked_at(tmp_path):
    write_stack(tmp_path, {"DATABASE_URL": "postgresql://dev"})
    environ = {"DRIFTLOCK_DEV_DIR": str(tmp_path / "elsewhere")}
    assert dev_state.adopt(environ, tmp_path, io.StringIO()) == []
    state = write_stack(tmp_path / "other", {"DATABASE_URL": "postgresql://other"})
    environ = {"DRIFTLOCK_DEV_DIR": str(state)}
    assert dev_state.adopt(environ, tmp_path, io.StringIO()) == ["DATABASE_URL"]
    assert environ["DATABASE_URL"] == "postgresql://other"


def test_the_file_is_private_and_removed_only_by_its_own_stack(tmp_path):
    path = dev_state.write(tmp_path, {"DATABASE_URL": "postgresql://dev"})
    assert path.stat().st_mode & 0o777 == 0o600
    assert dev_state.running_stack_pid(tmp_path) is None  # this process's own stack is not "another"
    dev_state.remove(tmp_path)
    assert not path.exists()
    write_stack(tmp_path.parent / tmp_path.name, {}, pid=1)
    dev_state.remove(tmp_path / ".driftlock")
    assert (tmp_path / ".driftlock" / dev_state.STACK_FILE).exists()
