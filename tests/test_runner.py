"""Runner, text_classification task, paired statistics and results tables (tiny BERT built from a config)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

import _fixtures as F
from flatpeft.experiments import results as R
from flatpeft.experiments import stats as S
from flatpeft.experiments.config import load_config
from flatpeft.experiments.runner import RunExistsError, compare, evaluate_run, method_kwargs_for, train_run
from flatpeft.experiments.tasks import get_task
from flatpeft.experiments.sampling import carve_validation, sample_shots
from flatpeft.experiments.text_classification import read_table


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread_module):
    """Tiny models run fastest single-threaded (and the test machine is shared)."""
    import transformers

    transformers.logging.set_verbosity_error()
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Config with a tiny BERT and synthetic reviews (built once per module)."""
    return F.tiny_config(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "base0"
    return out, train_run(tiny, seed=0, out_dir=out, progress=False)


# ---------------------------------------------------------------- data helpers
def test_read_table_formats_agree_and_missing_column_is_named(tmp_path):
    frames = {}
    for suffix in (".csv", ".jsonl", ".parquet"):
        files = F.make_sentiment_files(tmp_path / suffix[1:], suffix=suffix, n_train=10, n_test=4)
        frames[suffix] = read_table(files["train"], ("text", "label"))
    pd.testing.assert_frame_equal(frames[".csv"], frames[".jsonl"])
    pd.testing.assert_frame_equal(frames[".csv"], frames[".parquet"])
    with pytest.raises(ValueError) as err:
        read_table(tmp_path / "csv" / "train.csv", ("text", "sentiment"), "data.train")
    msg = str(err.value)
    assert "'sentiment'" in msg and "train.csv" in msg and "columns: text, label" in msg and "data.train" in msg


def test_validation_split_is_fixed_and_shots_follow_the_seed():
    val_a, rest_a = carve_validation(100, 20, val_seed=7)
    val_b, _ = carve_validation(100, 20, val_seed=7)
    assert np.array_equal(val_a, val_b) and len(val_a) == 20 and len(rest_a) == 80
    assert not set(val_a) & set(rest_a)
    labels = np.arange(100) % 3
    s0, s0b, s1 = (sample_shots(labels, 5, seed, classes=range(3), pool=rest_a) for seed in (0, 0, 1))
    assert np.array_equal(s0, s0b) and not np.array_equal(np.sort(s0), np.sort(s1))
    assert np.bincount(labels[s0], minlength=3).tolist() == [5, 5, 5] and set(s0) <= set(rest_a)
    with pytest.raises(ValueError, match="data.shots=40"):
        sample_shots(labels, 40, 0, classes=range(3), pool=rest_a)
    with pytest.raises(ValueError, match="data.val_size"):
        carve_validation(10, 10, 0)


def test_task_missing_label_column_names_column_file_and_columns(tiny):
    cfg = copy.deepcopy(tiny)
    cfg.data.label_column = "stars"
    with pytest.raises(ValueError) as err:
        get_task("text_classification")(cfg, 0)
    msg = str(err.value)
    assert "'stars'" in msg and cfg.data.train in msg and "text, label" in msg


def test_task_data_and_batches(tiny):
    task = get_task("text_classification")(tiny, 0)
    assert task.classes == ["great", "other"]
    assert {s: task.num_examples(s) for s in ("train", "val", "test")} == {"train": 16, "val": 20, "test": 60}
    assert np.bincount(task.splits["train"]["labels"]).tolist() == [8, 8]
    names = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    # batch order: fixed by the seed, full batches, an epoch covers every example once
    a, b = task.train_batches(), task.train_batches()
    first = [next(a)["input_ids"] for _ in range(2)]
    assert all(torch.equal(x, next(b)["input_ids"]) for x in first)
    assert all(x.shape[0] == 8 for x in first)
    other = get_task("text_classification")(tiny, 1)
    assert not torch.equal(next(other.train_batches())["labels"], next(task.train_batches())["labels"]) or \
        not torch.equal(next(other.train_batches())["input_ids"], first[0])


@pytest.mark.parametrize("ptype", ["prompt", "none"])
def test_prompt_tuning_and_full_finetuning_train(tiny, ptype):
    cfg = copy.deepcopy(tiny)
    cfg.peft.type = ptype
    task = get_task("text_classification")(cfg, 0)
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    if ptype == "none":
        assert len(trainable) == len(list(task.model.parameters()))
    else:
        assert any("prompt_encoder" in n for n in trainable) and any("classifier" in n for n in trainable)
    batch = next(task.train_batches())
    loss = task.loss(task.model, batch)
    loss.backward()
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)
    assert math.isfinite(loss.item())


