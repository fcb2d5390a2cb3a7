"""SharpnessAwareTrainer: parity with plain flatpeft loops, gradient accumulation, RNG replay, clipping, logging.

Every test runs a real ``transformers.Trainer`` (CPU, float64, tiny peft LoRA model, sequential sampler) and
compares its weights with an independent path: the engine's closure API in a plain loop, the two-call API with
explicit clipping, the same Trainer with a different accumulation split, or a float64 hand computation.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import flatpeft
from flatpeft.integrations import SharpnessAwareMixin, SharpnessAwareTrainer, unwrap_optimizer

N_SAMPLES = 12
D_IN, D_HIDDEN, D_OUT = 6, 8, 3


class LossMLP(nn.Module):
    """``lin0 -> tanh -> dropout -> lin1`` returning ``{"loss", "logits"}`` like a transformers model."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.lin0 = nn.Linear(D_IN, D_HIDDEN)
        self.drop = nn.Dropout(dropout)
        self.lin1 = nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.lin1(self.drop(torch.tanh(self.lin0(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """A float64 peft LoRA model (r=2 on lin0 and lin1, non-zero B so every method perturbs something)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(LossMLP(dropout), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"])).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    return model


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.fixture
def dataset() -> DictDataset:
    g = torch.Generator().manual_seed(7)
    return DictDataset(torch.randn(N_SAMPLES, D_IN, generator=g, dtype=torch.float64), torch.randint(0, D_OUT, (N_SAMPLES,), generator=g))


def make_args(out, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(out), report_to="none", use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        max_steps=3, learning_rate=0.05, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, optim="adamw_torch", train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def train_with_trainer(model, dataset, tmp_path, method, method_kwargs=None, **arg_overrides) -> SharpnessAwareTrainer:
    trainer = SharpnessAwareTrainer(
        model=model, args=make_args(tmp_path, **arg_overrides), train_dataset=dataset,
        flatpeft_method=method, flatpeft_kwargs=method_kwargs or {},
    )
    trainer.train()
    return trainer


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(a, b, atol=1e-12, rtol=1e-10) -> None:
    sa, sb = trainable_state(a), trainable_state(b)
    assert sa.keys() == sb.keys()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


def batch_of(dataset, start, size):
    return {"x": dataset.x[start : start + size], "labels": dataset.y[start : start + size]}


def plain_closure_loop(model, dataset, method, method_kwargs, *, steps=3, batch=4, lr=0.05):
    """The engine's closure API in a plain loop, with the base optimizer the Trainer builds for adamw_torch."""
    opt = flatpeft.create_optimizer(model, method, base_optimizer=torch.optim.AdamW, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0, **method_kwargs)
    for s in range(steps):
        b = batch_of(dataset, s * batch, batch)

        def closure(b=b):
            loss = model(**b)["loss"]
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    return opt


def _registry_cases() -> list:
    """(method, flatpeft_kwargs) over the live registry: every method with its defaults, and every method whose
    default ``rho_schedule`` is constant once more with a cosine schedule (so each method runs a schedule)."""
    from flatpeft.optim import method_names

    cases = []
    for name in method_names():
        cases.append(pytest.param(name, {}, id=f"{name}-defaults"))
        if flatpeft.get_method(name).all_defaults().get("rho_schedule", "constant") == "constant":
            cases.append(pytest.param(name, {"rho_schedule": "cosine"}, id=f"{name}-cosine"))
    return cases


class _TraceCallback(TrainerCallback):
    """Per optimizer step: the step's rho (just before ``optimizer.step()``) and perturbation norm (after it)."""

    def __init__(self) -> None:
        self.rho: list[float] = []
        self.pnorm: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.rho.append(self.trainer.flatpeft_optimizer.current_rho())
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pnorm.append(float(self.trainer.flatpeft_optimizer.metrics.get("perturbation_norm", torch.tensor(0.0))))
        return control


def traced_closure_loop(model, dataset, method, method_kwargs, *, steps=3, batch=4, lr=0.05):
    """``plain_closure_loop`` that also returns the per-step rho and perturbation norm."""
    opt = flatpeft.create_optimizer(model, method, base_optimizer=torch.optim.AdamW, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0, **method_kwargs)
    rho, pnorm = [], []
    for s in range(steps):
        b = batch_of(dataset, s * batch, batch)

        def closure(b=b):
            loss = model(**b)["loss"]
            loss.backward()
            return loss

        rho.append(opt.current_rho())
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        pnorm.append(float(opt.metrics.get("perturbation_norm", torch.tensor(0.0))))
    return opt, rho, pnorm


@pytest.mark.parametrize("method,kw", _registry_cases())
def test_trainer_defaults_match_plain_closure_loop(tmp_path, dataset, method, kw):
    """Every registered method, with the Trainer's defaults: its schedules and ramps run over the Trainer's optimizer
    steps (``total_steps = max_steps``) and its seed is ``TrainingArguments.seed``. The Trainer's weights, rho and
    perturbation norm per step equal the engine's own ``step(closure)`` loop given ``total_steps=3, seed=1``."""
    init = make_model()
    reference = copy.deepcopy(init)
    trace = _TraceCallback()
    trainer = SharpnessAwareTrainer(model=copy.deepcopy(init), args=make_args(tmp_path, seed=1), train_dataset=dataset,
                                    flatpeft_method=method, flatpeft_kwargs=kw, callbacks=[trace])
    trace.trainer = trainer
    trainer.train()
    opt = trainer.flatpeft_optimizer
    assert (opt.total_steps, opt.seed) == (3, 1)
    _, rho, pnorm = traced_closure_loop(reference, dataset, method, {**kw, "total_steps": 3, "seed": 1})
    assert trainer.state.global_step == 3
    assert trace.rho == pytest.approx(rho, rel=1e-12)
    assert trace.pnorm == pytest.approx(pnorm, rel=1e-9, abs=1e-12)
    assert_same_weights(trainer.model, reference)
    # and training moved the weights at all (the comparison is not between two untouched models)
    moved = max((p - q).abs().max().item() for p, q in zip(trainable_state(trainer.model).values(), trainable_state(init).values()))
    assert moved > 1e-3
    # the schedule is active: rho decays over the 3 steps wherever a schedule is set (by default or by kw)
    if flatpeft.get_method(method).all_defaults().get("rho_schedule", "constant") != "constant" or kw:
        assert trace.rho[0] > trace.rho[1] > trace.rho[2] > 0


def test_flat_lora_random_ramp_runs_over_trainer_steps(tmp_path, dataset):
    """flat-lora-random's noise ramps from 0 (step 0) upwards over the Trainer's steps; not full noise from step 0."""
    trace = _TraceCallback()
    trainer = SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=dataset,
                                    flatpeft_method="flat-lora-random", callbacks=[trace])
    trace.trainer = trainer
    trainer.train()
    assert trace.pnorm[0] == 0.0
    assert 0.0 < trace.pnorm[1] < trace.pnorm[2]


def test_passes_varying_by_step_match_plain_closure_loop(tmp_path, dataset):
    """``ascent_every=2``: sam runs 2 passes on even steps and 1 (re-used ascent) on odd steps; the Trainer follows
    the step's own pass count (forward count) and equals the closure loop."""
    init = make_model()
    calls = {"n": 0}
    model = copy.deepcopy(init)
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer = train_with_trainer(model, dataset, tmp_path, "sam", {"rho": 0.05, "ascent_every": 2})
    assert calls["n"] == 2 + 1 + 2
    reference = copy.deepcopy(init)
    traced_closure_loop(reference, dataset, "sam", {"rho": 0.05, "ascent_every": 2, "total_steps": 3, "seed": 0})
    assert_same_weights(trainer.model, reference)


def test_seed_follows_training_seed_unless_given(tmp_path, dataset):
    """The method's private seed is ``TrainingArguments.seed``; ``flatpeft_kwargs["seed"]`` wins; so do
    ``total_steps`` (even ``None``: no schedule) and ``rho_schedule``."""
    trainer = train_with_trainer(make_model(), dataset, tmp_path / "a", "flat-lora-random", {}, seed=7)
    assert trainer.flatpeft_optimizer.seed == 7 and trainer.flatpeft_optimizer.total_steps == 3
    trainer = train_with_trainer(make_model(), dataset, tmp_path / "b", "flat-lora-random", {"seed": 3, "total_steps": 10}, seed=7)
    assert trainer.flatpeft_optimizer.seed == 3 and trainer.flatpeft_optimizer.total_steps == 10
    trainer = train_with_trainer(make_model(), dataset, tmp_path / "c", "flat-lora", {"total_steps": None})
    assert trainer.flatpeft_optimizer.total_steps is None


@pytest.mark.parametrize("method,kw", [("sam", {"rho": 0.05}), ("flatpo", {"rho": 0.05}), ("eflat-lora", {"rho": 0.05})])
def test_gradient_accumulation_equals_full_batch(tmp_path, dataset, method, kw):
    """2 half-batches accumulated == 1 full batch: the ascent uses the whole step's gradient, pass 2 all micro-batches."""
    init = make_model()
    full = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "full", method, kw, per_device_train_batch_size=4)
    accum = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "acc", method, kw,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert full.state.global_step == accum.state.global_step == 3
    assert_same_weights(full.model, accum.model)
    # the logged training loss (pass 1, unperturbed) is the same step mean in both
    lf = [h["loss"] for h in full.state.log_history if "loss" in h]
    la = [h["loss"] for h in accum.state.log_history if "loss" in h]
    assert lf == pytest.approx(la, rel=1e-6)


def test_perturbed_micro_batchwise_sam_would_differ(tmp_path, dataset):
    """Control for the test above: SAM per micro-batch (a perturbation from each half-batch) gives other weights."""
    init = make_model()
    acc = train_with_trainer(copy.deepcopy(init), dataset, tmp_path, "sam", {"rho": 0.05},
                             per_device_train_batch_size=2, gradient_accumulation_steps=2)
    naive = copy.deepcopy(init)
    opt = flatpeft.create_optimizer(naive, "sam", base_optimizer=torch.optim.AdamW, lr=0.05, weight_decay=0.0, rho=0.05)
    for s in range(3):
        grads = None
        for half in range(2):
            b = batch_of(dataset, 4 * s + 2 * half, 2)
            opt.zero_grad(set_to_none=True)
            (naive(**b)["loss"] / 2).backward()
            opt.first_step()
            (naive(**b)["loss"] / 2).backward()
            opt.restore()
            g = [p.grad.clone() for p in opt.trainable]
            grads = g if grads is None else [a + c for a, c in zip(grads, g)]
        for p, g in zip(opt.trainable, grads):
            p.grad = g
        opt.base_optimizer.step()
    sa, sn = trainable_state(acc.model), trainable_state(naive)
    assert max((sa[n] - sn[n]).abs().max().item() for n in sa) > 1e-8


def test_clipping_applies_to_the_update_gradient_only(tmp_path, dataset):
    """max_grad_norm clips the pass-2 gradient (Trainer's clip after training_step) == two-call loop with clip."""
    init = make_model()
    trainer = train_with_trainer(copy.deepcopy(init), dataset, tmp_path, "sam", {"rho": 0.05}, max_grad_norm=0.01)
    ref = copy.deepcopy(init)
    opt = flatpeft.create_optimizer(ref, "sam", base_optimizer=torch.optim.AdamW, lr=0.05, weight_decay=0.0, rho=0.05)
    for s in range(3):
        b = batch_of(dataset, 4 * s, 4)
        opt.zero_grad(set_to_none=True)
        ref(**b)["loss"].backward()          # pass 1: unclipped
        opt.first_step()
        ref(**b)["loss"].backward()          # pass 2
        torch.nn.utils.clip_grad_norm_(opt.trainable, 0.01)
        opt.second_step()
    assert_same_weights(trainer.model, ref)
    unclipped = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "u", "sam", {"rho": 0.05})
    st, su = trainable_state(trainer.model), trainable_state(unclipped.model)
    assert max((st[n] - su[n]).abs().max().item() for n in st) > 1e-6


def test_metrics_in_log_history(tmp_path, dataset):
    """flatpeft/perturbation_norm == rho for SAM; flatpeft/loss_gap == L(w+e) - L(w) computed by hand in float64."""
    rho = 0.05
    init = make_model()
    trainer = train_with_trainer(copy.deepcopy(init), dataset, tmp_path, "sam", {"rho": rho})
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    for h in logs:
        assert h["flatpeft/perturbation_norm"] == pytest.approx(rho, rel=1e-6)

    # independent first step: e = rho g / ||g|| over the trainable tensors
    m = copy.deepcopy(init)
    params = [p for p in m.parameters() if p.requires_grad]
    b = batch_of(dataset, 0, 4)
    loss0 = m(**b)["loss"]
    grads = torch.autograd.grad(loss0, params)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
        loss1 = m(**b)["loss"]
    assert logs[0]["loss"] == pytest.approx(loss0.item(), rel=1e-6)
    assert logs[0]["flatpeft/loss_gap"] == pytest.approx((loss1 - loss0).item(), rel=1e-5, abs=1e-9)
    assert logs[0]["flatpeft/loss_gap"] > 0  # first order: gap ~ rho * ||g|| > 0


def test_metrics_only_at_logging_steps(tmp_path, dataset):
    trainer = train_with_trainer(make_model(), dataset, tmp_path, "sam", {"rho": 0.05}, logging_steps=2, max_steps=3)
    steps = [h["step"] for h in trainer.state.log_history if "flatpeft/perturbation_norm" in h]
    assert steps == [2]  # step 2 is a logging step; the trailing step 3 is not logged by the Trainer's loop


def test_single_pass_method_trains(tmp_path, dataset):
    """eflat-lora runs one forward/backward per micro-batch and moves the weights; its EMA perturbation is logged."""
    init = make_model()
    calls = {"n": 0}
    model = copy.deepcopy(init)
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer = train_with_trainer(model, dataset, tmp_path, "eflat-lora", {"rho": 0.05},
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert trainer.flatpeft_optimizer.passes == 1
    assert calls["n"] == 6  # 3 steps x 2 micro-batches x 1 pass
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and "flatpeft/perturbation_norm" in logs[-1] and "flatpeft/loss_gap" not in logs[-1]
    assert logs[0]["flatpeft/perturbation_norm"] == 0.0  # the EMA starts at zero: step 0 is plain LoRA
    assert logs[-1]["flatpeft/perturbation_norm"] > 0.0


def test_two_pass_forward_count(tmp_path, dataset):
    calls = {"n": 0}
    model = make_model()
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    train_with_trainer(model, dataset, tmp_path, "sam", {"rho": 0.05}, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert calls["n"] == 12  # 3 steps x 2 micro-batches x 2 passes


def test_rng_replay_dropout_masks_and_stream(tmp_path, dataset):
    """With dropout on, pass 2 of each micro-batch sees pass 1's mask, and a two-pass run ends with the RNG where
    a one-pass (base) run ends."""
    masks: list[torch.Tensor] = []
    model = make_model(dropout=0.5)
    drop = model.get_base_model().drop
    drop.register_forward_hook(lambda mod, inp, out: masks.append((out == 0) & (inp[0] != 0)))
    train_with_trainer(model, dataset, tmp_path, "sam", {"rho": 0.05}, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, max_steps=2)
    rng_sam = torch.get_rng_state()
    assert len(masks) == 8  # 2 steps x (pass 1: mb0, mb1; pass 2: mb0, mb1)
    for s in range(2):
        p1 = masks[4 * s : 4 * s + 2]
        p2 = masks[4 * s + 2 : 4 * s + 4]
        assert torch.equal(p1[0], p2[0]) and torch.equal(p1[1], p2[1])
        assert not torch.equal(p1[0], p1[1])
        assert 0 < p1[0].sum() < p1[0].numel()
    masks.clear()
    train_with_trainer(make_model(dropout=0.5), dataset, tmp_path / "b", "base", {}, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, max_steps=2)
    assert torch.equal(torch.get_rng_state(), rng_sam)


def test_grad_scaler_path_matches_unscaled(tmp_path, dataset):
    """fp16-style GradScaler: pass-1 grads are divided by the scale (no ``unscale_``, which the Trainer's own step
    needs), pass 2 goes through ``scaler.step``; with a power-of-two scale the weights equal the unscaled run."""
    init = make_model()
    plain = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "p", "sam", {"rho": 0.05})
    trainer = SharpnessAwareTrainer(model=copy.deepcopy(init), args=make_args(tmp_path / "s"), train_dataset=dataset,
                                    flatpeft_method="sam", flatpeft_kwargs={"rho": 0.05})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    trainer.accelerator.scaler = scaler  # CPU accelerate has no fp16 scaler; inject one (accelerator.backward uses it)
    trainer.train()
    assert scaler.get_scale() == 2.0**10  # no overflow, no skipped step
    assert_same_weights(trainer.model, plain.model)


def test_skipped_step_restores_weights(tmp_path, dataset, monkeypatch):
    """If the scaler skips ``optimizer.step()`` (inf in pass 2), the callback puts the clean weights back."""
    from accelerate import Accelerator

    model = make_model()
    trainer = SharpnessAwareTrainer(model=model, args=make_args(tmp_path), train_dataset=dataset, flatpeft_method="sam")
    opt = trainer.create_optimizer()
    clean = trainable_state(model)
    model(**batch_of(dataset, 0, 4))["loss"].backward()
    opt.first_step()
    assert max((p - clean[n]).abs().max().item() for n, p in trainable_state(model).items()) > 0
    callback = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "_AfterOptimizerStep")
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    callback.on_optimizer_step(trainer.args, trainer.state, trainer.control)
    after = trainable_state(model)
    assert all(torch.equal(after[n], clean[n]) for n in clean)


def test_rho_schedule_defaults_to_trainer_steps(tmp_path, dataset):
    trainer = train_with_trainer(make_model(), dataset, tmp_path, "sam", {"rho": 0.05, "rho_schedule": "cosine"})
    assert trainer.flatpeft_optimizer.total_steps == 3


def test_constructor_errors(tmp_path, dataset):
    with pytest.raises(ValueError, match="flatpeft_method"):
        SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=dataset, flatpeft_method="nosuch")
    with pytest.raises(ValueError, match="flatpeft_method"):
        SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=dataset)
    m = make_model()
    with pytest.raises(ValueError, match="optimizers\\[0\\] must be a torch.optim.Optimizer"):
        SharpnessAwareTrainer(model=m, args=make_args(tmp_path), train_dataset=dataset, flatpeft_method="sam",
                              optimizers=(object(), None))
    with pytest.raises(ValueError, match="flatpeft_kwargs"):
        SharpnessAwareTrainer(model=m, args=make_args(tmp_path), train_dataset=dataset, flatpeft_method="sam", flatpeft_kwargs=[1])


