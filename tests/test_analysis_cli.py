"""CLI tests of `flatpeft analyze` and `flatpeft preference` on the tiny offline fixture (tiny BERT + synthetic
reviews), plus the preference aggregation against independently computed statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from flatpeft.analysis.preference import (
    parse_fractions,
    preference_arms,
    run_preference,
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, single_thread_module):
    from flatpeft.experiments import train_run
    from _fixtures import tiny_config

    root = tmp_path_factory.mktemp("analysis_cli")
    cfg = tiny_config(root, train={"steps": 4})
    run_dir = root / "run"
    train_run(cfg, seed=0, out_dir=run_dir, progress=False)
    return cfg, run_dir


def test_analyze_cli_writes_sharpness_json_and_plots(tiny_run):
    from flatpeft.cli import main

    cfg, run_dir = tiny_run
    adapter_before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    rc = main(["analyze", str(run_dir), "--batches", "1", "--top-k", "2", "--hutchinson-samples", "4",
               "--points-1d", "5", "--points-2d", "3", "--ascent-steps", "2", "--no-progress"])
    assert rc == 0
    data = json.loads((run_dir / "sharpness.json").read_text())
    eig = data["top_eigenvalues"]
    assert len(eig) == 2 and eig[0] >= eig[1] and eig[0] > 0
    assert math.isfinite(data["trace"]) and data["trace_std_error"] > 0
    for granularity in ("tensor", "element"):
        pts = data["concentration"][granularity]
        assert pts[0] == [0.0, 0.0] and pts[-1] == pytest.approx([100.0, 1.0])
        xs, ys = zip(*pts)
        assert list(xs) == sorted(xs) and all(b >= a - 1e-12 for a, b in zip(ys, ys[1:]))
    # tensor-level first point = the largest ||g_p||^2 share, from the per-tensor table
    sq = np.array(data["tensors"]["grad_sq"])
    assert data["concentration"]["tensor"][1][1] == pytest.approx(sq.max() / sq.sum(), rel=1e-9)
    assert data["num_tensors"] == len(sq) and data["num_batches"] == 1
    assert data["worst_case"]["sharpness"] >= data["worst_case"]["sam_sharpness"]
    assert data["landscape_1d"]["losses"][2] == pytest.approx(data["loss"], rel=1e-6)
    for name in ("landscape_1d.png", "landscape_2d.png", "concentration.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before


def test_analyze_rejects_a_directory_without_config(tmp_path):
    from flatpeft.analysis.commands import analyze_run

    with pytest.raises(ValueError, match="config.yaml"):
        analyze_run(tmp_path)


def test_preference_arms_and_fractions():
    arms = preference_arms({"name": "flatpo", "rho": 0.1, "normalize_over": "selected"}, (0.05, 1.0))
    assert [a.label for a in arms] == ["base", "flatpo-top-0.05", "flatpo-random-0.05", "flatpo-top-1"]
    assert arms[2].method == {"name": "flatpo", "rho": 0.1, "normalize_over": "selected", "fraction": 0.05,
                              "selection": "random"}
    assert preference_arms({"name": "sam"}, (0.5,))[1].method["rho"] == 0.05
    assert parse_fractions("0.5, 0.01") == (0.01, 0.5)
    for bad in ("0", "1.5", "a", "0.1,0.1", ""):
        with pytest.raises(ValueError, match="--fractions"):
            parse_fractions(bad)


def _eval(path):
    return json.loads(path.read_text())


def test_preference_aggregation_against_numpy(tmp_path):
    """Every arm is a compare directory of real runs; the summary equals statistics computed here with
    numpy/scipy from the runs' own eval.json files."""
    from scipy import stats

    from _fixtures import tiny_config

    cfg = tiny_config(tmp_path / "cfg", method={"name": "flatpo", "rho": 0.05},
                      train={"steps": 2, "eval_splits": ["test"], "lr": 0.05})
    out = tmp_path / "pref"
    res = run_preference(cfg, fractions=(0.5, 1.0), seeds=3, out_dir=out, eig_ncv=4, progress=False)
    method = {"base": "base", "flatpo-top-0.5": "flatpo", "flatpo-random-0.5": "flatpo", "flatpo-top-1": "flatpo"}
    ev = {a: [_eval(out / a / m / f"seed{s}" / "eval.json") for s in range(3)] for a, m in method.items()}
    assert all("train_accuracy" in e for runs in ev.values() for e in runs)          # train split added for the gap
    cfgs = {a: yaml.safe_load((out / a / m / "seed0" / "config.yaml").read_text())["method"] for a, m in method.items()}
    assert cfgs["flatpo-random-0.5"]["selection"] == "random" and cfgs["flatpo-top-0.5"]["fraction"] == 0.5
    rows = {r["arm"]: r for r in res.summary}
    for label, runs in ev.items():
        a = np.array([e["accuracy"] for e in runs])
        r = rows[label]
        assert r["accuracy_mean"] == pytest.approx(100 * a.mean()) and r["accuracy_std"] == pytest.approx(100 * a.std(ddof=1))
        gap = 100 * (np.array([e["train_accuracy"] for e in runs]) - a)
        assert r["gap_mean"] == pytest.approx(gap.mean()) and r["gap_std"] == pytest.approx(gap.std(ddof=1), nan_ok=True)
        assert r["top_eigenvalue_mean"] == pytest.approx(np.mean([e["top_eigenvalue"] for e in runs]))
        if label != "base":
            d = 100 * (a - np.array([e["accuracy"] for e in ev["base"]]))
            assert r["diff_to_base_mean"] == pytest.approx(d.mean())
            if d.std(ddof=1) > 0:
                half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
                assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
            assert r["better_than_base"] == int((d > 0).sum())
    for name in ("preference.md", "preference.csv", "preference_runs.csv", "preference.png", "preference.json"):
        assert (out / name).is_file()
    with pytest.raises(ValueError, match="--overwrite"):
        run_preference(cfg, fractions=(0.5,), seeds=1, out_dir=out, progress=False)


