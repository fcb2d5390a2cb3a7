"""CLI tests of `flatpeft analyze` and `flatpeft preference` on the tiny offline fixture (tiny BERT + synthetic
reviews), plus the preference aggregation against independently computed statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

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


def test_preference_aggregation_against_numpy(tmp_path):
    """A fake train_run with known metrics: the summary equals statistics computed here with numpy/scipy."""
    from scipy import stats

    from _fixtures import tiny_config

    cfg = tiny_config(tmp_path / "cfg", method={"name": "flatpo", "rho": 0.05})
    acc = {"base": [0.60, 0.70, 0.65], "flatpo-top-0.5": [0.62, 0.74, 0.66], "flatpo-random-0.5": [0.59, 0.71, 0.60],
           "flatpo-top-1": [0.61, 0.69, 0.70]}
    seen = []

    def fake_train_run(run_cfg, *, seed, out_dir, overwrite, extra_eval):
        label = out_dir.parent.name
        seen.append((label, seed, run_cfg.method, list(run_cfg.train.eval_splits)))
        a = acc[label][seed]
        return {"accuracy": a, "train_accuracy": 1.0 - 0.01 * seed, "top_eigenvalue": 10.0 * a + seed}

    res = run_preference(cfg, fractions=(0.5, 1.0), seeds=3, out_dir=tmp_path / "pref",
                         train_run=fake_train_run, progress=False)
    assert len(seen) == 12 and all("train" in s[3] for s in seen)
    assert {s[2]["selection"] for s in seen if s[0] != "base"} == {"topk", "random"}
    rows = {r["arm"]: r for r in res.summary}
    for label, a in acc.items():
        a = np.array(a)
        r = rows[label]
        assert r["accuracy_mean"] == pytest.approx(100 * a.mean()) and r["accuracy_std"] == pytest.approx(100 * a.std(ddof=1))
        gap = 100 * ((1.0 - 0.01 * np.arange(3)) - a)
        assert r["gap_mean"] == pytest.approx(gap.mean()) and r["gap_std"] == pytest.approx(gap.std(ddof=1))
        assert r["top_eigenvalue_mean"] == pytest.approx((10 * a + np.arange(3)).mean())
        if label != "base":
            d = 100 * (a - np.array(acc["base"]))
            half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
            assert r["diff_to_base_mean"] == pytest.approx(d.mean())
            assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
            assert r["better_than_base"] == int((d > 0).sum())
    for name in ("preference.md", "preference.csv", "preference_runs.csv", "preference.png", "preference.json"):
        assert (tmp_path / "pref" / name).is_file()
    md = (tmp_path / "pref" / "preference.md").read_text()
    assert "| flatpo-top-0.5 | 0.5 | 67.3 ± 6.1 |" in md
    with pytest.raises(ValueError, match="--overwrite"):
        run_preference(cfg, fractions=(0.5,), seeds=1, out_dir=tmp_path / "pref", train_run=fake_train_run,
                       progress=False)


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
        ev = json.loads((out / r["label"] / "seed0" / "eval.json").read_text())
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
    from flatpeft.experiments import save_config
    from _fixtures import tiny_config

    cfg = tiny_config(tmp_path / "cfg")
    calls = []

    def fake_train_run(run_cfg, *, seed, out_dir, overwrite, extra_eval):
        """Writes what train_run records: the resolved config, the manifest with the settings and the code."""
        from flatpeft.experiments.provenance import code_record
        from flatpeft.experiments.rundir import write_manifest
        from flatpeft.experiments.runner import _run_config

        calls.append((out_dir.parent.name, seed))
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(_run_config(run_cfg, seed, out_dir), out_dir / "config.yaml")
        write_manifest(out_dir, state="finished", code=code_record())
        metrics = {"accuracy": 0.5 + 0.1 * seed, "train_accuracy": 0.9, "top_eigenvalue": 1.0}
        (out_dir / "eval.json").write_text(json.dumps(metrics))
        return metrics

    out = tmp_path / "pref"
    run_preference(cfg, fractions=(0.5,), seeds=1, out_dir=out, train_run=fake_train_run, progress=False)
    assert len(calls) == 3
    calls.clear()
    res = run_preference(cfg, fractions=(0.5,), seeds=2, out_dir=out, train_run=fake_train_run, progress=False,
                         resume=True)
    assert sorted(calls) == [("base", 1), ("flatpo-random-0.5", 1), ("flatpo-top-0.5", 1)]
    assert [r["seed"] for r in res.runs] == [0, 0, 0, 1, 1, 1]
    assert {r["arm"]: r["accuracy_mean"] for r in res.summary}["base"] == pytest.approx(55.0)
    cfg.train.steps = 99
    with pytest.raises(ValueError, match="train"):
        run_preference(cfg, fractions=(0.5,), seeds=1, out_dir=out, train_run=fake_train_run, progress=False,
                       resume=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        run_preference(cfg, fractions=(0.5,), seeds=1, out_dir=out, overwrite=True, resume=True,
                       train_run=fake_train_run, progress=False)
