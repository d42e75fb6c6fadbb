"""What a running `dev` stack tells the CLI beside it, so that every line its banner prints works pasted alone in a
new terminal in the checkout.

`dev` writes `<state dir>/stack.json` (readable by this user only, like the generated secrets beside it): its
PID and the settings it generated or chose (the embedded database's URL, the webhook and admin secrets, the local
Stripe API, the ports), and removes it when it stops. The CLI, run with no such setting of its own, takes them
from there: from `$DRIFTLOCK_DEV_DIR`, else from the nearest `.driftlock/` in the working directory or above
it, and says so on stderr. A setting in the environment always wins; a file whose stack is gone is ignored.
"""

import json
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO

STACK_FILE = "stack.json"
DEFAULT_DIR = ".driftlock"
# The services are configured by their operator, never by a file a dev stack left in the working directory.
COMMANDS_THAT_IGNORE_IT = frozenset({"dev", "authz", "webhooks", "envoy"})


def write(state_dir: Path, env: Mapping[str, str]) -> Path:
    path = state_dir / STACK_FILE
    path.unlink(missing_ok=True)
    # Created 0600 before anything is written: it holds the generated secrets too.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"pid": os.getpid(), "env": dict(env)}, file, indent=2)
    return path


def remove(state_dir: Path) -> None:
    path = state_dir / STACK_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The stack file this CLI would read: under $DRIFTLOCK_DEV_DIR when set, else the nearest .driftlock/."""
    configured = environ.get("DRIFTLOCK_DEV_DIR", "").strip()
    if configured:
        path = (cwd / configured / STACK_FILE).resolve()
        return path if path.is_file() else None
    for folder in (cwd, *cwd.parents):
        path = folder / DEFAULT_DIR / STACK_FILE
        if path.is_file():
            return path
    return None


def running_stack_pid(state_dir: Path) -> int | None:
    """The PID of a dev stack still running on this state directory, if any."""
    try:
        pid = json.loads((state_dir / STACK_FILE).read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if _alive(pid) and pid != os.getpid() else None


def adopt_for_this_process() -> list[str]:
    """`adopt` into this process's environment, from the working directory, before Settings reads it: the one
    place besides settings.py that touches the environment, because it is where these settings come from."""
    return adopt(os.environ, Path.cwd())


def adopt(environ: MutableMapping[str, str], cwd: Path, err: IO[str] | None = None) -> list[str]:
    """Put the running dev stack's settings into `environ` where it has none; the names taken."""
    path = find(environ, cwd)
    if path is None:
        return []
    stream = err or sys.stderr
    try:
        saved = json.loads(path.read_text())
        pid, env = saved["pid"], saved["env"]
        if not isinstance(env, dict):
            raise ValueError("no settings")
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not _alive(pid):
        print(f"driftlock-gateway: ignoring {path}: the dev stack that wrote it is not running", file=stream)
        return []
    taken = sorted(name for name, value in env.items() if isinstance(value, str) and name not in environ)
    if not taken:
        return []
    for name in taken:
        environ[name] = env[name]
    shown = ", ".join(name for name in taken if name in ("DATABASE_URL", "STRIPE_API_BASE")) or taken[0]
    print(
        f"driftlock-gateway: using the dev stack running in {path.parent} ({len(taken)} settings from "
        f"{STACK_FILE}, e.g. {shown}; the environment's own win)",
        file=stream,
        flush=True,
    )
    return taken