def test_prebuilt_flatpeft_optimizer_accepted(tmp_path, dataset):
    init = make_model()
    m = copy.deepcopy(init)
    opt = flatpeft.create_optimizer(m, "sam", base_optimizer="adamw", lr=0.05, weight_decay=0.0, rho=0.05)
    trainer = SharpnessAwareTrainer(model=m, args=make_args(tmp_path), train_dataset=dataset, optimizers=(opt, None))
    trainer.train()
    ref = copy.deepcopy(init)
    plain_closure_loop(ref, dataset, "sam", {"rho": 0.05})
    assert_same_weights(m, ref)


def _doc_blocks() -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _doc_block(*needles: str) -> str:
    found = [b for b in _doc_blocks() if all(n in b for n in needles)]
    assert len(found) == 1, needles
    return found[0]


def test_docs_examples_run(tmp_path, monkeypatch):
    """Every Python block of docs/trainer.md that needs no real model (the mixin, callback, accelerate, closure and
    gradient_passes examples) runs as written."""
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _doc_blocks() if "flatpeft.assets" not in b]
    assert len(blocks) == 5
    for code in blocks:
        ns: dict = {}
        exec(compile(code, "docs/trainer.md", "exec"), ns)
        if "loss" in ns:
            assert torch.isfinite(torch.as_tensor(ns["loss"]).detach())
    assert sum("loss" in b for b in blocks) >= 3


