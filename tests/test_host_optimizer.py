"""Wrap, do not replace: flatpeft runs around the optimizer the host builds.

``flatpeft.create_optimizer(base_optimizer=...)`` takes a class, a factory such as ``functools.partial`` or an
optimizer *instance* (kept as is: groups, learning rates, state); ``SharpnessAwareMixin`` wraps the optimizer its
Trainer builds (LoRA+ groups survive); a plain ``Trainer`` handed a flatpeft optimizer refuses before step 1's
forward pass; single-pass methods also run from ``SharpnessAwareCallback`` alone; the method's schedules run over
the Trainer's steps on every supported transformers version.

This file uses only what the lowest supported versions have (transformers 4.46, peft 0.13, accelerate 1.0):
``tests/test_deps_floor.py`` runs it in a venv holding exactly those (``-m floor``). The data set is one batch
(12 examples, batch 12), so the sampler's order does not matter.
"""
from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import Trainer, TrainerCallback, TrainingArguments

import flatpeft
from flatpeft.integrations import SharpnessAwareCallback, SharpnessAwareMixin, SharpnessAwareTrainer

N, D_IN, D_HIDDEN, D_OUT = 12, 6, 8, 3
LR = 0.05


class LossMLP(nn.Module):
    """``lin0 -> tanh -> lin1`` returning ``{"loss", "logits"}`` like a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(D_IN, D_HIDDEN)
        self.lin1 = nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.lin1(torch.tanh(self.lin0(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_model(seed: int = 0) -> nn.Module:
    """A float64 peft LoRA model (r=2 on lin0 and lin1, non-zero B so every method perturbs something)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(LossMLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"])).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    return model


class DictDataset(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, D_OUT, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}

    def batch(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "labels": self.y}


def make_args(out, **overrides) -> TrainingArguments:
    kw = dict(output_dir=str(out), report_to="none", use_cpu=True, per_device_train_batch_size=N, max_steps=3,
              learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
              optim="adamw_torch", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
              dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(a, b, atol=1e-12, rtol=1e-10) -> None:
    sa, sb = trainable(a), trainable(b)
    assert sa.keys() == sb.keys()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


def closure_loop(model, opt, data: DictDataset, steps: int = 3) -> None:
    """The engine's closure API, one full batch per step."""
    for _ in range(steps):
        def closure():
            loss = model(**data.batch())["loss"]
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        opt.step(closure)


def lora_plus_groups(model, lr: float = LR, ratio: float = 16.0) -> list[dict]:
    """LoRA+ (Hayou et al., 2024; LLaMA-Factory's ``loraplus_lr_ratio``): the B factors learn ``ratio`` x faster."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "lora_B" not in n], "lr": lr},
            {"params": [p for n, p in named if "lora_B" in n], "lr": lr * ratio}]


class LoraPlusTrainer(Trainer):
    """A host Trainer that builds its own optimizer, like LLaMA-Factory's ``create_custom_optimizer``."""

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(lora_plus_groups(self.model), lr=LR, weight_decay=0.0)
        return super().create_optimizer(*args, **kwargs)


class SharpnessAwareLoraPlusTrainer(SharpnessAwareMixin, LoraPlusTrainer):
    pass


class _Forwards:
    """Counts forward passes of a module."""

    def __init__(self, model: nn.Module) -> None:
        self.n = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.n += 1


class _RhoTrace(TrainerCallback):
    """The flatpeft optimizer's radius at every optimizer step."""

    def __init__(self) -> None:
        self.trainer = None
        self.rho: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.rho.append(self.trainer.flatpeft_optimizer.current_rho())


# ---------------------------------------------------------------- create_optimizer(base_optimizer=...)
def test_instance_is_wrapped_with_groups_lrs_and_state():
    """An optimizer instance is wrapped as is: the same groups (two learning rates) and state tensors, and its step
    count goes on; ``base`` through flatpeft takes exactly the steps the instance alone takes."""
    data = DictDataset()
    model, ref = make_model(), make_model()
    base = torch.optim.AdamW(lora_plus_groups(model), lr=LR, weight_decay=0.0)
    ref_base = torch.optim.AdamW(lora_plus_groups(ref), lr=LR, weight_decay=0.0)
    for m, o in ((model, base), (ref, ref_base)):  # one step before wrapping: Adam state exists
        o.zero_grad()
        m(**data.batch())["loss"].backward()
        o.step()
    state_before = {id(p): s["exp_avg"] for p, s in base.state.items()}
    opt = flatpeft.create_optimizer(model, "base", base_optimizer=base)
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    assert [g["lr"] for g in opt.param_groups] == [LR, 16 * LR]
    assert all(base.state[p]["exp_avg"] is state_before[id(p)] for p in base.state)
    closure_loop(model, opt, data, steps=2)
    closure_loop(ref, ref_base, data, steps=2)
    assert_same_weights(model, ref, atol=0, rtol=0)
    assert all(float(s["step"]) == 3 for s in base.state.values())


def test_partial_and_class_build_the_same_optimizer():
    """A ``functools.partial`` of an optimizer class is a factory like the class; its bound keywords reach the
    groups and further keywords are checked against what remains of its signature."""
    data = DictDataset()
    a, b = make_model(), make_model()
    opt_a = flatpeft.create_optimizer(a, "sam", base_optimizer=functools.partial(torch.optim.AdamW, betas=(0.8, 0.9)),
                                      lr=LR, weight_decay=0.0, rho=0.05)
    opt_b = flatpeft.create_optimizer(b, "sam", base_optimizer=torch.optim.AdamW, betas=(0.8, 0.9), lr=LR,
                                      weight_decay=0.0, rho=0.05)
    assert opt_a.param_groups[0]["betas"] == (0.8, 0.9)
    closure_loop(a, opt_a, data)
    closure_loop(b, opt_b, data)
    assert_same_weights(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'momentum'.*partial\\(AdamW"):
        flatpeft.create_optimizer(make_model(), "sam", base_optimizer=functools.partial(torch.optim.AdamW), momentum=0.9)


def test_base_optimizer_errors_name_the_argument_without_a_repr():
    """Each refusal names the argument in one line; no message prints an optimizer's repr (every tensor)."""
    model = make_model()
    inst = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    cases = [
        (dict(base_optimizer=inst, lr=0.1), "'lr' cannot apply"),
        (dict(base_optimizer=inst, params=[p for p in model.parameters() if p.requires_grad]), "params"),
        (dict(base_optimizer=flatpeft.create_optimizer(model, "sam")), "already a flatpeft optimizer"),
        (dict(base_optimizer=torch.optim.AdamW([nn.Parameter(torch.zeros(3, 2))])), r"\[0\]\['params'\]\[0\] \(shape \(3, 2\)\)"),
        (dict(base_optimizer=42), "Invalid base_optimizer: an object of type int"),
        (dict(base_optimizer=lambda groups, **kw: 42), "returned an object of type int"),
        (dict(base_optimizer="lion"), "Invalid base_optimizer: 'lion'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            flatpeft.create_optimizer(model, "sam", **kwargs)
        message = str(err.value)
        assert "Parameter containing" not in message and "tensor(" not in message and "\n" not in message
        assert len(message) < 600


# ---------------------------------------------------------------- the mixin wraps the host's optimizer
def test_mixin_keeps_lora_plus_groups(tmp_path):
    """The mixin wraps what the host Trainer builds: LoRA+'s two groups at two learning rates survive, and the
    weights equal the closure loop around the same two-group AdamW."""
    data = DictDataset()
    model, ref = make_model(), make_model()
    trainer = SharpnessAwareLoraPlusTrainer(model=model, args=make_args(tmp_path), train_dataset=data,
                                            flatpeft_method="sam", flatpeft_kwargs={"rho": 0.05})
    trainer.train()
    base = trainer.flatpeft_optimizer.base_optimizer
    assert isinstance(base, torch.optim.AdamW)
    assert [g["lr"] for g in base.param_groups] == [LR, 16 * LR]
    opt = flatpeft.create_optimizer(ref, "sam", base_optimizer=torch.optim.AdamW(lora_plus_groups(ref), lr=LR, weight_decay=0.0),
                                    rho=0.05, total_steps=3, seed=0)
    closure_loop(ref, opt, data)
    assert_same_weights(model, ref)


def test_mixin_wraps_a_given_plain_optimizer(tmp_path):
    """``optimizers=(torch_optimizer, None)`` with ``flatpeft_method``: that optimizer is wrapped, not refused."""
    data = DictDataset()
    model, ref = make_model(), make_model()
    given = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    trainer = SharpnessAwareTrainer(model=model, args=make_args(tmp_path), train_dataset=data,
                                    optimizers=(given, None), flatpeft_method="flatpo", flatpeft_kwargs={"rho": 0.05})
    trainer.train()
    assert trainer.flatpeft_optimizer.base_optimizer is given
    opt = flatpeft.create_optimizer(ref, "flatpo", base_optimizer=torch.optim.SGD, lr=LR, momentum=0.9, rho=0.05,
                                    total_steps=3, seed=0)
    closure_loop(ref, opt, data)
    assert_same_weights(model, ref)


def test_base_settings_in_flatpeft_kwargs_are_set_on_the_host_groups(tmp_path):
    """A key of ``flatpeft_kwargs`` that is not a method keyword is set on every group of the host's optimizer;
    one its groups do not have is refused, naming it."""
    trainer = SharpnessAwareLoraPlusTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=DictDataset(),
                                            flatpeft_method="sam", flatpeft_kwargs={"rho": 0.05, "betas": (0.5, 0.6)})
    trainer.create_optimizer()
    assert [g["betas"] for g in trainer.flatpeft_optimizer.param_groups] == [(0.5, 0.6)] * 2
    assert [g["lr"] for g in trainer.flatpeft_optimizer.param_groups] == [LR, 16 * LR]
    trainer = SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=DictDataset(),
                                    flatpeft_method="sam", flatpeft_kwargs={"momentum": 0.9})
    with pytest.raises(ValueError, match="flatpeft_kwargs: 'momentum'.*AdamW"):
        trainer.create_optimizer()


@pytest.mark.skipif("optimizer_cls_and_kwargs" not in inspect.signature(Trainer.__init__).parameters,
                    reason="this transformers has no optimizer_cls_and_kwargs")
def test_optimizer_cls_and_kwargs(tmp_path):
    """``optimizer_cls_and_kwargs=(SGD, {...})`` builds the base optimizer the mixin wraps; a flatpeft class there
    is refused at construction with the way to do it."""
    data = DictDataset()
    model, ref = make_model(), make_model()
    trainer = SharpnessAwareTrainer(model=model, args=make_args(tmp_path), train_dataset=data, flatpeft_method="sam",
                                    flatpeft_kwargs={"rho": 0.05},
                                    optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": LR, "momentum": 0.9}))
    trainer.train()
    assert isinstance(trainer.flatpeft_optimizer.base_optimizer, torch.optim.SGD)
    opt = flatpeft.create_optimizer(ref, "sam", base_optimizer=torch.optim.SGD, lr=LR, momentum=0.9, rho=0.05,
                                    total_steps=3, seed=0)
    closure_loop(ref, opt, data)
    assert_same_weights(model, ref)
    for cls in (flatpeft.SharpnessAware, flatpeft.create_optimizer):
        with pytest.raises(ValueError, match="optimizer_cls_and_kwargs: give the base optimizer"):
            SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path), train_dataset=data,
                                  flatpeft_method="sam", optimizer_cls_and_kwargs=(cls, {}))


# ---------------------------------------------------------------- the plain Trainer route
@pytest.mark.parametrize("method", ["sam", "eflat-lora"])
def test_plain_trainer_refuses_before_the_first_forward(tmp_path, method):
    """``Trainer(optimizers=(flatpeft_opt, None))`` would never perturb (or fail after step 1's passes): it raises
    before any forward pass, naming the mixin, and the weights are untouched."""
    model = make_model()
    before = trainable(model)
    forwards = _Forwards(model)
    opt = flatpeft.create_optimizer(model, method, base_optimizer=torch.optim.AdamW, lr=LR, total_steps=3)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=DictDataset(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="SharpnessAwareTrainer.*SharpnessAwareMixin"):
        trainer.train()
    assert forwards.n == 0
    for n, p in trainable(model).items():
        assert torch.equal(p, before[n]), n


def test_plain_trainer_still_runs_methods_that_do_not_perturb(tmp_path):
    """``base`` (and spider, nbar, obar) never perturb: a plain Trainer steps them like any optimizer."""
    data = DictDataset()
    model, ref = make_model(), make_model()
    opt = flatpeft.create_optimizer(model, "base", base_optimizer=torch.optim.AdamW, lr=LR, weight_decay=0.0)
    Trainer(model=model, args=make_args(tmp_path), train_dataset=data, optimizers=(opt, None)).train()
    closure_loop(ref, flatpeft.create_optimizer(ref, "base", base_optimizer=torch.optim.AdamW, lr=LR, weight_decay=0.0), data)
    assert_same_weights(model, ref)


# ---------------------------------------------------------------- the callback route
@pytest.mark.parametrize("method,kw", [("eflat-lora", {"rho": 0.05}), ("flat-lora-random", {})])
def test_callback_route_equals_the_mixin(tmp_path, method, kw):
    """A single-pass method run by ``SharpnessAwareCallback`` on a plain Trainer gives the mixin's weights (3 steps,
    2 micro-batches per step) and logs ``flatpeft/perturbation_norm``."""
    data = DictDataset()
    args = dict(per_device_train_batch_size=N // 2, gradient_accumulation_steps=2)
    mixed = SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path / "m", **args), train_dataset=data,
                                  flatpeft_method=method, flatpeft_kwargs=kw)
    mixed.train()
    model = make_model()
    opt = flatpeft.create_optimizer(model, method, base_optimizer=torch.optim.AdamW, lr=LR, weight_decay=0.0, seed=0,
                                    total_steps=3, **kw)
    plain = Trainer(model=model, args=make_args(tmp_path / "c", **args), train_dataset=data, optimizers=(opt, None),
                    callbacks=[SharpnessAwareCallback(opt)])
    plain.train()
    assert opt.step_count == 3
    assert_same_weights(mixed.model, model)
    norms = [h["flatpeft/perturbation_norm"] for h in plain.state.log_history if "loss" in h]
    assert norms == [h["flatpeft/perturbation_norm"] for h in mixed.state.log_history if "loss" in h]
    assert len(norms) == 3 and norms[-1] > 0


def test_callback_refuses_an_optimizer_the_trainer_does_not_step(tmp_path):
    """A callback whose optimizer is not the one the Trainer steps stops at the first step, naming the fix."""
    model = make_model()
    opt = flatpeft.create_optimizer(model, "eflat-lora", base_optimizer=torch.optim.AdamW, lr=LR, total_steps=3)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=DictDataset(),
                      callbacks=[SharpnessAwareCallback(opt)])
    with pytest.raises((RuntimeError, ValueError), match="optimizers=\\(opt, None\\)"):
        trainer.train()


def test_callback_refuses_two_pass_methods():
    opt = flatpeft.create_optimizer(make_model(), "sam", base_optimizer=torch.optim.AdamW, lr=LR)
    with pytest.raises(ValueError, match="two gradient passes.*SharpnessAwareMixin.*eflat-lora"):
        SharpnessAwareCallback(opt)


# ---------------------------------------------------------------- total_steps on every transformers version
@pytest.mark.parametrize("method", ["flat-lora", "flat-lora-random"])
def test_schedules_run_over_the_trainers_steps(tmp_path, method):
    """``total_steps`` is the Trainer's step count on every transformers version (4.46-4.57 build the optimizer
    before ``state.max_steps`` is set): flat-lora's radius decays over the 3 steps, and the run equals the closure
    loop given ``total_steps=3``."""
    data = DictDataset()
    model, ref = make_model(), make_model()
    trace = _RhoTrace()
    trainer = SharpnessAwareTrainer(model=model, args=make_args(tmp_path), train_dataset=data, flatpeft_method=method,
                                    callbacks=[trace])
    trace.trainer = trainer
    trainer.train()
    assert trainer.flatpeft_optimizer.total_steps == 3
    if method == "flat-lora":
        assert trace.rho[0] > trace.rho[1] > trace.rho[2]
    opt = flatpeft.create_optimizer(ref, method, base_optimizer=torch.optim.AdamW, lr=LR, weight_decay=0.0,
                                    total_steps=3, seed=0)
    closure_loop(ref, opt, data)
    assert_same_weights(model, ref)


def test_a_second_train_call_uses_its_own_step_count(tmp_path):
    """The optimizer built for a first ``train()`` follows the step count of a later one (``max_steps`` 2, then 5)."""
    trainer = SharpnessAwareTrainer(model=make_model(), args=make_args(tmp_path, max_steps=2), train_dataset=DictDataset(),
                                    flatpeft_method="flat-lora")
    trainer.train()
    assert trainer.flatpeft_optimizer.total_steps == 2
    trainer.args.max_steps = 5
    trainer.train()
    assert trainer.flatpeft_optimizer.total_steps == 5
