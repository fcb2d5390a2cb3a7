"""LLaMA-Factory through ``flatpeft.integrations.llamafactory`` (marker ``llamafactory``, deselected by default).

Needs LLaMA-Factory in the environment: ``pip install 'flatpeft[llamafactory]'`` (docs/frameworks.md gives the
CPU set-up), then ``pytest -m llamafactory tests/test_llamafactory.py``. Everything is local: a tiny Llama (hidden
32, 2 layers, random weights) with a byte-level BPE tokenizer trained in memory, and a 12-example alpaca data set,
all written to ``tmp_path``; LLaMA-Factory's own ``run_exp`` runs the SFT stage on them (CPU, a few seconds).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.llamafactory
pytest.importorskip("llamafactory", reason="LLaMA-Factory is not installed (pip install 'flatpeft[llamafactory]')")

from flatpeft.integrations import llamafactory as lf

LR, RATIO, RHO = 1e-3, 16.0, 0.05


def make_assets(root: Path) -> tuple[Path, Path]:
    """A tiny Llama + tokenizer (``root/model``) and an alpaca data set with its ``dataset_info.json`` (``root/data``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = [{"instruction": f"Say something about the {a} {b}.", "input": "", "output": f"The {a} {b} sat on the mat and then ran."}
            for a in ("red", "blue", "big", "small") for b in ("cat", "dog", "bird")]
    pairs = [{"instruction": r["instruction"], "input": "", "chosen": r["output"], "rejected": "A log ran under the mat."}
             for r in rows]
    kto = [{**r, "label": i % 2 == 0} for i, r in enumerate(rows)]
    data = root / "data"
    data.mkdir(parents=True)
    texts = [{"text": r["instruction"] + " " + r["output"]} for r in rows]
    for name, content in (("tiny", rows), ("pairs", pairs), ("kto", kto), ("texts", texts)):
        (data / f"{name}.json").write_text(json.dumps(content))
    columns = {"prompt": "instruction", "query": "input"}
    (data / "dataset_info.json").write_text(json.dumps({
        "tiny": {"file_name": "tiny.json"},
        "pairs": {"file_name": "pairs.json", "ranking": True, "columns": {**columns, "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "kto.json", "columns": {**columns, "response": "output", "kto_tag": "label"}},
        "texts": {"file_name": "texts.json", "columns": {"prompt": "text"}},
    }))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["instruction"] + " " + r["output"] for r in rows] + ["Human: Assistant: \n"], bpe)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model, data


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    return make_assets(tmp_path_factory.mktemp("lf-assets"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sft_config(assets, out: Path, **extra) -> dict:
    """A LLaMA-Factory SFT config: LoRA r=4 on q/v with LoRA+ (ratio 16), 3 steps of 2 x 2 examples, logs every step."""
    model, data = assets
    cfg = dict(
        model_name_or_path=str(model), stage="sft", do_train=True, finetuning_type="lora", lora_target="q_proj,v_proj",
        lora_rank=4, loraplus_lr_ratio=RATIO, dataset="tiny", dataset_dir=str(data), template="default", cutoff_len=64,
        overwrite_cache=True, output_dir=str(out), overwrite_output_dir=True, logging_steps=1, save_strategy="no",
        plot_loss=True, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=LR, max_steps=3,
        lr_scheduler_type="constant", report_to="none", seed=0, disable_shuffling=True,
    )
    cfg.update(extra)
    return cfg


def trainer_log(out: Path) -> list[dict]:
    """LLaMA-Factory's own ``trainer_log.jsonl``: the lines of training steps."""
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def plain_log(assets, tmp_path_factory) -> list[dict]:
    """Plain LLaMA-Factory (its ``run_exp``, no flatpeft) on the same config."""
    from llamafactory.train.tuner import run_exp

    out = tmp_path_factory.mktemp("lf-plain")
    run_exp(args=sft_config(assets, out))
    return trainer_log(out)


@pytest.mark.parametrize("method,keys", [("flatpo", {"flatpeft_rho": RHO, "flatpeft_fraction": 0.5}),
                                         ("eflat-lora", {"flatpeft_rho": RHO})])
def test_sft_matches_plain_at_step_1_logs_metrics_and_keeps_lora_plus(assets, plain_log, tmp_path, method, keys):
    """flatpo and eflat-lora through the launcher: step 1's loss is plain LLaMA-Factory's, every step's line in
    ``trainer_log.jsonl`` holds flatpeft's metrics, the loss plots include them, and the optimizer is LLaMA-Factory's
    LoRA+ AdamW (two groups, learning rates ``lr`` and ``16 lr``) wrapped."""
    from llamafactory.train.sft import workflow

    original = workflow.CustomSeq2SeqTrainer
    out = tmp_path / "out"
    trainers = lf.train(sft_config(assets, out, flatpeft_method=method, **keys))
    assert workflow.CustomSeq2SeqTrainer is original  # the replaced names are put back
    (trainer,) = trainers
    opt = trainer.flatpeft_optimizer
    assert opt.method == method and opt.step_count == 3 and opt.total_steps == 3
    assert sorted({g["lr"] for g in opt.param_groups if g["params"]}) == pytest.approx([LR, RATIO * LR])
    b_ids = {id(p) for n, p in trainer.model.named_parameters() if "lora_B" in n}
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(RATIO * LR if id(p) in b_ids else LR)
    log = trainer_log(out)
    assert len(log) == len(plain_log) == 3
    assert log[0]["loss"] == plain_log[0]["loss"]
    assert all("flatpeft/perturbation_norm" in line for line in log)
    if method == "flatpo":  # two passes: the radius is rho, and the loss gap is logged
        assert all(line["flatpeft/perturbation_norm"] == pytest.approx(RHO, rel=1e-3) for line in log)
        assert all("flatpeft/loss_gap" in line for line in log)
        assert log[1]["loss"] != plain_log[1]["loss"]  # the method changed the training
        assert (out / "training_flatpeft_loss_gap.png").is_file()
    assert (out / "training_flatpeft_perturbation_norm.png").is_file()


STAGE_DATA = {"pt": "texts", "dpo": "pairs", "rm": "pairs", "kto": "kto"}
#: metrics LLaMA-Factory's trainers record inside compute_loss (trl's store_metrics), per stage
STAGE_METRICS = {"pt": (), "dpo": ("logps/chosen", "logps/rejected", "rewards/margins"), "rm": (),
                 "kto": ("logps/chosen", "logps/rejected", "kl")}


def first_log(out: Path) -> dict:
    """The first training entry of ``trainer_state.json``'s log history (every logged key, unrounded)."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return next(h for h in history if "loss" in h)


@pytest.fixture(scope="module")
def plain_stage_logs(assets, tmp_path_factory) -> dict[str, dict]:
    """Step 1 of plain LLaMA-Factory for the pt, dpo, rm and kto stages."""
    from llamafactory.train.tuner import run_exp

    logs = {}
    for stage, dataset in STAGE_DATA.items():
        out = tmp_path_factory.mktemp(f"lf-plain-{stage}")
        run_exp(args=sft_config(assets, out, stage=stage, dataset=dataset))
        logs[stage] = first_log(out)
    return logs


@pytest.mark.parametrize("stage,method", [("pt", "sam"), ("dpo", "flatpo"), ("rm", "sam"), ("kto", "flatpo")])
def test_other_stages_match_plain_at_step_1(assets, plain_stage_logs, tmp_path, stage, method):
    """pt, dpo, rm and kto through the launcher with a two-pass method: step 1's loss and the metrics the stage's trl
    trainer records inside compute_loss (log-probs, rewards, KL) are plain LLaMA-Factory's, taken at the unperturbed
    weights; the flatpeft metrics are logged; LoRA+ groups survive."""
    out = tmp_path / "out"
    (trainer,) = lf.train(sft_config(assets, out, stage=stage, dataset=STAGE_DATA[stage], flatpeft_method=method,
                                     flatpeft_rho=RHO))
    assert trainer.flatpeft_optimizer.passes == 2
    assert {g["lr"] for g in trainer.flatpeft_optimizer.param_groups if g["params"]} >= {LR, RATIO * LR}
    log, plain = first_log(out), plain_stage_logs[stage]
    assert log["loss"] == plain["loss"]
    for key in STAGE_METRICS[stage]:
        assert log[key] == plain[key], key
    assert log["flatpeft/loss_gap"] != 0 and "flatpeft/perturbation_norm" in trainer_log(out)[0]


def test_dpo_control_without_the_metric_snapshot(assets, plain_stage_logs, tmp_path, monkeypatch):
    """Control: without ``_stored_metrics`` in the snapshot, DPO's step-1 metrics mix in pass 2 (at w + e)."""
    from flatpeft.integrations import SharpnessAwareMixin

    monkeypatch.setattr(lf, "METRIC_ATTRIBUTES", SharpnessAwareMixin.flatpeft_metric_attributes)
    out = tmp_path / "out"
    lf.train(sft_config(assets, out, stage="dpo", dataset="pairs", flatpeft_method="flatpo", flatpeft_rho=0.5))
    assert first_log(out)["logps/chosen"] != plain_stage_logs["dpo"]["logps/chosen"]


def test_config_errors_name_the_file_and_key(assets, tmp_path):
    """A bad flatpeft key stops the launcher before LLaMA-Factory runs (exit 2, nothing written); the other
    messages: tests/test_llamafactory_config.py."""
    cfg = tmp_path / "sft.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump(sft_config(assets, out, flatpeft_method="sam", flatpeft_fraction=0.1)))
    run = subprocess.run([sys.executable, "-m", "flatpeft.integrations.llamafactory", "train", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert f"{cfg}: flatpeft_fraction is not a keyword of method 'sam'" in run.stderr
    assert not out.exists()


def test_command_line_run_with_overrides(assets, tmp_path):
    """``python -m flatpeft.integrations.llamafactory train cfg.yaml key=value``: the run a user types."""
    cfg = tmp_path / "sft.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump(sft_config(assets, tmp_path / "elsewhere", flatpeft_method="sam")))
    run = subprocess.run([sys.executable, "-m", "flatpeft.integrations.llamafactory", "train", str(cfg),
                          f"output_dir={out}", "max_steps=2", "flatpeft_rho=0.1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = trainer_log(out)
    assert len(log) == 2 and all(line["flatpeft/perturbation_norm"] == pytest.approx(0.1, rel=1e-3) for line in log)