@pytest.mark.slow
def test_docs_trainer_example_minilm_finefoods(tmp_path, monkeypatch):
    """The Trainer example of docs/trainer.md (real MiniLM + LoRA, 64 Fine Foods reviews, FlatPO, 4 steps)."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_doc_block("flatpeft.assets", "SharpnessAwareTrainer"), "docs/trainer.md", "exec"), ns)
    trainer = ns["trainer"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        # normalize_over="all" (default): radius rho * ||g_S|| / ||g|| <= rho
        assert 0 < h["flatpeft/perturbation_norm"] <= 0.05 + 1e-6
        assert "flatpeft/loss_gap" in h and 0 < h["loss"] < 2


@pytest.mark.slow
def test_docs_trl_example_smollm2(tmp_path, monkeypatch):
    """The trl example of docs/trainer.md (real SmolLM2-135M + LoRA via SFTTrainer's peft_config, sam, 2 steps)."""
    pytest.importorskip("trl", reason="trl is not installed (pip install 'flatpeft[trl]')")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_doc_block("flatpeft.assets", "SFTTrainer"), "docs/trainer.md", "exec"), ns)
    trainer = ns["trainer"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert logs[1]["num_tokens"] == trainer._total_train_tokens
    for h in logs:
        assert 0 <= h["mean_token_accuracy"] <= 1 and h["flatpeft/perturbation_norm"] == pytest.approx(0.05, rel=1e-4)


@pytest.mark.slow
def test_minilm_finefoods_trainer_runs(tmp_path):
    """Real model and data: MiniLM + LoRA on 64 Fine Foods reviews (seq 32), FlatPO through the Trainer, 4 steps."""
    import pandas as pd
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import flatpeft.assets as assets

    path = assets.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    df = pd.read_csv(assets.finefoods_splits()["train"]).head(64)
    enc = tok(list(df["text"]), truncation=True, max_length=32, padding="max_length", return_tensors="pt")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(df["label"][i])}
            for i in range(len(df))]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    args = make_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=4, learning_rate=5e-4)
    trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=rows, flatpeft_method="flatpo",
                                    flatpeft_kwargs={"rho": 0.05, "fraction": 0.05, "normalize_over": "selected"})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    # normalize_over="selected": the perturbation of the selected tensors has norm exactly rho
    assert all(h["flatpeft/perturbation_norm"] == pytest.approx(0.05, rel=1e-4) for h in logs)
    assert all(0 < h["loss"] < 2 for h in logs)


