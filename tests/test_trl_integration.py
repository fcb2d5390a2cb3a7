"""SharpnessAwareMixin with trl's SFTTrainer: metrics count each example once, at the unperturbed weights.

A tiny Llama (hidden 32, 2 layers, built from its config, no download) with a word-level tokenizer built in
memory, peft LoRA on q/v, and a few sentences. trl records ``num_tokens``, ``mean_token_accuracy`` and
``entropy`` inside ``compute_loss``, i.e. once per forward pass; with a two-pass method the mixin must keep only
pass 1's records.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install 'flatpeft[trl]')")

from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

from flatpeft.integrations import SharpnessAwareMixin

WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()
TEXTS = [
    "the cat sat on the mat", "a dog ran under the log", "the big red cat sat",
    "a small blue dog ran on the mat and then sat", "the dog sat on the big mat", "a cat ran",
    "the red dog and the blue cat sat on a log", "then the cat ran under the mat",
]
METRICS = ("mean_token_accuracy", "entropy")


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_lora_llama(vocab_size: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            task_type="CAUSAL_LM"))


def sft_args(out) -> SFTConfig:
    return SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     logging_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
                     report_to="none", use_cpu=True, save_strategy="no", bf16=False, max_length=32, disable_tqdm=True,
                     seed=0, train_sampling_strategy="sequential")


class SharpnessAwareSFTTrainer(SharpnessAwareMixin, SFTTrainer):
    pass


class _CleanWeights(TrainerCallback):
    """The trainable weights at the start of every optimizer step (before any pass: unperturbed)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return control


def _train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def _with_recorded_batches(cls):
    """``cls`` that also keeps every micro-batch ``training_step`` receives (the Trainer's collated inputs)."""

    class Recording(cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.recorded_batches.append(dict(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


@pytest.fixture(scope="module")
def setup():
    from datasets import Dataset

    tokenizer = make_tokenizer()
    return tokenizer, Dataset.from_dict({"text": TEXTS}), make_lora_llama(len(tokenizer))


def _run(cls, setup, out, **kwargs):
    tokenizer, ds, model = setup
    clean = _CleanWeights()
    trainer = _with_recorded_batches(cls)(model=copy.deepcopy(model), args=sft_args(out), train_dataset=ds,
                                          processing_class=tokenizer, callbacks=[clean], **kwargs)
    trainer.recorded_batches = []
    trainer.train()
    return trainer, clean


@pytest.fixture(scope="module")
def plain_run(setup, tmp_path_factory):
    """The plain SFTTrainer run (no flatpeft), and a second plain SFTTrainer used to compute reference metrics."""
    plain, _ = _run(SFTTrainer, setup, tmp_path_factory.mktemp("plain"))
    tokenizer, ds, model = setup
    ref = SFTTrainer(model=copy.deepcopy(model), args=sft_args(tmp_path_factory.mktemp("ref")), train_dataset=ds,
                     processing_class=tokenizer)
    return plain, ref


def _metrics_at(ref, state, batches) -> dict[str, float]:
    """trl's own metrics (``SFTTrainer.compute_loss`` of ``ref``) of ``batches`` at the weights ``state``, averaged
    like its log."""
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            if n in state:
                p.copy_(state[n])
    ref.model.train()
    ref._metrics["train"].clear()
    with torch.no_grad():
        for mb in batches:
            ref.compute_loss(ref.model, dict(mb))
    return {k: sum(ref._metrics["train"][k]) / len(ref._metrics["train"][k]) for k in METRICS}


def test_sft_metrics_count_once_at_unperturbed_weights(setup, plain_run, tmp_path):
    """sam through ``SharpnessAwareMixin + SFTTrainer``: ``num_tokens`` per log equals the plain SFTTrainer's, and
    ``mean_token_accuracy`` / ``entropy`` equal trl's own computation at the step's unperturbed weights."""
    sam, clean = _run(SharpnessAwareSFTTrainer, setup, tmp_path / "sam", flatpeft_method="sam", flatpeft_kwargs={"rho": 0.5})
    plain, ref = plain_run
    assert sam.flatpeft_optimizer.passes == 2
    logs, plain_logs = _train_logs(sam), _train_logs(plain)
    assert len(logs) == len(plain_logs) == 2
    assert [h["num_tokens"] for h in logs] == [h["num_tokens"] for h in plain_logs]
    assert sam._total_train_tokens == plain._total_train_tokens
    # micro-batches the mixin saw, per optimizer step (2 per step; the passes re-use them internally)
    assert len(sam.recorded_batches) == 4
    for step, log in enumerate(logs):
        expected = _metrics_at(ref, clean.states[step], sam.recorded_batches[2 * step: 2 * step + 2])
        for key in METRICS:
            assert log[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        assert log["flatpeft/loss_gap"] > 0  # the perturbation was large enough to matter
    # step 1 starts from the same weights as the plain trainer: the same metrics
    for key in METRICS:
        assert logs[0][key] == pytest.approx(plain_logs[0][key], rel=1e-5, abs=1e-7)


def test_sft_control_without_metric_snapshot(setup, plain_run, tmp_path):
    """Control: a hand-made combination without the metric snapshot counts tokens twice and mixes in pass 2."""

    class NoSnapshot(SharpnessAwareSFTTrainer):
        flatpeft_metric_attributes = ()

    sam, clean = _run(NoSnapshot, setup, tmp_path / "ctl", flatpeft_method="sam", flatpeft_kwargs={"rho": 0.5})
    plain, ref = plain_run
    assert sam._total_train_tokens == 2 * plain._total_train_tokens
    expected = _metrics_at(ref, clean.states[0], sam.recorded_batches[:2])
    assert _train_logs(sam)[0]["entropy"] != pytest.approx(expected["entropy"], rel=1e-5, abs=1e-7)
