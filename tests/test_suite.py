"""flatpeft suite (tiny plan on the test fixtures, resume, the page) and the task options it relies on:
label noise applied exactly as stated, the distribution-shift split without overlap, the test subset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from _fixtures import tiny_config
from flatpeft.experiments.config import config_to_dict
from flatpeft.experiments.text_classification import (DRINK_WORDS, TextClassificationArgs, apply_shift, flip_labels,
                                                      is_drink_review)

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- label noise -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,fraction,classes", [(64, 0.3, 2), (32, 0.3, 2), (50, 0.2, 5), (10, 0.0, 3)])
def test_flip_labels_exact_count_never_true_class(n, fraction, classes):
    y = np.arange(n) % classes
    noisy, where = flip_labels(y, fraction, classes, seed=3)
    assert len(where) == round(fraction * n) == int((noisy != y).sum())
    assert np.array_equal(np.flatnonzero(noisy != y), where)
    assert noisy.min() >= 0 and noisy.max() < classes
    again, _ = flip_labels(y, fraction, classes, seed=3)
    assert np.array_equal(noisy, again)                       # paired: same seed, same noisy set
    other, _ = flip_labels(y, fraction, classes, seed=4)
    assert fraction == 0 or not np.array_equal(noisy, other)


def test_flip_labels_symmetric_over_other_classes():
    y = np.zeros(30000, np.int64)
    noisy, where = flip_labels(y, 0.5, 4, seed=0)
    counts = np.bincount(noisy[where], minlength=4)
    assert counts[0] == 0
    assert np.allclose(counts[1:] / len(where), 1 / 3, atol=0.02)


def test_task_applies_noise_to_train_only(tmp_path):
    from flatpeft.experiments.tasks import get_task

    cfg = tiny_config(tmp_path, data={"shots": 10, "val_size": 20}, task_args={"label_noise": 0.3})
    task = get_task(cfg.task)(cfg, 0)
    train = task.splits["train"]["labels"]
    assert len(task.flipped) == 6 == int((train != task.clean_train_labels).sum())
    clean = get_task(cfg.task)(tiny_config(tmp_path / "c", data={"shots": 10, "val_size": 20}), 0)
    assert np.array_equal(clean.splits["train"]["labels"], task.clean_train_labels)
    for split in ("val", "test"):                              # clean evaluation labels
        assert np.array_equal(clean.splits[split]["labels"], task.splits[split]["labels"])


def test_task_args_refuse_bad_values():
    with pytest.raises(ValueError, match="label_noise"):
        TextClassificationArgs(label_noise=1.0)
    with pytest.raises(ValueError, match="shift"):
        TextClassificationArgs(shift="beverages")
    with pytest.raises(ValueError, match="test_size"):
        TextClassificationArgs(test_size=0)


# ---- distribution shift --------------------------------------------------------------------------------------
def test_drink_shift_has_no_overlap():
    pool = pd.DataFrame({"text": ["great coffee", "nice cookie", "Tea was bad", "bland chips", "k-cups ok",
                                  "my teapot", "steak"], "label": [1, 1, 0, 0, 1, 0, 1], "product": list("abcdefg")})
    test = pd.DataFrame({"text": ["sweet juice", "crackers", "A DRINK"], "label": [1, 0, 0], "product": list("hij")})
    tr, te = apply_shift(pool, test, "text", "drinks")
    assert not is_drink_review(tr["text"]).any() and is_drink_review(te["text"]).all()
    assert set(tr["text"]) & set(te["text"]) == set()
    assert set(tr["product"]) & set(te["product"]) == set()
    assert len(tr) + len(te) == len(pool) + sum(is_drink_review(test["text"]))
    assert "my teapot" in set(tr["text"])                      # whole words only
    assert "drink" in DRINK_WORDS


def test_task_shift_and_test_subset(tmp_path):
    from flatpeft.experiments.tasks import get_task

    cfg = tiny_config(tmp_path, data={"shots": 5, "val_size": 10}, task_args={"shift": "drinks", "test_size": 7})
    task = get_task(cfg.task)(cfg, 0)
    texts = [task.tokenizer.decode(ids, skip_special_tokens=True) for ids in task.splits["test"]["input_ids"]]
    train = [task.tokenizer.decode(ids, skip_special_tokens=True) for ids in task.splits["train"]["input_ids"]]
    assert len(texts) == 7 and all(("coffee" in t or "tea" in t) for t in texts)
    assert not any(("coffee" in t.split() or "tea" in t.split()) for t in train)


# ---- the suite -----------------------------------------------------------------------------------------------
def _plan(tmp_path: Path, seeds=2, extra_task=False) -> Path:
    cfg = tiny_config(tmp_path / "fx", train={"steps": 3, "eval_splits": ["test"], "log_every": 1},
                      task_args={"label_noise": 0.2})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    plan = {"output_dir": str(tmp_path / "runs"), "page": str(tmp_path / "results.md"), "seeds": seeds,
            "methods": ["base", "sam", "flatpo"], "threads": 1, "jobs": 1,
            "tasks": [{"name": "tiny_noisy", "config": str(cfg_path), "set": ["train.lr=0.01"],
                       "ablations": [{"name": "scope-all", "method": "flatpo", "set": ["method.scope=all"]}],
                       "description": "Tiny fixture."},
                      {"name": "tiny_cut", "config": str(cfg_path), "enabled": False,
                       "skip_reason": "not in the budget"}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_suite_runs_resumes_and_writes_page(tmp_path, capsys):
    from flatpeft.cli import main

    plan = _plan(tmp_path)
    assert main(["--quiet", "suite", str(plan)]) == 0
    runs = tmp_path / "runs"
    evals = sorted(p.relative_to(runs).as_posix() for p in runs.glob("*/*/seed*/eval.json"))
    assert evals == ["tiny_noisy/base/seed0/eval.json", "tiny_noisy/base/seed1/eval.json",
                     "tiny_noisy/flatpo/seed0/eval.json", "tiny_noisy/flatpo/seed1/eval.json",
                     "tiny_noisy/sam/seed0/eval.json", "tiny_noisy/sam/seed1/eval.json",
                     "tiny_noisy__scope-all/flatpo/seed0/eval.json", "tiny_noisy__scope-all/flatpo/seed1/eval.json"]
    cfg = yaml.safe_load((runs / "tiny_noisy__scope-all/flatpo/seed0/config.yaml").read_text())
    assert cfg["method"]["scope"] == "all" and cfg["train"]["lr"] == 0.01 and cfg["task_args"]["label_noise"] == 0.2
    page = (tmp_path / "results.md").read_text()
    assert "## Summary" in page and "## tiny_noisy" in page and "flatpo (scope-all)" in page
    assert "tiny_cut" in page and "not in the budget" in page
    assert "cannot resolve" in page or "supports" in page or "refutes" in page
    assert (tmp_path / "results" / "tiny_noisy.png").is_file()
    acc = json.loads((runs / "tiny_noisy/sam/seed1/eval.json").read_text())["accuracy"]
    assert f"{100 * acc:.1f}" in page                          # numbers come from the runs
    log = json.loads((runs / "suite_log.json").read_text())
    assert len(log["invocations"]) == 1 and {u["unit"] for u in log["invocations"][0]["units"]} == {
        "tiny_noisy", "tiny_noisy__scope-all"}

    # resume: nothing retrained, one more seed only adds its runs
    mtime = (runs / "tiny_noisy/base/seed0/eval.json").stat().st_mtime_ns
    data = yaml.safe_load(plan.read_text())
    data["seeds"] = 3
    plan.write_text(yaml.safe_dump(data))
    assert main(["--quiet", "suite", str(plan)]) == 0
    assert (runs / "tiny_noisy/base/seed0/eval.json").stat().st_mtime_ns == mtime
    assert (runs / "tiny_noisy/sam/seed2/eval.json").is_file()
    assert (runs / "tiny_noisy__scope-all/flatpo/seed2/eval.json").is_file()
    # a resume with nothing left to train is logged but adds no wall time or load to the page
    assert main(["--quiet", "suite", str(plan)]) == 0
    log = json.loads((runs / "suite_log.json").read_text())
    assert [sorted(u["trained"] for u in inv["units"]) for inv in log["invocations"]] == [[2, 6], [1, 3], [0, 0]]
    assert "over 2 invocation(s)" in (tmp_path / "results.md").read_text()

    # changed settings are refused by compare's guard (reported, nothing retrained)
    data["tasks"][0]["set"] = ["train.lr=0.02"]
    plan.write_text(yaml.safe_dump(data))
    main(["--quiet", "suite", str(plan)])
    assert "settings differ" in capsys.readouterr().out
    assert (runs / "tiny_noisy/base/seed0/eval.json").stat().st_mtime_ns == mtime


def test_suite_list_and_plan_errors(tmp_path, capsys):
    from flatpeft.cli import main

    plan = _plan(tmp_path)
    assert main(["suite", str(plan), "--list"]) == 0
    out = capsys.readouterr().out
    assert "tiny_noisy: " in out and "tiny_noisy__scope-all" in out and "not in the default plan" in out
    assert main(["suite", str(plan), "--tasks", "nope"]) == 2
    data = yaml.safe_load(plan.read_text())
    data["bogus"] = 1
    plan.write_text(yaml.safe_dump(data))
    assert main(["suite", str(plan)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_default_plan_loads():
    from flatpeft.experiments.suite import load_plan, units

    root = Path(__file__).resolve().parents[1]
    plan = load_plan(root / "configs" / "suite.yaml")
    assert {t.name for t in plan.tasks} >= {"finefoods_noisy", "finefoods_shift", "vlm_forgetting", "clip_fewshot"}
    for u in units(plan):
        if u.phase == "select":        # validation seeds, never a test seed
            assert not set(u.seeds) & set(plan.task_seeds(u.task)) and "train.eval_splits=[val]" in u.overrides
        else:
            assert len(u.seeds) >= 10
    enabled = [t for t in plan.tasks if t.enabled]
    assert enabled and all(t.select is not None and set(t.select.grid) == set(plan.task_methods(t)) for t in enabled)
    for t in enabled:                   # radii span at least 1.5 decades
        for m, keys in t.select.grid.items():
            if "method.rho" in keys:
                assert np.log10(max(keys["method.rho"]) / min(keys["method.rho"])) >= 1.5, (t.name, m)


# ---- the small-VLM setting's new options -------------------------------------------------------------------------
def test_vlm_validation_split_is_disjoint_from_prealignment_and_shots():
    from flatpeft.experiments.sampling import sample_shots
    from flatpeft.multimodal.data import DOWNSTREAM_CLASSES, SEEN_CLASSES
    from flatpeft.multimodal.vlm_instruct import VLMPrealignSettings, validation_split

    ytr = np.random.default_rng(0).integers(0, 10, size=6000).astype(np.uint8)   # labels are uint8 on disk
    settings = VLMPrealignSettings(per_class=100)
    val_idx, shot_labels = validation_split(ytr, 20, settings)
    assert len(val_idx) == 200 and len(set(val_idx.tolist())) == 200
    assert np.bincount(ytr[val_idx], minlength=10).tolist() == [20] * 10
    pre = sample_shots(ytr, settings.per_class, settings.seed, classes=SEEN_CLASSES)
    assert not set(val_idx.tolist()) & set(pre.tolist())
    for seed in range(5):
        shots = sample_shots(shot_labels, 20, seed, classes=DOWNSTREAM_CLASSES)
        assert not set(shots.tolist()) & set(val_idx.tolist())


def test_vlm_args_validate_new_options():
    from flatpeft.multimodal.vlm_instruct import VLMInstructArgs

    assert VLMInstructArgs(caption_fraction=0.3, val_per_class=20).val_per_class == 20
    with pytest.raises(ValueError, match="caption_fraction"):
        VLMInstructArgs(caption_fraction=1.5)
    with pytest.raises(ValueError, match="val_per_class"):
        VLMInstructArgs(val_per_class=-1)


def test_task_groups_split_methods_exactly(tmp_path):
    from flatpeft.experiments.suite import SuitePlan, SuiteTask, task_groups, units

    t = SuiteTask(name="t", config="c.yaml", groups=[["base", "sam"], ["flatpo"]])
    plan = SuitePlan(tasks=[t], methods=["base", "sam", "flatpo"], seeds=10)
    assert task_groups(plan, t) == [("t", ["base", "sam"]), ("t__g2", ["flatpo"])]
    assert [u.name for u in units(plan)] == ["t", "t__g2"] and units(plan)[0].seeds == list(range(10))
    t.groups = [["base"], ["flatpo"]]
    with pytest.raises(ValueError, match="groups must split"):
        task_groups(plan, t)


def test_claims_test_ablations_and_flag_identical_methods():
    """A claim about SPIDER is tested with SPIDER's default and with its ablation on the same task; a method
    that gave base's number on every seed is flagged, not counted as support or refutation."""
    from flatpeft.experiments.evidence import IDENTICAL, _claims, claim_verdict, paired
    from flatpeft.experiments.suite import SuitePlan

    seen = {"base": [0.50, 0.60, 0.40], "spider": [0.50, 0.60, 0.40], "spider (mask-all)": [0.60, 0.65, 0.50]}
    arm = lambda m, method, abl=None: {"method": method, "phase": "test", "ablation": abl,
                                       "seeds": {s: {"seen_classes_accuracy": v} for s, v in enumerate(seen[m])}}
    arms = {"base": arm("base", "base"), "spider": arm("spider", "spider"),
            "spider (mask-all)": arm("spider (mask-all)", "spider", "mask-all")}
    claim = {"id": "x", "kind": "forgets-less", "paper": "SPIDER", "claim": "forgets less",
             "metric": "seen_classes_accuracy", "a": "spider", "b": "base"}
    plan = SuitePlan(tasks=[], claims=[claim])
    rows = _claims(plan, {"t": {"metrics": ["seen_classes_accuracy"], "arms": arms}})
    assert [(r["a"], r["b"]) for r in rows] == [("spider", "base"), ("spider (mask-all)", "base")]
    assert rows[0]["verdict"] == IDENTICAL
    d = rows[1]["diff"]
    assert d["n"] == 3 and abs(d["mean"] - (0.10 + 0.05 + 0.10) / 3) < 1e-12      # paired by seed
    assert rows[1]["verdict"] == "supports"                                      # diffs 0.10, 0.05, 0.10 > 0
    assert claim_verdict(paired({0: 0.5, 1: 0.7}, {0: 0.5, 1: 0.6}), "better") != IDENTICAL