def test_bf16_autocast_matches_plain_autocast_loop(tmp_path, dataset):
    """bf16=True: each pass runs under the Trainer's autocast; equals a plain closure loop under torch.autocast."""
    init = make_model().float()
    ds32 = DictDataset(dataset.x.float(), dataset.y)
    trainer = SharpnessAwareTrainer(model=copy.deepcopy(init), args=make_args(tmp_path, bf16=True), train_dataset=ds32,
                                    flatpeft_method="sam", flatpeft_kwargs={"rho": 0.05})
    trainer.train()
    ref = copy.deepcopy(init)
    opt = flatpeft.create_optimizer(ref, "sam", base_optimizer=torch.optim.AdamW, lr=0.05, weight_decay=0.0, rho=0.05)
    for s in range(3):
        b = batch_of(ds32, 4 * s, 4)

        def closure(b=b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = ref(**b)["loss"]
            loss.float().backward()
            return loss

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    assert_same_weights(trainer.model, ref, atol=1e-6, rtol=1e-5)
    fp32 = train_with_trainer(copy.deepcopy(init), ds32, tmp_path / "f", "sam", {"rho": 0.05})
    st, sf = trainable_state(trainer.model), trainable_state(fp32.model)
    assert max((st[n] - sf[n]).abs().max().item() for n in st) > 1e-6  # autocast really was on


@pytest.mark.parametrize("sync_ascent_grad,expected", [(False, 3), (True, 2)])
def test_pass1_runs_under_no_sync(tmp_path, dataset, sync_ascent_grad, expected):
    """Per optimizer step with 2 micro-batches: pass 1 entirely under ``accelerator.no_sync`` (2 calls) unless
    ``sync_ascent_grad``, where only its first micro-batch is (1); pass 2 syncs on its last micro-batch only (1)."""
    trainer = SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path, per_device_train_batch_size=2,
                                                                        gradient_accumulation_steps=2, max_steps=1),
                                    train_dataset=dataset, flatpeft_method="sam", sync_ascent_grad=sync_ascent_grad)
    original = trainer.accelerator.no_sync
    calls = []

    def recording_no_sync(model):
        calls.append(model)
        return original(model)

    trainer.accelerator.no_sync = recording_no_sync
    trainer.train()
    # the Trainer itself wraps micro-batch 1 of the window in no_sync (1 call); ours come on top
    assert len(calls) == 1 + expected


