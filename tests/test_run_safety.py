"""Runs that never lie and never lose a file.

One test (or more) per case and per traceback; each failed before the fix.
Tiny BERT + synthetic reviews (``_fixtures``); every run is a few steps.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import _fixtures as F
from flatpeft import cli
from flatpeft.experiments.config import config_from_dict, config_to_dict, load_config, resolve_test_ref, save_config
from flatpeft.experiments.runner import (DirectoryLockedError, RunDivergedError, RunExistsError, compare,
                                         train_run)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return F.tiny_config(tmp_path_factory.mktemp("tiny"), train={"steps": 2, "log_every": 1})


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return save_config(tiny, tmp_path_factory.mktemp("cfg") / "tiny.yaml")


def run(argv, capsys):
    code = cli.main(["--quiet", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (lock files excluded: they are empty and may come and go)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("flatpeft-lock")}


def with_(cfg, **sections):
    out = copy.deepcopy(cfg)
    for section, values in sections.items():
        if isinstance(values, dict) and section != "method":
            for k, v in values.items():
                setattr(getattr(out, section), k, v)
        else:
            setattr(out, section, values)
    return out


# ------------------------------------------------------------------ 1. compare --resume with changed settings
def test_case1_resume_with_changed_settings_is_refused_naming_the_keys(tiny, tmp_path):
    out = tmp_path / "cmp"
    compare(tiny, ["base"], 1, out_dir=out, progress=False)
    before = tree(out)
    changed = with_(tiny, train={"lr": 0.5, "steps": 3})
    with pytest.raises(ValueError) as err:
        compare(changed, ["base"], 2, out_dir=out, resume=True, progress=False)
    msg = str(err.value)
    assert "train.lr (0.005 -> 0.5)" in msg and "train.steps (2 -> 3)" in msg and "base/seed0" in msg
    assert tree(out) == before  # compare_config.yaml and the tables are not rewritten
    # unchanged settings resume (a seed is added), and the table holds both seeds
    res = compare(tiny, ["base"], 2, out_dir=out, resume=True, progress=False)
    assert list(res.runs["seed"]) == [0, 1]
    assert (out / "base" / "seed0" / "eval.json").read_bytes() == before["base/seed0/eval.json"]


def test_case1_overwrite_redoes_every_run_with_the_new_settings(tiny, tmp_path):
    out = tmp_path / "cmp"
    compare(tiny, ["base"], 1, out_dir=out, progress=False)
    compare(with_(tiny, train={"lr": 0.01}), ["base"], 1, out_dir=out, overwrite=True, progress=False)
    assert load_config(out / "base" / "seed0" / "config.yaml").train.lr == 0.01
    assert yaml.safe_load((out / "compare_config.yaml").read_text())["train"]["lr"] == 0.01


# ------------------------------------------------------------------ 2. NaN / empty labels
def _files_with_gap(tmp_path: Path, label: str | None) -> Path:
    df = pd.read_csv(F.make_sentiment_files(tmp_path / "d")["train"])
    df.loc[6, "label"] = label
    path = tmp_path / "gappy.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("label", [None, "  "], ids=["nan", "blank"])
def test_case2_missing_label_is_refused_with_file_row_and_column(tiny, tmp_path, label):
    path = _files_with_gap(tmp_path, label)
    with pytest.raises(ValueError) as err:
        train_run(with_(tiny, data={"train": str(path)}), out_dir=tmp_path / "r", progress=False)
    msg = str(err.value)
    assert "gappy.csv" in msg and "row 7" in msg and "'label'" in msg and "data.drop_missing" in msg
    assert not (tmp_path / "r").exists()


def test_case2_drop_missing_drops_and_reports(tiny, tmp_path, capfd):
    path = _files_with_gap(tmp_path, None)
    metrics = train_run(with_(tiny, data={"train": str(path), "drop_missing": True}), out_dir=tmp_path / "r",
                        progress=False)
    assert "dropped 1 of 120 row(s)" in capfd.readouterr().err
    from peft import PeftModel  # noqa: F401 - the head size is in the adapter config

    cfg = load_config(tmp_path / "r" / "config.yaml")
    from flatpeft.experiments.text_classification import TextClassificationTask

    assert TextClassificationTask(cfg, 0).classes == ["great", "other"] and metrics["accuracy"] >= 0


# ------------------------------------------------------------------ 3. no data.test
def test_case3_no_test_set_is_refused_or_evaluates_only_what_was_named(tiny, tmp_path, capfd):
    raw = config_to_dict(tiny)
    del raw["data"]["test"]
    cfg = config_from_dict(raw)
    assert cfg.data.test is None and resolve_test_ref(cfg.data) is None
    with pytest.raises(ValueError, match="data.test: not set"):
        train_run(cfg, out_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    metrics = train_run(with_(cfg, train={"eval_splits": ["val"]}), out_dir=tmp_path / "r", progress=False)
    assert "accuracy" not in metrics and "val_accuracy" in metrics and metrics["val_examples"] == 20
    assert "no test set" in capfd.readouterr().err
    # a built-in train split names its own test split, never another dataset's
    assert resolve_test_ref(config_from_dict({"data": {"train": "builtin:finefoods/train"}}).data) == \
        "builtin:finefoods/test"


# ------------------------------------------------------------------ 4. divergence
@pytest.mark.parametrize("method, train, what", [
    ({"name": "sam", "rho": 1e30}, {"steps": 1}, "loss_perturbed"),
    ({"name": "base"}, {"steps": 2, "lr": 1e30}, "trainable weights"),
], ids=["rho", "lr"])
def test_case4_divergence_stops_naming_method_seed_and_step(tiny, tmp_path, method, train, what):
    with pytest.raises(RunDivergedError) as err:
        train_run(with_(tiny, method=method, train=train), seed=3, out_dir=tmp_path / "r", progress=False)
    msg = str(err.value)
    assert f"method {method['name']!r}, seed 3" in msg and "step " in msg and what in msg
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.flatpeft-new"))


def test_case4_compare_records_the_failed_run_and_carries_on(tiny_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run(["compare", tiny_file, "--methods", "base,sam", "--seeds", "2", "--output-dir", out,
                             "--set", "method.rho=1e30"], capsys)
    assert code == 2 and "2 run(s) failed" in err and "sam seed 0" in err
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["method"]) == ["base", "sam"]
    assert csv.set_index("method").loc["base", "n_seeds"] == 2
    assert csv.set_index("method").loc["sam", "n_failed"] == 2 and csv.set_index("method").loc["sam", "n_seeds"] == 0
    assert "Failed runs" in stdout and "| sam | 0 |" in stdout
    plan = json.loads((out / "compare_plan.json").read_text())
    assert set(plan["failed"]) == {"sam/seed0", "sam/seed1"}
    assert not (out / "sam" / "seed0").exists()
    for line in (out / "base" / "seed0" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-finite {c} in metrics.jsonl"))


# ------------------------------------------------------------------ 5. truncated recorded config
def test_case5_eval_refuses_an_incomplete_recorded_config(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    train_run(tiny, out_dir=out, progress=False)
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text[: text.index("train:")])
    code, _, err = run(["eval", out], capsys)
    assert code == 2 and "incomplete" in err and "train" in err and "config.yaml" in err


# ------------------------------------------------------------------ 6. assets: size, sha256, eval.json records
def _fake_cache(tmp_path, monkeypatch):
    import flatpeft.assets as assets

    cache = tmp_path / "cache"
    monkeypatch.setenv("FLATPEFT_CACHE", str(cache))
    ff = cache / "finefoods"
    ff.mkdir(parents=True)
    df = pd.DataFrame({"text": [f"review {i} good" for i in range(1000)], "label": [i % 2 for i in range(1000)]})
    df.to_csv(ff / "train.csv", index=False)
    df.to_csv(ff / "test.csv", index=False)
    (ff / ".done").write_text("ok\n")
    model = F.make_tiny_bert(cache / "smollm2")
    (model / ".done").write_text("ok\n")
    monkeypatch.setattr(assets, "_ASSETS", {k: v for k, v in assets._ASSETS.items() if k in ("finefoods", "smollm2")})
    monkeypatch.setattr(assets, "ASSET_NAMES", ("finefoods", "smollm2"))
    assets.prepare(progress=False)
    return assets, cache


def test_case6_cut_dataset_is_refused_naming_prepare_force(tmp_path, monkeypatch):
    assets, cache = _fake_cache(tmp_path, monkeypatch)
    assert assets.finefoods_splits()["test"].is_file()
    test = cache / "finefoods" / "test.csv"
    lines = test.read_text().splitlines(keepends=True)
    test.write_text("".join(lines[:301]))  # cut at a row boundary: 300 of 1000 reviews
    with pytest.raises(assets.AssetCorruptError) as err:
        assets.finefoods_splits()
    assert "test.csv" in str(err.value) and "flatpeft data prepare --force" in str(err.value)


def test_case6_zeroed_model_bytes_found_by_data_verify(tmp_path, monkeypatch, capsys):
    assets, cache = _fake_cache(tmp_path, monkeypatch)
    code, out, _ = run(["data", "verify"], capsys)
    assert code == 0 and "smollm2: ok" in out
    weights = cache / "smollm2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)  # zero a block of tensor data: same size, loads fine
    weights.write_bytes(bytes(data))
    with pytest.raises(assets.AssetCorruptError, match="sha256"):
        assets.smollm2_path()  # a load hashes like verify (issue 20: it used to check sizes only)
    code, _, err = run(["data", "verify"], capsys)
    assert code == 2 and "model.safetensors" in err and "sha256" in err and "data prepare --force" in err


def test_case6_eval_json_records_examples_and_data_hash(tiny, tmp_path):
    import hashlib

    metrics = train_run(tiny, out_dir=tmp_path / "r", progress=False)
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert saved["test_examples"] == 60 and saved["train_examples"] == 16
    assert saved["data_sha256"]["test"] == hashlib.sha256(Path(tiny.data.test).read_bytes()).hexdigest()
    assert metrics["data_sha256"] == saved["data_sha256"]


# ------------------------------------------------------------------ 7. --overwrite on a folder that never held a run
def test_case7_overwrite_refuses_a_directory_without_a_manifest(tiny_file, tmp_path, capsys):
    d = tmp_path / "mine"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "weights.bin").write_bytes(b"precious")
    (d / "config.yaml").write_text("my: own\n")
    (d / "tb").mkdir()
    before = tree(d)
    code, _, err = run(["train", tiny_file, "--output-dir", d, "--overwrite"], capsys)
    assert code == 2 and "not a flatpeft run directory" in err
    assert tree(d) == before


def test_case7_overwrite_removes_only_what_the_manifest_lists(tiny, tmp_path):
    d = tmp_path / "r"
    train_run(tiny, out_dir=d, progress=False)
    (d / "notes.txt").write_text("keep me")
    train_run(with_(tiny, train={"lr": 0.01}), out_dir=d, overwrite=True, progress=False)
    assert (d / "notes.txt").read_text() == "keep me"
    assert load_config(d / "config.yaml").train.lr == 0.01


# ------------------------------------------------------------------ 8. compare into a directory with the user's files
def test_case8_compare_refuses_a_directory_with_foreign_files(tiny, tmp_path):
    d = tmp_path / "cmp"
    d.mkdir()
    (d / "results.csv").write_text("my,own\n1,2\n")
    (d / "results.md").write_text("# mine\n")
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunExistsError, match="flatpeft did not write"):
            compare(tiny, ["base"], 1, out_dir=d, progress=False, **kwargs)
    assert (d / "results.csv").read_text() == "my,own\n1,2\n" and sorted(os.listdir(d)) == ["results.csv", "results.md"]
    # a file of the user's inside a compare directory flatpeft wrote is refused too
    compare(tiny, ["base"], 1, out_dir=tmp_path / "c2", progress=False)
    (tmp_path / "c2" / "base" / "notes.txt").write_text("x")
    with pytest.raises(RunExistsError, match="base/notes.txt"):
        compare(tiny, ["base"], 1, out_dir=tmp_path / "c2", resume=True, progress=False)


# ------------------------------------------------------------------ 9. overwrite keeps the old run until the new one finished
def test_case9_a_failing_overwrite_keeps_the_old_run(tiny, tmp_path):
    d = tmp_path / "r"
    train_run(tiny, out_dir=d, progress=False)
    before = tree(d)
    with pytest.raises(RunDivergedError):
        train_run(with_(tiny, method={"name": "sam", "rho": 1e30}), out_dir=d, overwrite=True, progress=False)
    assert tree(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.flatpeft-lock", "r"]


def test_case9_killed_swap_is_finished_or_undone_on_the_next_start(tiny, tmp_path):
    from flatpeft.experiments import rundir

    d = tmp_path / "r"
    train_run(tiny, out_dir=d, progress=False)
    before = tree(d)
    os.replace(d, rundir.old_dir(d))  # killed between "old aside" and "new in place", new one unfinished
    (rundir.staging_dir(d)).mkdir()
    rundir.write_manifest(rundir.staging_dir(d), state="running")
    with pytest.raises(RunExistsError, match="--overwrite"):
        train_run(tiny, out_dir=d, progress=False)  # recovery put the old run back, then refused to replace it
    assert tree(d) == before and not rundir.staging_dir(d).exists() and not rundir.old_dir(d).exists()


# ------------------------------------------------------------------ 10. one process per run directory
def test_case10_second_process_on_a_run_directory_is_refused(tiny_file, tmp_path, capsys):
    d = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from flatpeft.experiments.rundir import run_lock
            with run_lock(Path({str(d)!r})):
                print("locked", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(["train", tiny_file, "--output-dir", d, "--overwrite"], capsys)
        assert code == 2 and "in use by another flatpeft process" in err
        assert not d.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_case10_compare_directory_lock(tiny, tmp_path):
    from flatpeft.experiments.rundir import dir_lock

    d = tmp_path / "cmp"
    d.mkdir()
    code = ("import sys; from pathlib import Path; from flatpeft.experiments.rundir import dir_lock\n"
            f"with dir_lock(Path({str(d / '.flatpeft-lock')!r}), 'x'):\n    print('locked', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError, match="compare directory"):
            compare(tiny, ["base"], 1, out_dir=d, progress=False)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert dir_lock  # imported for the name in the message


# ------------------------------------------------------------------ tracebacks that must be errors
@pytest.mark.parametrize("overrides, needles", [
    (["peft.alpha=abc"], ["peft.alpha", "expected a number", "'abc'"]),
    (["data.shots=true"], ["data.shots", "expected an integer or null", "True"]),
    (["train.steps=true"], ["train.steps", "expected an integer"]),
    (["train.lr=fast"], ["train.lr", "expected a number"]),
    (["data.max_length=[1]"], ["data.max_length"]),
    (["peft.r=2.5"], ["peft.r", "expected an integer"]),
    (["task_args.model_dropout=high"], ["task_args.model_dropout"]),
    (["train.eval_splits=test"], ["train.eval_splits", "expected a list of strings", "[test]"]),
    (["method.name=nosuch"], ["method.name", "'nosuch'"]),
    (["method.name=sam", "method.bogus=1"], ["'bogus'"]),
], ids=lambda v: v[0] if isinstance(v, list) and "=" in str(v[0]) else None)
@pytest.mark.parametrize("command", ["config", "train"])
def test_typed_fields_and_method_keywords_are_named_by_config_and_train(command, overrides, needles, tiny_file,
                                                                        tmp_path, capsys):
    argv = [command, tiny_file, *sum((["--set", o] for o in overrides), []), "--output-dir", tmp_path / "o"]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("flatpeft: error:"), err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "o").exists()


def test_unknown_hub_model_is_an_error(tiny_file, tmp_path, capsys):
    code, _, err = run(["train", tiny_file, "--set", "model=no-such-org/no-such-model-flatpeft", "--output-dir",
                        tmp_path / "o"], capsys)
    assert code == 2 and "model:" in err and "no-such-org/no-such-model-flatpeft" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["config", "train"])
def test_cuda_without_a_gpu_is_an_error(command, tiny_file, tmp_path, capsys):
    code, _, err = run([command, tiny_file, "--set", "train.device=cuda", "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "train.device" in err and "no CUDA GPU" in err


def test_corrupt_adapter_is_an_error_naming_the_file(tiny, tmp_path, capsys):
    d = tmp_path / "r"
    train_run(tiny, out_dir=d, progress=False)
    weights = d / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\0" * 16 + weights.read_bytes()[16:])
    code, _, err = run(["eval", d], capsys)
    assert code == 2 and "adapter_model.safetensors" in err and "corrupt" in err


def test_corrupt_cached_model_is_an_error_naming_file_and_prepare_force(tiny_file, tmp_path, monkeypatch, capsys):
    assets, cache = _fake_cache(tmp_path, monkeypatch)
    weights = cache / "smollm2" / "model.safetensors"
    weights.write_bytes(b"\xff" * 16 + weights.read_bytes()[16:])  # broken header, same size
    code, _, err = run(["train", tiny_file, "--set", "model=builtin:smollm2", "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "smollm2" in err and "flatpeft data prepare --force" in err


def test_non_utf8_data_and_config_name_file_and_line(tiny_file, tmp_path, capsys):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"text,label\ngood tea,great\ncaf\xe9 is bad,other\n")
    code, _, err = run(["train", tiny_file, "--set", f"data.train={bad}", "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "latin1.csv:3:4" in err and "UTF-8" in err
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(tiny_file.read_bytes().replace(b"task:", b"# \xff\ntask:", 1))
    code, _, err = run(["config", cfg], capsys)
    assert code == 2 and "bad.yaml:" in err and "UTF-8" in err


def test_broken_jsonl_line_is_named(tiny_file, tmp_path, capsys):
    files = F.make_sentiment_files(tmp_path / "d", suffix=".jsonl")
    lines = files["train"].read_text().splitlines()
    lines[3] = lines[3][:-5]
    files["train"].write_text("\n".join(lines) + "\n")
    code, _, err = run(["train", tiny_file, "--set", f"data.train={files['train']}", "--output-dir", tmp_path / "o"],
                       capsys)
    assert code == 2 and "train.jsonl:4" in err and "data.train" in err


def test_tilde_in_output_dir_is_expanded(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train_run(with_(tiny, output_dir="~/runs/x"), progress=False)
    assert (tmp_path / "home" / "runs" / "x" / "eval.json").is_file() and not Path("~").exists()


def test_corrupt_cached_multimodal_safetensors_names_file_and_prepare_force(tmp_path):
    from safetensors.torch import save_file

    import flatpeft.assets as assets

    path = tmp_path / "features_x.safetensors"
    save_file({"features": torch.zeros(3, 2)}, str(path))
    assert assets.load_cached_safetensors(path)["features"].shape == (3, 2)
    path.write_bytes(b"\x00" * 8 + path.read_bytes()[8:])
    with pytest.raises(assets.AssetCorruptError) as err:
        assets.load_cached_safetensors(path)
    assert "features_x.safetensors" in str(err.value) and "data prepare --force --only multimodal" in str(err.value)


def test_vqa_jsonl_non_utf8_names_file_and_line(tmp_path):
    from flatpeft.multimodal.hf_vlm import read_vqa_jsonl

    path = tmp_path / "vqa.jsonl"
    path.write_bytes(b'\n{"image": "a.png", "question": "caf\xe9?", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"vqa.jsonl:2:\d+: byte"):
        read_vqa_jsonl(path)


def test_case6_manifest_of_another_location_is_recorded_anew(tmp_path, monkeypatch):
    """A package asset in another environment (a fresh clone with its own venv, same cache) is not 'damaged'."""
    import flatpeft.assets as assets

    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    for env in ("a", "b"):
        (tmp_path / env / "model").mkdir(parents=True)
        (tmp_path / env / "model" / "w.bin").write_bytes(env.encode() * (10 if env == "a" else 20))
    assets.check_asset("minilm", tmp_path / "a" / "model")
    assets.check_asset("minilm", tmp_path / "b" / "model")  # other location: recorded anew, no error
    assert assets.verify(["minilm"])["minilm"].startswith("ok (1 file")
    (tmp_path / "b" / "model" / "w.bin").write_bytes(b"cut")
    with pytest.raises(assets.AssetCorruptError, match="w.bin has 3 bytes, 20 were recorded"):
        assets.check_asset("minilm", tmp_path / "b" / "model")


@pytest.mark.slow  # two CLI processes, about 30 s; test_case10_second_process_... covers the lock in the default run
def test_case10_two_train_overwrite_at_once_never_mix(tiny_file, tmp_path):
    """Two real processes on one run directory: one is refused (or they run one after the other); the directory
    then holds exactly one whole run (one TensorBoard file, config and log of the same settings)."""
    d = tmp_path / "r"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "flatpeft", "--quiet", "train", str(tiny_file), "--output-dir",
                               str(d), "--overwrite", "--set", f"train.lr={lr}", "--set", "train.steps=10"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for lr in (0.001, 0.002)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=30)
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        assert any("in use by another flatpeft process" in err for code, err in results if code == 2)
    assert len(list((d / "tb").iterdir())) == 1
    lr = load_config(d / "config.yaml").train.lr
    logged = {json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()}
    assert logged == {lr}
    assert json.loads((d / ".flatpeft-run.json").read_text())["state"] == "finished"