def test_parallel_units_keep_the_cli_quiet(tmp_path, capfd):
    """With --jobs 2 the compare directories run in spawned processes; they keep the command's quiet
    transformers logging (no load report of the fresh classifier head per run)."""
    from flatpeft.cli import main

    plan = _plan(tmp_path, seeds=1)
    assert main(["--quiet", "suite", str(plan), "--jobs", "2"]) == 0
    out, err = capfd.readouterr()
    assert (tmp_path / "runs/tiny_noisy__scope-all/flatpo/seed0/eval.json").is_file()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err


def test_suite_on_submitit_local_equals_the_local_pool(tmp_path, capsys):
    """The plan's compare directories as submitit jobs (its local cluster: real subprocesses, as on Slurm but on
    this machine) give the same runs, bit for bit, as the embedded local pool."""
    pytest.importorskip("submitit")
    from flatpeft.cli import main

    results = {}
    for name, extra in (("pool", []), ("submitit", ["--executor", "submitit", "--executor-option", "cluster=local",
                                                    "--executor-option", "timeout_min=20"])):
        plan = _plan(tmp_path / name, seeds=1)
        assert main(["--quiet", "suite", str(plan), *extra]) == 0
        runs = tmp_path / name / "runs"
        results[name] = {p.relative_to(runs).as_posix(): {k: v for k, v in json.loads(p.read_text()).items()
                                                           if k in ("accuracy", "macro_f1", "final_loss", "steps")}
                         for p in sorted(runs.glob("*/*/seed*/eval.json"))}
    assert results["pool"] and results["pool"] == results["submitit"]
    assert list((tmp_path / "submitit" / "runs" / ".submitit").glob("*_log.out"))  # the jobs really ran there