_DDP_SCRIPT = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from test_trainer_integration import DictDataset, make_args, make_model, trainable_state
from flatpeft.integrations import SharpnessAwareMixin, SharpnessAwareTrainer, unwrap_optimizer
g = torch.Generator().manual_seed(7)
ds = DictDataset(torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
trainer = SharpnessAwareTrainer(model=make_model(), args=make_args(sys.argv[2], per_device_train_batch_size=2, ddp_backend="gloo"),
                                train_dataset=ds, flatpeft_method="sam", flatpeft_kwargs={"rho": 0.05},
                                sync_ascent_grad=sys.argv[3] == "1")
trainer.train()
if trainer.is_world_process_zero():
    logs = [h for h in trainer.state.log_history if "loss" in h]
    torch.save({"gap": [h["flatpeft/loss_gap"] for h in logs], "pnorm": [h["flatpeft/perturbation_norm"] for h in logs]},
               sys.argv[2] + "/logs.pt")
    save_file({k: v.contiguous() for k, v in trainable_state(trainer.accelerator.unwrap_model(trainer.model)).items()}, sys.argv[2] + "/w.safetensors")
'''


@pytest.mark.slow
def test_ddp_two_ranks(tmp_path, dataset):
    """torchrun, 2 CPU ranks (gloo), 2 samples each: with ``sync_ascent_grad=True`` (global perturbation) the weights
    equal one process with batch 4; with the default per-replica perturbation they differ."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    single = train_with_trainer(make_model(), dataset, tmp_path / "single", "sam", {"rho": 0.05})
    ref = trainable_state(single.model)
    results = {}
    for flag in ("1", "0"):
        out = tmp_path / f"ddp{flag}"
        out.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        torchrun = Path(sys.executable).with_name("torchrun")
        with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs here)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={port}", str(script),
                               str(Path(__file__).parent), str(out), flag], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[flag] = load_file(str(out / "w.safetensors"))
        logs = torch.load(out / "logs.pt", weights_only=True)
        assert logs["pnorm"] == pytest.approx([0.05] * 3, rel=1e-6)
        if flag == "1":  # rank-averaged gap of a global perturbation == the single-process full-batch gap
            assert logs["gap"] == pytest.approx([h["flatpeft/loss_gap"] for h in single.state.log_history if "loss" in h], rel=1e-5)
    for n in ref:
        torch.testing.assert_close(results["1"][n], ref[n], atol=1e-12, rtol=1e-10)
    assert max((results["0"][n] - ref[n]).abs().max().item() for n in ref) > 1e-8


@pytest.mark.parametrize("method", ["sam", "eflat-lora"])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, dataset, method):
    """Trainer checkpoint (adapter + optimizer state incl. flatpeft buffers such as the EFlat EMA) resumes exactly."""
    init = make_model()
    kw = {"rho": 0.05}
    full = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "full", method, kw, per_device_train_batch_size=2, max_steps=4)
    first = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "ckpt", method, kw, per_device_train_batch_size=2,
                               max_steps=4, save_strategy="steps", save_steps=2)
    assert_same_weights(first.model, full.model)
    resumed = SharpnessAwareTrainer(model=copy.deepcopy(init), args=make_args(tmp_path / "ckpt", per_device_train_batch_size=2,
                                                                               max_steps=4),
                                    train_dataset=dataset, flatpeft_method=method, flatpeft_kwargs=kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert resumed.flatpeft_optimizer.step_count == 4
    assert_same_weights(resumed.model, full.model)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm statistics, custom methods, the mixin, the accelerate-wrapped optimizer


class BNLossMLP(LossMLP):
    """``lin0 -> BatchNorm1d -> tanh -> lin1``: running statistics that a second pass could move."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(D_HIDDEN)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.lin1(torch.tanh(self.bn(self.lin0(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_bn_model(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(BNLossMLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"])).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def test_batchnorm_statistics_move_once_per_micro_batch(tmp_path, dataset):
    """One sam step over 2 micro-batches: the running statistics are those of pass 1 (at w), as in a base run
    (``num_batches_tracked == 2``, same running mean and variance); pass 2 at w + e does not move them."""
    runs = {}
    for method in ("base", "sam"):
        trainer = train_with_trainer(make_bn_model(), dataset, tmp_path / method, method, {"rho": 0.5},
                                     per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
        runs[method] = trainer.model.get_base_model().bn
    base, sam = runs["base"], runs["sam"]
    assert int(base.num_batches_tracked) == 2
    assert int(sam.num_batches_tracked) == int(base.num_batches_tracked)
    torch.testing.assert_close(sam.running_mean, base.running_mean, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(sam.running_var, base.running_var, atol=1e-12, rtol=1e-10)
    assert sam.track_running_stats  # switched back on after the step


def test_registered_custom_method_is_accepted(tmp_path, dataset):
    """A method added with ``flatpeft.register_method`` after import is usable by name in the Trainer."""
    import dataclasses

    from flatpeft.optim import registry

    name = "trainer-test-custom-sam"
    assert name not in flatpeft.METHODS
    flatpeft.register_method(dataclasses.replace(flatpeft.get_method("sam"), name=name))
    try:
        init = make_model()
        custom = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "c", name, {"rho": 0.05})
        assert custom.flatpeft_optimizer.method == name
        sam = train_with_trainer(copy.deepcopy(init), dataset, tmp_path / "s", "sam", {"rho": 0.05})
        assert_same_weights(custom.model, sam.model)
    finally:
        registry.unregister_method(name)  # keep the registry as other tests expect it


class RecordingTrainer(Trainer):
    """A Trainer subclass that records metrics inside ``compute_loss``, the way trl's trainers do."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = {"train": {"accuracy": [], "examples": []}}
        self._total_train_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        acc = (out["logits"].argmax(-1) == inputs["labels"]).double().mean().item()
        self._metrics["train"]["accuracy"].append(acc)
        self._total_train_tokens += len(inputs["labels"])
        self._metrics["train"]["examples"] = [self._total_train_tokens]
        return (out["loss"], out) if return_outputs else out["loss"]


class SharpnessAwareRecordingTrainer(SharpnessAwareMixin, RecordingTrainer):
    pass


@pytest.mark.parametrize("method", ["sam", "eflat-lora"])
def test_mixin_keeps_pass1_metrics_of_the_subclass(tmp_path, dataset, method):
    """The mixin composes with a Trainer subclass; what the subclass records in ``compute_loss`` during pass 2 is
    dropped: each example counted once, accuracy of pass 1 (the unperturbed weights for a two-pass method)."""
    init = make_model()
    trainer = SharpnessAwareRecordingTrainer(
        model=copy.deepcopy(init), args=make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                  max_steps=1),
        train_dataset=dataset, flatpeft_method=method, flatpeft_kwargs={"rho": 0.5})
    assert isinstance(trainer, RecordingTrainer)
    calls = {"n": 0}
    trainer.model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer.train()
    passes = trainer.flatpeft_optimizer.passes
    assert calls["n"] == 2 * passes  # the passes did run
    assert trainer._total_train_tokens == 4
    acc = trainer._metrics["train"]["accuracy"]
    assert len(acc) == 2
    if passes == 2:
        with torch.no_grad():
            expected = [(init(**batch_of(dataset, i, 2))["logits"].argmax(-1) == dataset.y[i:i + 2]).double().mean().item()
                        for i in (0, 2)]
        assert acc == expected


def test_mixin_control_without_metric_snapshot_counts_twice(tmp_path, dataset):
    """Control for the test above: with ``flatpeft_metric_attributes = ()`` pass 2 is recorded too."""

    class NoSnapshot(SharpnessAwareRecordingTrainer):
        flatpeft_metric_attributes = ()

    trainer = NoSnapshot(model=make_model(), args=make_args(tmp_path, per_device_train_batch_size=2,
                                                            gradient_accumulation_steps=2, max_steps=1),
                         train_dataset=dataset, flatpeft_method="sam", flatpeft_kwargs={"rho": 0.5})
    trainer.train()
    assert trainer._total_train_tokens == 8
    assert len(trainer._metrics["train"]["accuracy"]) == 4


def test_mixin_needs_a_trainer():
    class NotATrainer(SharpnessAwareMixin):
        pass

    with pytest.raises(TypeError, match="transformers.Trainer"):
        NotATrainer(flatpeft_method="sam")


def test_accelerate_wrapped_optimizer_is_unwrapped(tmp_path, dataset):
    """During ``train()`` accelerate wraps ``trainer.optimizer``; ``trainer.flatpeft_optimizer`` (or
    ``unwrap_optimizer``) is the flatpeft optimizer with ``passes``, ``first_step``, ``metrics``."""
    from accelerate.optimizer import AcceleratedOptimizer

    trainer = train_with_trainer(make_model(), dataset, tmp_path, "sam", {"rho": 0.05})
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    assert unwrap_optimizer(trainer.optimizer) is trainer.flatpeft_optimizer
    assert isinstance(trainer.flatpeft_optimizer, flatpeft.SharpnessAware)
    assert trainer.flatpeft_optimizer.passes == 2 and trainer.flatpeft_optimizer.step_count == 3
    with pytest.raises(ValueError, match="SharpnessAware"):
        unwrap_optimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
