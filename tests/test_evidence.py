"""Evidence that can guide a user (issue 16): selection on validation data only, anchors, FlatPO's fraction curve,
learning-vs-forgetting curves, and results.json as the one file the page is rendered from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _fixtures import tiny_config
from flatpeft.experiments.config import config_to_dict

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- pieces with closed forms ---------------------------------------------------------------------------------
def test_interpolate_at_first_crossing():
    from flatpeft.experiments.evidence import interpolate_at

    curve = [[1, 0.2, 0.9], [2, 0.4, 0.7], [3, 0.8, 0.3], [4, 0.5, 0.1]]
    assert interpolate_at(curve, 0.3) == pytest.approx(0.8)          # halfway between steps 1 and 2
    assert interpolate_at(curve, 0.6) == pytest.approx(0.5)          # halfway between steps 2 and 3
    assert interpolate_at(curve, 0.1) == pytest.approx(0.9)          # already above at the first record
    assert interpolate_at(curve, 0.9) is None                        # never reached


def test_linear_probe_equals_scikit_learn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    from flatpeft.experiments.anchors import linear_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)) + np.repeat(np.eye(3, 5) * 2.0, 20, axis=0)
    y = np.repeat(np.arange(3), 20)
    t = rng.normal(size=(200, 5)) + np.repeat(np.eye(3, 5) * 2.0, [70, 70, 60], axis=0)
    l2 = 0.05
    ours = linear_probe(torch.tensor(x), y, torch.tensor(t), 3, l2=l2)
    mean, std = x.mean(0), x.std(0)
    ref = sklearn.LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10000)
    ref.fit((x - mean) / std, y)
    np.testing.assert_array_equal(ours, ref.predict((t - mean) / std))


def test_majority_class_ties_to_the_lowest_id():
    from flatpeft.experiments.anchors import majority_class

    assert majority_class(np.array([2, 1, 2, 1, 0]), 3) == 1
    assert majority_class(np.array([0, 0, 1, 1, 1]), 2) == 1


def test_text_anchors_leave_the_run_as_it_was(tmp_path):
    """train.anchors evaluates the majority and probe anchors before training; the run's training and test
    numbers are bit for bit those of the same run without them, and the anchors are what they claim."""
    from flatpeft.experiments.runner import train_run
    from flatpeft.experiments.text_classification import TextClassificationTask, classification_metrics

    cfg = tiny_config(tmp_path / "fx", train={"steps": 4, "eval_splits": ["test"], "log_every": 2})
    plain = train_run(cfg, out_dir=tmp_path / "plain", progress=False)
    cfg.train.anchors = True
    with_anchors = train_run(cfg, out_dir=tmp_path / "anchors", progress=False)
    for key in ("accuracy", "macro_f1", "final_loss"):
        assert plain[key] == with_anchors[key]
    task = TextClassificationTask(cfg, 0)
    y = task.splits["test"]["labels"]
    prior = np.bincount(task.pool_labels).argmax()
    expected = classification_metrics(y, np.full(len(y), prior), len(task.classes))
    assert with_anchors["anchor_majority_accuracy"] == pytest.approx(expected["accuracy"])
    assert with_anchors["anchor_majority_macro_f1"] == pytest.approx(expected["macro_f1"])
    assert 0.0 <= with_anchors["anchor_probe_accuracy"] <= 1.0
    again = task.anchors("test")["probe"]                                # deterministic: a convex fit from zero
    assert again["accuracy"] == pytest.approx(with_anchors["anchor_probe_accuracy"])


# ---- the pipeline ---------------------------------------------------------------------------------------------
def _evidence_plan(tmp_path: Path) -> Path:
    cfg = tiny_config(tmp_path / "fx", train={"steps": 3, "eval_splits": ["test"], "log_every": 1,
                                              "val_eval_steps": [1, 2, 3]})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    plan = {"output_dir": str(tmp_path / "runs"), "page": str(tmp_path / "results.md"), "seeds": 2,
            "methods": ["base", "sam", "flatpo"], "threads": 1, "jobs": 1,
            "tasks": [{"name": "tiny", "config": str(cfg_path), "metrics": ["macro_f1", "accuracy"],
                       "select": {"seeds": [100], "grid": {"base": {"train.lr": [0.002, 0.02]},
                                                           "sam": {"method.rho": [0.01, 0.1]},
                                                           "flatpo": {"method.rho": [0.05]}}},
                       "fraction": {"fractions": [0.5, 1.0]},
                       "tradeoff": {"downstream": "val_accuracy", "retained": "val_macro_f1"}}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_suite_selects_on_validation_then_tests_at_the_selected_setting(tmp_path):
    from flatpeft.cli import main

    plan = _evidence_plan(tmp_path)
    assert main(["--quiet", "suite", str(plan)]) == 0
    runs = tmp_path / "runs"
    # 1. the grid: validation seeds only, and the test split is never evaluated
    scores = {}
    for m, key, values in (("base", "lr", [0.002, 0.02]), ("sam", "rho", [0.01, 0.1])):
        for v in values:
            ev = json.loads((runs / f"tiny__select__{m}__{key}={v}" / m / "seed100" / "eval.json").read_text())
            assert "accuracy" not in ev and "anchor_probe_accuracy" not in ev and "val_macro_f1" in ev
            scores.setdefault(m, []).append((ev["val_macro_f1"], v))
    expected = {m: max(s, key=lambda p: (p[0], -s.index(p)))[1] for m, s in scores.items()}   # ties: first listed
    # 2. every method at its own selected setting, with the test seeds; base's runs carry the anchors
    base_cfg = yaml.safe_load((runs / "tiny__base/base/seed1/config.yaml").read_text())
    sam_cfg = yaml.safe_load((runs / "tiny__sam/sam/seed0/config.yaml").read_text())
    assert base_cfg["train"]["lr"] == expected["base"] and sam_cfg["method"]["rho"] == expected["sam"]
    assert "anchor_probe_macro_f1" in json.loads((runs / "tiny__base/base/seed0/eval.json").read_text())
    assert "anchor_probe_macro_f1" not in json.loads((runs / "tiny__sam/sam/seed0/eval.json").read_text())
    # 3. the fraction curve: top and random at 0.5, only top at 1
    for arm in ("topk-0.5", "random-0.5", "topk-1"):
        cfg = yaml.safe_load((runs / f"tiny__fraction__{arm}/flatpo/seed1/config.yaml").read_text())
        assert cfg["method"]["selection"] == arm.split("-")[0] and cfg["method"]["rho"] == 0.05
    assert not (runs / "tiny__fraction__random-1").exists()
    # 4. results.json holds it all; the page shows its numbers
    res = json.loads((tmp_path / "results.json").read_text())
    t = res["tasks"]["tiny"]
    assert {m: t["selection"][m]["selected"] for m in ("base", "sam")} == {
        "base": f"lr={expected['base']}", "sam": f"rho={expected['sam']}"}
    sam = [json.loads((runs / f"tiny__sam/sam/seed{s}/eval.json").read_text())["macro_f1"] for s in (0, 1)]
    base = [json.loads((runs / f"tiny__base/base/seed{s}/eval.json").read_text())["macro_f1"] for s in (0, 1)]
    assert t["comparisons"]["sam"]["macro_f1"]["mean"] == pytest.approx(np.mean(np.subtract(sam, base)))
    assert set(t["anchors"]) == {"majority", "probe"} and t["anchor_check"]["metric"] == "macro_f1"
    assert [r["fraction"] for r in t["fraction"]["rows"]] == [0.5, 1.0] and "top_minus_random" in t["fraction"]["rows"][0]
    assert set(t["tradeoff"]["curves"]) == {"base", "sam", "flatpo"} and len(t["tradeoff"]["curves"]["base"]["0"]) == 3
    page = (tmp_path / "results.md").read_text()
    assert f"{100 * np.mean(sam):.1f}" in page and "fraction curve" in page and "Selected settings" in page
    assert f"**lr={expected['base']}" in page
    for png in ("tiny.png", "tiny_selection.png", "tiny_fraction.png", "tiny_tradeoff.png"):
        assert (tmp_path / "results" / png).is_file()
    # 5. resume: nothing retrained
    stamp = (runs / "tiny__sam/sam/seed0/eval.json").stat().st_mtime_ns
    assert main(["--quiet", "suite", str(plan)]) == 0
    assert (runs / "tiny__sam/sam/seed0/eval.json").stat().st_mtime_ns == stamp


def test_plan_sections_are_checked_by_name(tmp_path, capsys):
    from flatpeft.cli import main

    plan = _evidence_plan(tmp_path)
    data = yaml.safe_load(plan.read_text())
    for change, message in (
            (lambda t: t["select"].update(grid={"sam": {"rho": [0.1]}}), "is not a config key"),
            (lambda t: t["select"].update(grid={"sam": {"method.rho": []}}), "non-empty list"),
            (lambda t: t["fraction"].update(fractions=[0.0, 1.0]), "fractions in (0, 1]"),
            (lambda t: t["select"].update(bogus=1), "unknown key(s) bogus")):
        bad = json.loads(json.dumps(data))
        change(bad["tasks"][0])
        plan.write_text(yaml.safe_dump(bad))
        assert main(["suite", str(plan), "--list"]) == 2
        assert message in capsys.readouterr().err


def test_a_diverged_grid_point_is_never_selected_and_the_suite_carries_on(tmp_path):
    from flatpeft.cli import main

    plan = _evidence_plan(tmp_path)
    data = yaml.safe_load(plan.read_text())
    t = data["tasks"][0]
    t["select"]["grid"] = {"base": {"train.lr": [1.0e30, 0.002]}}   # the first point diverges at once
    data["methods"] = ["base"]
    t.pop("fraction")
    plan.write_text(yaml.safe_dump(data))
    assert main(["--quiet", "suite", str(plan)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    sel = res["tasks"]["tiny"]["selection"]["base"]
    assert sel["points"][0]["failed"] == [100] and sel["points"][0]["mean"] is None
    assert sel["selected"] == "lr=0.002"
    assert yaml.safe_load((tmp_path / "runs/tiny__base/base/seed0/config.yaml").read_text())["train"]["lr"] == 0.002
    assert "diverged: seed 100" in (tmp_path / "results.md").read_text()


def test_tasks_declare_their_metrics_and_retained_ratios_follow():
    """Issue 19: a metric's meaning comes from the task's declaration, not from its name's suffix."""
    from flatpeft.experiments.evidence import _add_retained, metric_info

    clip = metric_info("clip_fewshot")
    assert clip["seen_classes_accuracy"]["before"] == "seen_classes_accuracy_before"
    assert clip["seen_classes_accuracy_retained"]["percent"] is True
    vlm = metric_info("vlm_instruct")
    assert vlm["ppl_after"] == {"percent": False, "before": "ppl_before", "higher_is_better": False}
    assert set(metric_info("text_classification")) == {"accuracy", "macro_f1"} and metric_info("nope") == {}
    arms = {"base": {"seeds": {0: {"seen_classes_accuracy": 0.5, "seen_classes_accuracy_before": 0.8},
                               1: {"seen_classes_accuracy": 0.6, "seen_classes_accuracy_before": 0.0}}}}
    assert _add_retained(arms, ["accuracy", "seen_classes_accuracy"], clip) == ["seen_classes_accuracy_retained"]
    assert arms["base"]["seeds"][0]["seen_classes_accuracy_retained"] == pytest.approx(0.625)
    assert "seen_classes_accuracy_retained" not in arms["base"]["seeds"][1]        # no before value: no ratio


def test_curve_reads_validation_records_and_the_step_zero_point(tmp_path):
    from flatpeft.experiments.evidence import _curve

    recs = [{"step": 10, "loss": 1.0}, {"step": 10, "val_accuracy": 0.4, "val_seen": 0.7, "val_zs": 0.1,
                                        "val_seen_before": 0.9},
            {"step": 20, "val_accuracy": 0.6, "val_seen": 0.5, "val_zs": 0.1, "val_seen_before": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert _curve(tmp_path, "val_accuracy", "val_seen") == [[10, 0.4, 0.7], [20, 0.6, 0.5]]
    assert _curve(tmp_path, "val_accuracy", "val_seen", ["val_zs", "val_seen_before"])[0] == [0, 0.1, 0.9]