def test_executor_options_are_checked(tmp_path, capsys):
    from flatpeft.cli import main

    plan = _plan(tmp_path, seeds=1)
    assert main(["--quiet", "suite", str(plan), "--executor-option", "cluster=local"]) == 2
    assert "--executor-option applies to --executor submitit" in capsys.readouterr().err
    assert main(["--quiet", "suite", str(plan), "--executor", "submitit", "--executor-option", "nokey"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_claim_kind_is_explicit_not_read_from_the_wording(tmp_path):
    """The verdict rule comes from the claim's ``kind``; the English sentence no longer decides it (a claim
    saying "keeps" was judged as an equivalence whatever it meant). Claims live in the plan file; one without a
    valid kind is refused by name."""
    from flatpeft.experiments.evidence import claim_verdict, paired
    from flatpeft.experiments.suite import CLAIMS, load_plan

    assert all(c["kind"] in ("better", "forgets-less", "match") for c in CLAIMS)
    d = paired({0: 0.499, 1: 0.602, 2: 0.4005}, {0: 0.50, 1: 0.60, 2: 0.40})   # interval [-0.32, +0.42] pp
    assert claim_verdict(d, "match") == "supports" and claim_verdict(d, "better").startswith("refutes a gain")
    plan = _plan(tmp_path, seeds=1)
    data = yaml.safe_load(plan.read_text())
    data["claims"] = [{"id": "c", "kind": "keeps", "paper": "P", "claim": "it matches", "metric": "accuracy",
                       "a": "sam", "b": "base"}]
    plan.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"claims\[0\] \(c\): kind must be better, forgets-less or match"):
        load_plan(plan)
