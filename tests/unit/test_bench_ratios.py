"""The bench's rule for figures that reproduce: a ratio is quoted with its baseline's rate and the spread of its
rounds, a disturbed run says so, and the published figure is the median of clean runs only."""

import pytest

from bench.harness import SideBySide, runs_summary


def test_a_ratio_is_the_median_of_the_rounds_ratios_with_the_baseline_rate_beside_it():
    measured = SideBySide("grpc", "authz", ours=[5400, 5000, 5700], base=[6000, 5500, 6000])
    assert measured.ratios == pytest.approx([0.90, 0.909, 0.95], abs=1e-3)
    assert measured.ratio == pytest.approx(0.909, abs=1e-3)
    assert measured.disturbance() is None
    assert measured.ratio_cell().startswith("0.91x do-nothing (6,000/s), rounds 0.90-0.95")


def test_rounds_that_disagree_mark_the_run_disturbed():
    measured = SideBySide("grpc", "authz", ours=[5400, 4000], base=[6000, 6000])
    assert "spread 0.23" in (measured.disturbance() or "")
    assert "DISTURBED" in measured.ratio_cell()


def test_a_baseline_far_below_its_usual_rate_marks_the_run_disturbed(monkeypatch):
    monkeypatch.setenv("BENCH_USUAL_GRPC_RPS", "6000")
    measured = SideBySide("grpc", "authz", ours=[2000, 2000], base=[2200, 2200])
    assert "far below its usual 6,000/s" in (measured.disturbance() or "")


def test_the_published_figure_is_the_median_of_clean_runs_only():
    clean = [SideBySide("edge", "Envoy + authz", [2900, 2900], [3100, 3100]) for _ in range(2)]
    disturbed = SideBySide("edge", "Envoy + authz", [1000, 2900], [3100, 3100])
    ((_part, what, figure, each),) = runs_summary([*clean, disturbed])
    assert what == "Envoy + authz: median of 3 runs"
    assert figure == "0.94x"
    assert each.count("*") == 1


def test_no_figure_when_most_runs_were_disturbed():
    runs = [SideBySide("edge", "x", [1000, 2900], [3100, 3100]) for _ in range(3)]
    assert runs_summary(runs)[0][2] == "no clean figure"