def test_prefix_on_an_encoder_fails_at_build_time_with_a_clear_message(tiny):
    cfg = copy.deepcopy(tiny)
    cfg.peft.type = "prefix"
    with pytest.raises(ValueError, match="peft.type=prefix.*past_key_values"):
        get_task("text_classification")(cfg, 0)


# ---------------------------------------------------------------- train_run
def test_train_run_writes_the_run_directory(base_run, tiny):
    out, metrics = base_run
    for name in ("config.yaml", "eval.json", "metrics.jsonl", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("accuracy", "macro_f1", "train_accuracy", "time_per_step", "steps", "seed", "method"):
        assert key in saved
    assert saved["steps"] == tiny.train.steps and saved["method"] == "base" and 0 <= saved["accuracy"] <= 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]  # log_every=2, steps=6
    assert all({"loss", "lr"} <= set(r) for r in lines)
    resolved = load_config(out / "config.yaml")
    assert resolved.train.seed == 0 and resolved.method == {"name": "base"}
    assert Path(resolved.data.train).is_absolute()


def test_eval_of_a_saved_run_reproduces_its_accuracy(base_run):
    out, metrics = base_run
    again = evaluate_run(out, splits=("test", "train"))
    assert again["accuracy"] == metrics["accuracy"] and again["macro_f1"] == metrics["macro_f1"]
    assert again["train_accuracy"] == metrics["train_accuracy"]
    # and the reloaded weights are the trained ones, not a fresh init: predictions differ from an untrained model
    cfg = load_config(out / "config.yaml")
    task_cls = get_task(cfg.task)
    loaded = task_cls.load(out, cfg)
    fresh = task_cls(cfg, cfg.train.seed)
    lora = [k for k in loaded.model.state_dict() if "lora_B" in k]
    assert lora and any(not torch.equal(loaded.model.state_dict()[k], fresh.model.state_dict()[k]) for k in lora)


