"""`flatpeft analyze` defaults sized for a working day: the Hessian parts behind flags, small landscapes, and the
plan (what will be computed, estimated time) printed before the work starts."""
from __future__ import annotations

import json

import pytest

from flatpeft.analysis.pipeline import AnalysisSettings, describe_plan, plan_costs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, single_thread_module):
    from _fixtures import tiny_config
    from flatpeft.experiments import train_run

    root = tmp_path_factory.mktemp("analysis_defaults")
    run_dir = root / "run"
    train_run(tiny_config(root, train={"steps": 3}), seed=0, out_dir=run_dir, progress=False)
    return run_dir


def test_defaults_are_the_cheap_ones():
    s = AnalysisSettings()
    assert (s.top_k, s.hutchinson_samples, s.ascent_steps, s.landscape_points_1d, s.landscape_points_2d) == (0, 0, 2, 11, 0)
    with pytest.raises(ValueError):
        AnalysisSettings(hutchinson_samples=1)
    with pytest.raises(ValueError):
        AnalysisSettings(landscape_points_2d=2)


def test_plan_costs_scale_the_timings():
    s = AnalysisSettings(landscape_points_2d=5)
    parts = dict((name.split(" (")[0], sec) for name, _, sec in plan_costs(s, 26, loss_s=1.0, gradient_s=3.0))
    assert parts["per-tensor rho-step scores + concentration curves"] == pytest.approx(27.0)
    assert parts["worst-case sharpness, SAM and ASAM balls"] == pytest.approx(2 * 3 * 3.0 + 2.0)
    assert parts["1-D landscape"] == pytest.approx(11.0) and parts["2-D landscape"] == pytest.approx(25.0)
    # MiniLM on 2 busy cores (one loss evaluation ~1 s, one gradient ~6 s at 1 batch): about 2 minutes
    total = sum(sec for _, _, sec in plan_costs(AnalysisSettings(), 26, loss_s=1.0, gradient_s=6.0))
    assert 60 < total < 120
    full = AnalysisSettings(top_k=3, hutchinson_samples=32, ascent_steps=5, landscape_points_1d=21,
                            landscape_points_2d=11)
    assert sum(sec for _, _, sec in plan_costs(full, 26, 1.0, 6.0)) > 10 * total
    text = describe_plan(s, 74496, 26, 1, 1.0, 6.0)
    assert "will compute" in text and "estimated total" in text and "--top-k" in text and "74,496" in text


def test_analyze_defaults_end_to_end(tiny_run, capsys):
    from flatpeft.cli import main

    assert main(["analyze", str(tiny_run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "one loss evaluation" in err and "will compute" in err and "estimated total" in err
    assert "skipped (flags turn them on)" in err
    data = json.loads((tiny_run / "sharpness.json").read_text())
    assert data["top_eigenvalues"] == [] and data["num_batches"] == 1
    assert len(data["landscape_1d"]["losses"]) == 11 and data["landscape_2d"] == {}
    assert len(data["worst_case"]["history"]) == 3
    assert {"loss", "gradient", "total"} <= set(data["timings_s"])
    assert (tiny_run / "landscape_1d.png").is_file()


def test_analyze_full_and_skips(tiny_run, capsys):
    from flatpeft.cli import main

    assert main(["analyze", str(tiny_run), "--no-progress", "--full", "--batches", "1", "--points-2d", "3",
                 "--points-1d", "5", "--hutchinson-samples", "4"]) == 0
    data = json.loads((tiny_run / "sharpness.json").read_text())
    assert len(data["top_eigenvalues"]) == 3 and data["settings"]["ascent_steps"] == 5
    assert len(data["landscape_2d"]["losses"]) == 3 and data["settings"]["hutchinson_samples"] == 4
    assert (tiny_run / "landscape_2d.png").is_file()
