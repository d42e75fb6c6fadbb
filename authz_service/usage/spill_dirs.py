"""Where each authz process spills, and who replays what a previous run left behind.

One process (`--workers 1`) spills to DRIFTLOCK_METER_SPILL_DIR itself; with N workers, worker i spills to
`worker-<i>/` under it. Test keys' meter spills to `test/` under either. A spill file is replayed by whichever
process restores from the folder it is in, so before any process of a run starts, `adopt_leftovers` moves the
files that no process of this run would look at (the root's after a run with one process, `worker-5/`'s after a
run with six workers) into the folders of this run's processes. A move is a rename within one file system: a
file is in its old folder or its new one, never lost nor doubled, whenever the machine stops; and replaying a
file twice counts nothing twice anyway (flush ids).
"""

import logging
import os
import re
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

TEST_SUBDIR = "test"
# The meter of keys with a cap of their own (issue 20) spills here, under either.
KEYS_SUBDIR = "keys"
_WORKER_DIR = re.compile(r"worker-(\d+)")
_SPILL_FILE = "meter-*.json"


def worker_dir(root: Path, index: int | None) -> Path:
    """The folder a process spills to: the root for the one process of a run without workers, else its own."""
    return root if index is None else root / f"worker-{index}"


def _owners(root: Path, workers: int) -> list[Path]:
    return [root] if workers == 1 else [worker_dir(root, i) for i in range(workers)]


def _leftover_folders(root: Path, workers: int) -> list[Path]:
    """Folders holding spill files that no process of a run with `workers` processes restores from."""
    owners = set(_owners(root, workers))
    found = [root] if workers > 1 else []
    if root.is_dir():
        found += sorted(
            (p for p in root.iterdir() if p.is_dir() and _WORKER_DIR.fullmatch(p.name) and p not in owners),
            key=lambda p: int(p.name.split("-")[1]),
        )
    return found


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_leftovers(root: Path, workers: int) -> list[tuple[Path, Path]]:
    """Move every spill file this run's processes would not restore into one of their folders (in turn), before
    any of them starts; returns the moves. Only one process may call it at a time, and none may be spilling."""
    owners = _owners(root, workers)
    moves = []
    turn = 0
    for folder in _leftover_folders(root, workers):
        for sub in ("", TEST_SUBDIR, KEYS_SUBDIR):
            source = folder / sub if sub else folder
            if not source.is_dir():
                continue
            for path in sorted(source.glob(_SPILL_FILE)):
                target_dir = owners[turn % len(owners)]
                target_dir = target_dir / sub if sub else target_dir
                turn += 1
                target_dir.mkdir(parents=True, exist_ok=True)
                target = target_dir / path.name
                if target.exists():  # names carry a random uuid; never replace a file that is there
                    target = target_dir / f"meter-{uuid.uuid4()}.json"
                path.replace(target)
                _fsync_dir(target_dir)
                _fsync_dir(source)
                moves.append((path, target))
        for sub in (TEST_SUBDIR, KEYS_SUBDIR, ""):  # a worker folder left empty goes; the root stays
            emptied = folder / sub if sub else folder
            if folder != root or sub:
                try:
                    emptied.rmdir()
                except OSError:
                    pass  # not empty (a .corrupt file kept for an operator) or not there
    if moves:
        log.info(
            "%d spill file(s) left by a run with another number of workers will be replayed by this run's: %s",
            len(moves),
            ", ".join(f"{a.relative_to(root)} -> {b.relative_to(root)}" for a, b in moves),
        )
    return moves
