"""Spill folders across runs with different numbers of authz workers: every file lands where a process of the
next run restores from, and none is lost or copied."""

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from authz_service.usage.meter_store import read_spilled, spill
from authz_service.usage.refunds import NO_TERMS
from authz_service.usage.spill_dirs import TEST_SUBDIR, adopt_leftovers, worker_dir
from authz_service.usage.usage_ledger import Batch

PERIOD = datetime(2025, 1, 1, tzinfo=UTC)


def spill_one(folder: Path, units: int) -> uuid.UUID:
    batch = Batch(uuid.uuid4(), {("org", PERIOD, "stream", NO_TERMS): units})
    spill([batch], folder)
    return batch.flush_id


def restorable(root: Path, workers: int) -> dict[uuid.UUID, Path]:
    """Every flush id the processes of a run with `workers` processes would restore, and where it is."""
    owners = [worker_dir(root, None)] if workers == 1 else [worker_dir(root, i) for i in range(workers)]
    found: dict[uuid.UUID, Path] = {}
    for owner in owners:
        for folder in (owner, owner / TEST_SUBDIR):
            for path, batches in read_spilled(folder, on_corrupt=lambda p, e: pytest.fail(f"{p}: {e}")):
                for batch in batches:
                    assert batch.flush_id not in found, "a batch in two files"
                    found[batch.flush_id] = path
    return found


def every_file(root: Path) -> list[Path]:
    return sorted(root.rglob("meter-*.json"))


@pytest.mark.parametrize(
    ("before", "after"),
    [(1, 2), (3, 2), (2, 1), (4, 1), (1, 1), (2, 2), (2, 5)],
)
def test_what_a_run_left_is_restored_by_the_next_whatever_its_number_of_workers(tmp_path, before, after):
    owners = [worker_dir(tmp_path, None)] if before == 1 else [worker_dir(tmp_path, i) for i in range(before)]
    live, test = set(), set()
    for number, owner in enumerate(owners):
        live.add(spill_one(owner, number + 1))
        test.add(spill_one(owner / TEST_SUBDIR, 10 + number))
    adopt_leftovers(tmp_path, after)
    found = restorable(tmp_path, after)
    assert set(found) == live | test
    assert len(every_file(tmp_path)) == len(found), "a file outside every folder the next run restores from"
    # Test keys' files stay with test keys' meter, live keys' with the live meter.
    assert {flush_id for flush_id, path in found.items() if path.parent.name == TEST_SUBDIR} == test


def test_a_chain_of_runs_keeps_every_file(tmp_path):
    spilled: set[uuid.UUID] = set()
    for workers in (1, 3, 2, 1, 4):
        adopt_leftovers(tmp_path, workers)
        assert set(restorable(tmp_path, workers)) == spilled
        owners = [worker_dir(tmp_path, None)] if workers == 1 else [worker_dir(tmp_path, i) for i in range(workers)]
        spilled.add(spill_one(owners[-1], workers))
    assert len(every_file(tmp_path)) == len(spilled)


def test_leftover_worker_folders_go_once_emptied_and_corrupt_files_stay_for_an_operator(tmp_path):
    spill_one(worker_dir(tmp_path, 3), 1)
    (worker_dir(tmp_path, 4)).mkdir()
    corrupt = worker_dir(tmp_path, 5) / "meter-x.json.corrupt"
    corrupt.parent.mkdir()
    corrupt.write_text("{")
    moves = adopt_leftovers(tmp_path, 2)
    assert len(moves) == 1 and moves[0][1].parent == worker_dir(tmp_path, 0)
    assert not worker_dir(tmp_path, 3).exists() and not worker_dir(tmp_path, 4).exists()
    assert corrupt.exists()


def test_nothing_to_adopt_in_a_missing_folder(tmp_path):
    assert adopt_leftovers(tmp_path / "nowhere", 2) == []
    assert adopt_leftovers(tmp_path / "nowhere", 1) == []