def test_preference_cli_end_to_end_on_tiny_fixture(tiny_run, tmp_path, capsys):
    from flatpeft.cli import main
    from flatpeft.experiments import save_config

    cfg, _ = tiny_run
    cfg_path = save_config(cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "pref"
    rc = main(["--quiet", "preference", str(cfg_path), "--fractions", "0.5", "--seeds", "1", "--set", "train.steps=2",
               "--output-dir", str(out), "--eig-ncv", "6"])
    assert rc == 0
    runs = list(csv_rows(out / "preference_runs.csv"))
    assert [r["label"] for r in runs] == ["base", "flatpo-top-0.5", "flatpo-random-0.5"]
    for r in runs:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and math.isfinite(float(r["top_eigenvalue"]))
        ev = json.loads((out / r["label"] / r["method"] / "seed0" / "eval.json").read_text())
        assert ev["top_eigenvalue"] == pytest.approx(float(r["top_eigenvalue"]))
    assert (out / "preference.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "preference_runs.csv").read_bytes()
    rc = main(["--quiet", "preference", str(cfg_path), "--fractions", "0.5", "--seeds", "1", "--output-dir", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "preference_runs.csv").read_bytes() == before


def csv_rows(path):
    import csv

    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)


def test_preference_resume_reuses_finished_runs_and_checks_settings(tmp_path):
    from _fixtures import tiny_config

    cfg = tiny_config(tmp_path / "cfg", train={"steps": 2, "eval_splits": ["test"]})
    out = tmp_path / "pref"
    kw = dict(fractions=(0.5,), out_dir=out, eig_ncv=4, progress=False)
    run_preference(cfg, seeds=1, **kw)
    first = (out / "base" / "base" / "seed0" / "eval.json").read_bytes()
    res = run_preference(cfg, seeds=2, resume=True, **kw)
    assert (out / "base" / "base" / "seed0" / "eval.json").read_bytes() == first      # kept, not retrained
    assert (out / "flatpo-random-0.5" / "flatpo" / "seed1" / "eval.json").is_file()   # the new seed trained
    assert [r["seed"] for r in res.runs] == [0, 0, 0, 1, 1, 1]
    accs = [_eval(out / "base" / "base" / f"seed{s}" / "eval.json")["accuracy"] for s in (0, 1)]
    assert {r["arm"]: r["accuracy_mean"] for r in res.summary}["base"] == pytest.approx(100 * np.mean(accs))
    cfg.train.steps = 3
    with pytest.raises(ValueError, match="train.steps"):
        run_preference(cfg, seeds=1, resume=True, **kw)
    with pytest.raises(ValueError, match="mutually exclusive"):
        run_preference(cfg, seeds=1, overwrite=True, resume=True, **kw)