def test_eval_on_another_file(base_run, tmp_path):
    out, _ = base_run
    cfg = load_config(out / "config.yaml")
    df = pd.read_csv(cfg.data.test).iloc[:10]
    df.to_csv(tmp_path / "small.csv", index=False)
    task = get_task(cfg.task).load(out, cfg)
    expected = (task.predict(task.model, "test")[:10] == task.splits["test"]["labels"][:10]).mean()
    got = evaluate_run(out, data=tmp_path / "small.csv")
    assert got["accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="nothere.csv"):
        evaluate_run(out, data=tmp_path / "nothere.csv")


def test_existing_run_is_never_overwritten_silently(base_run, tiny, tmp_path):
    out, _ = base_run
    before = (out / "eval.json").read_text()
    with pytest.raises(RunExistsError, match="--overwrite"):
        train_run(tiny, seed=0, out_dir=out, progress=False)
    assert (out / "eval.json").read_text() == before
    # overwrite removes only the run's own files
    d = tmp_path / "run"
    train_run(tiny, seed=0, out_dir=d, progress=False)
    (d / "notes.txt").write_text("keep me")
    (d / "metrics.jsonl").write_text("stale\n")
    train_run(tiny, seed=0, out_dir=d, overwrite=True, progress=False)
    assert (d / "notes.txt").read_text() == "keep me"
    assert "stale" not in (d / "metrics.jsonl").read_text()


def test_same_seed_same_result_and_two_pass_with_rho_zero_equals_base(tiny, base_run, tmp_path):
    """Fairness: with model dropout ON, SAM at rho=0 must reproduce base exactly (same init, same batches,
    same dropout masks in both passes thanks to the RNG replay, same stream afterwards)."""
    cfg = copy.deepcopy(tiny)
    cfg.task_args = {"model_dropout": 0.1}
    a = train_run(cfg, seed=3, out_dir=tmp_path / "a", progress=False)
    cfg.method = {"name": "sam", "rho": 0.0}
    b = train_run(cfg, seed=3, out_dir=tmp_path / "b", progress=False)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert a["accuracy"] == b["accuracy"] and a["macro_f1"] == b["macro_f1"]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_sam_logs_perturbation_norm_and_loss_gap(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg.method = {"name": "sam", "rho": 0.05}
    train_run(cfg, seed=0, out_dir=tmp_path / "sam", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "sam" / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        assert rec["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)  # SAM: ||e|| = rho
        assert rec["loss_gap"] == pytest.approx(rec["loss_perturbed"] - rec["loss"])


def test_val_eval_steps_log_validation_without_touching_the_stream(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg.task_args = {"model_dropout": 0.1}
    plain = train_run(cfg, seed=0, out_dir=tmp_path / "p", progress=False)
    cfg.train.val_eval_steps = [2, 6]
    curve = train_run(cfg, seed=0, out_dir=tmp_path / "c", progress=False)
    assert plain["accuracy"] == curve["accuracy"]
    val = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines() if "val_accuracy" in x]
    assert [r["step"] for r in val] == [2, 6]


def test_unknown_method_and_bad_method_keyword(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg.method = {"name": "sgdm"}
    with pytest.raises(ValueError, match=r"method.name.*'sgdm'.*base, sam"):
        train_run(cfg, out_dir=tmp_path / "x", progress=False)
    cfg.method = {"name": "sam", "rhoo": 0.1}
    with pytest.raises(ValueError, match="rhoo"):
        train_run(cfg, out_dir=tmp_path / "y", progress=False)


def test_method_kwargs_for_drops_only_other_methods_keywords():
    shared = {"name": "flatpo", "rho": 0.1, "fraction": 0.2, "weight_decay": 0.0}
    assert method_kwargs_for("sam", shared) == {"name": "sam", "rho": 0.1, "weight_decay": 0.0}
    assert method_kwargs_for("flatpo", shared) == shared
    assert method_kwargs_for("eflat-lora", {"name": "sam", "beta": 0.3}) == {"name": "eflat-lora", "beta": 0.3}


# ---------------------------------------------------------------- statistics and tables
def test_paired_difference_matches_a_hand_computation():
    a, b = [0.61, 0.66, 0.58, 0.70], [0.60, 0.62, 0.59, 0.65]
    d = np.subtract(a, b)
    n, mean, sd = len(d), d.mean(), d.std(ddof=1)
    lo, hi = sps.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    got = S.paired_difference(a, b)
    assert (got.n, got.mean, got.std) == (n, pytest.approx(mean), pytest.approx(sd))
    assert (got.ci_low, got.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert got.verdict == S.NO_DIFFERENCE  # lo < 0 < hi for these numbers
    assert lo < 0 < hi
    up = S.paired_difference([0.7, 0.72, 0.71], [0.6, 0.61, 0.6])
    assert up.ci_low > 0 and up.verdict == "better than base"
    down = S.paired_difference([0.5, 0.52, 0.51], [0.6, 0.61, 0.6])
    assert down.ci_high < 0 and down.verdict == "worse than base"
    single = S.paired_difference([0.7], [0.6])
    assert math.isnan(single.ci_low) and single.verdict == S.TOO_FEW


def _fake_run(out: Path, method: str, seed: int, **metrics) -> None:
    d = out / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("{}\n")
    (d / "eval.json").write_text(json.dumps({"seed": seed, "steps": 5, "method": method, **metrics}))


def test_tables_from_eval_files(tmp_path):
    acc = {"base": [0.60, 0.64, 0.58], "sam": [0.63, 0.66, 0.60], "flatpo": [0.61, 0.60, 0.55]}
    tps = {"base": 1.0, "sam": 2.0, "flatpo": 2.2}
    for method, values in acc.items():
        for seed, v in enumerate(values):
            _fake_run(tmp_path, method, seed, accuracy=v, macro_f1=v - 0.1, time_per_step=tps[method] + 0.01 * seed)
    res = R.collect_and_write(tmp_path, methods=["base", "sam", "flatpo"])
    for name in ("results.md", "results.csv", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    csv = pd.read_csv(tmp_path / "results.csv").set_index("method")
    for col in ("n_seeds", "accuracy_mean", "accuracy_std", "accuracy_seed0", "accuracy_seed2", "diff_mean",
                "diff_ci_low", "diff_ci_high", "n_paired", "verdict", "time_per_step_mean", "time_ratio_vs_base",
                "macro_f1_mean", "macro_f1_std"):
        assert col in csv.columns, col
    assert "seed_mean" not in csv.columns and "steps_mean" not in csv.columns
    assert list(csv.index) == ["base", "sam", "flatpo"]
    for method in ("sam", "flatpo"):
        d = np.subtract(acc[method], acc["base"])
        lo, hi = sps.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(3))
        assert csv.loc[method, "diff_ci_low"] == pytest.approx(lo)
        assert csv.loc[method, "diff_ci_high"] == pytest.approx(hi)
        assert csv.loc[method, "accuracy_mean"] == pytest.approx(np.mean(acc[method]))
        assert csv.loc[method, "accuracy_std"] == pytest.approx(np.std(acc[method], ddof=1))
    # sam is +0.0233 on every... seed: diffs 0.03, 0.02, 0.02 -> CI excludes zero -> "better than base"
    assert csv.loc["sam", "verdict"] == "better than base"
    assert csv.loc["flatpo", "verdict"] == S.NO_DIFFERENCE
    assert csv.loc["sam", "time_ratio_vs_base"] == pytest.approx(2.01 / 1.01)
    assert csv.loc["base", "accuracy_seed1"] == pytest.approx(0.64)
    md = (tmp_path / "results.md").read_text()
    assert "| sam | 3 | 63.0 ± 3.0 |" in md and "better than base" in md and "no significant difference" in md
    assert res.markdown == md


def test_tables_pair_only_common_seeds(tmp_path):
    for seed, v in enumerate([0.5, 0.6, 0.7]):
        _fake_run(tmp_path, "base", seed, accuracy=v, time_per_step=1.0)
    for seed, v in enumerate([0.55, 0.66]):  # seed 2 missing (interrupted)
        _fake_run(tmp_path, "sam", seed, accuracy=v, time_per_step=2.0)
    csv = R.collect_and_write(tmp_path).summary.set_index("method")
    assert csv.loc["sam", "n_paired"] == 2
    assert csv.loc["sam", "diff_mean"] == pytest.approx(0.055)


# ---------------------------------------------------------------- compare
def test_compare_end_to_end_resume_and_refusal(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg.method = {"name": "flatpo", "rho": 0.05, "fraction": 0.5}
    out = tmp_path / "cmp"
    res = compare(cfg, ["base", "sam"], 2, out_dir=out, progress=False)
    for m in ("base", "sam"):
        for s in (0, 1):
            assert (out / m / f"seed{s}" / "eval.json").is_file()
    sam_cfg = load_config(out / "sam" / "seed1" / "config.yaml")
    assert sam_cfg.method == {"name": "sam", "rho": 0.05} and sam_cfg.train.seed == 1
    accs = {m: [json.loads((out / m / f"seed{s}" / "eval.json").read_text())["accuracy"] for s in (0, 1)]
            for m in ("base", "sam")}
    d = np.subtract(accs["sam"], accs["base"])
    row = res.summary.set_index("method").loc["sam"]
    assert row["diff_mean"] == pytest.approx(d.mean())
    if d.std(ddof=1) > 0:
        lo, hi = sps.t.interval(0.95, 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(2))
        assert (row["diff_ci_low"], row["diff_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert {"results.md", "results.csv", "results.png"} <= {p.name for p in out.iterdir()}
    with pytest.raises(RunExistsError, match="--resume"):
        compare(cfg, ["base", "sam"], 2, out_dir=out, progress=False)
    stamp = (out / "base" / "seed0" / "eval.json").stat().st_mtime_ns
    (out / "sam" / "seed1" / "eval.json").unlink()  # an unfinished run
    compare(cfg, ["base", "sam"], 2, out_dir=out, resume=True, progress=False)
    assert (out / "base" / "seed0" / "eval.json").stat().st_mtime_ns == stamp  # kept
    assert (out / "sam" / "seed1" / "eval.json").is_file()  # redone


def test_compare_interrupted_keeps_finished_seeds(tiny, tmp_path):
    out = tmp_path / "cmp"
    calls = []

    def stop_on_third(task):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        compare(tiny, ["base", "sam"], 3, out_dir=out, extra_eval=stop_on_third, progress=False)
    # seed-major order: base/seed0, sam/seed0 finished; base/seed1 was interrupted
    assert (out / "base" / "seed0" / "eval.json").is_file() and (out / "sam" / "seed0" / "eval.json").is_file()
    assert not (out / "base" / "seed1" / "eval.json").exists()
    csv = pd.read_csv(out / "results.csv").set_index("method")
    assert csv.loc["sam", "n_paired"] == 1


def test_extra_eval_metrics_reach_eval_json_and_tables(tiny, tmp_path):
    out = tmp_path / "cmp"
    res = compare(tiny, ["base"], 1, out_dir=out, extra_eval=lambda task: {"sharpness": 1.5}, progress=False)
    assert json.loads((out / "base" / "seed0" / "eval.json").read_text())["sharpness"] == 1.5
    assert res.summary.loc[0, "sharpness_mean"] == 1.5


def test_decoder_model_without_pad_token_lora_and_prompt(tmp_path):
    """A Llama-style decoder (built from a config) whose tokenizer has no pad token: EOS pads, and the
    sequence-classification head reads the last real token (config.pad_token_id set)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    F.make_tiny_bert(tmp_path / "bert")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
    tok.eos_token = "[SEP]"
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path / "llama"))
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
               ).save_pretrained(str(tmp_path / "llama"))
    for ptype in ("lora", "prompt"):
        cfg = F.tiny_config(tmp_path / ptype, model=str(tmp_path / "llama"),
                            peft={"type": ptype, "target_modules": ["q_proj", "v_proj"]})
        task = get_task("text_classification")(cfg, 0)
        assert task.tokenizer.pad_token == "[SEP]" and task.model.config.pad_token_id == task.tokenizer.pad_token_id
        batch = next(task.train_batches())
        # padding must not change a sequence's logits: compare a padded batch against one-by-one forwards
        task.model.eval()
        with torch.no_grad():
            logits = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for i in range(3):
                n = int(batch["attention_mask"][i].sum())
                single = task.model(input_ids=batch["input_ids"][i:i + 1, :n]).logits
                shorter = task.model(input_ids=batch["input_ids"][i:i + 1, :n - 2]).logits
                torch.testing.assert_close(logits[i:i + 1], single, rtol=0, atol=1e-3)  # SDPA masked vs not
                assert (shorter - single).abs().max() > 1e-2  # the tolerance does tell positions apart
        task.model.train()
        loss = task.loss(task.model, batch)
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_failed_build_leaves_no_run_behind(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg.data.label_column = "stars"
    with pytest.raises(ValueError, match="stars"):
        train_run(cfg, out_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_task_default_save_and_load_for_a_plain_module(tmp_path):
    """Task.save / load_weights for a model without save_pretrained: trainable tensors in safetensors."""
    from flatpeft.experiments.config import ExperimentConfig
    from flatpeft.experiments.tasks import Task

    class Plain(Task):
        def __init__(self, cfg, seed):
            super().__init__(cfg, seed)
            torch.manual_seed(seed)
            self.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
            self.model[0].requires_grad_(False)

        def train_batches(self):
            while True:
                yield torch.ones(2, 3)

        def loss(self, model, batch):
            return model(batch).sum()

        def evaluate(self, model, split="test"):
            return {"accuracy": float(model(torch.ones(1, 3)).sum().detach())}

    cfg = ExperimentConfig()
    cfg.train.device = "cpu"
    a = Plain(cfg, 0)
    with torch.no_grad():
        a.model[1].weight.add_(1.0)
    a.save(tmp_path)
    assert (tmp_path / "adapter" / "trainable.safetensors").is_file()
    b = Plain.load(tmp_path, cfg)
    assert torch.equal(b.model[1].weight, a.model[1].weight) and b.evaluate(b.model) == a.evaluate(a.model)
    assert len(a.analysis_batches(3)) == 3
    with pytest.raises(ValueError, match="no saved weights"):
        Plain.load(tmp_path / "empty", cfg)
