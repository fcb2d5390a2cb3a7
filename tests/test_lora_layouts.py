"""Hand-written LoRA layouts (the contract of :mod:`flatpeft.adapters.lora`, docs/methods.md): the frozen layer may be
the module's own ``weight`` or a child named ``base_layer`` (peft), ``base`` or ``linear`` (litgpt). For each, the
five LoRA methods find the factors (``W0``, ``A``, ``B``, ``s``) and FlatPO ranks only ``A`` and ``B``, never the
trained head."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import flatpeft
from flatpeft.adapters.lora import find_lora_layers

LORA_METHODS = ("flat-lora", "eflat-lora", "flat-lora-random", "nbar", "obar")


class HandLoRA(nn.Module):
    """``y = base(x) + s x A^T B^T`` with the frozen base layer stored under ``base_name`` (None: own ``weight``)."""

    def __init__(self, n_in: int, n_out: int, base_name: str | None, r: int = 2, scaling: float = 2.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(n_in * 10 + n_out)
        if base_name is None:
            self.weight = nn.Parameter(torch.randn(n_out, n_in, generator=g), requires_grad=False)
        else:
            lin = nn.Linear(n_in, n_out)
            lin.requires_grad_(False)
            setattr(self, base_name, lin)
        self.base_name = base_name
        self.lora_A = nn.Parameter(torch.randn(r, n_in, generator=g) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(n_out, r, generator=g) * 0.1)
        self.scaling = scaling

    def frozen(self) -> nn.Module | nn.Parameter:
        return self.weight if self.base_name is None else getattr(self, self.base_name).weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = x @ self.weight.t() if self.base_name is None else getattr(self, self.base_name)(x)
        return base + self.scaling * (x @ self.lora_A.t()) @ self.lora_B.t()


class Net(nn.Module):
    def __init__(self, base_name: str | None) -> None:
        super().__init__()
        self.l0, self.l1 = HandLoRA(6, 5, base_name), HandLoRA(5, 4, base_name, scaling=0.5)
        self.head = nn.Linear(4, 3)  # trained in full: not an adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


LAYOUTS = [None, "base_layer", "base", "linear"]


def _loss(model: nn.Module):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("base_name", LAYOUTS)
def test_factors_are_found_for_each_layout(base_name):
    model = Net(base_name)
    found, skipped = find_lora_layers(model)
    assert skipped == [] and [f.name for f in found] == ["l0", "l1"]
    for f, mod in zip(found, (model.l0, model.l1)):
        assert f.A is mod.lora_A and f.B is mod.lora_B and f.scale == mod.scaling
        assert f.base_weight is mod.frozen()
        assert f.base_layer is (None if base_name is None else getattr(mod, base_name))


@pytest.mark.parametrize("base_name", LAYOUTS)
@pytest.mark.parametrize("method", LORA_METHODS)
def test_lora_methods_accept_each_layout_and_step(base_name, method):
    torch.manual_seed(0)
    model = Net(base_name)
    frozen = [m.frozen().detach().clone() for m in (model.l0, model.l1)]
    opt = flatpeft.create_optimizer(model, method, lr=0.05, total_steps=2)
    assert len(opt.lora) == 2
    before = model.l0.lora_B.detach().clone()
    opt.zero_grad()
    opt.step(_loss(model))
    assert not torch.equal(model.l0.lora_B, before)  # it trained
    for m, w0 in zip((model.l0, model.l1), frozen):  # and left W0 exactly as it was (no perturbation left behind)
        assert torch.equal(m.frozen(), w0)


@pytest.mark.parametrize("base_name", LAYOUTS)
def test_flatpo_ranks_only_the_adapters(base_name):
    model = Net(base_name)
    opt = flatpeft.create_optimizer(model, "flatpo", lr=0.05, rho=0.05, fraction=0.5)
    flags = dict(zip(opt.names, opt.adapters))
    assert flags == {"l0.lora_A": True, "l0.lora_B": True, "l1.lora_A": True, "l1.lora_B": True,
                     "head.weight": False, "head.bias": False}
    # the perturbation of the first pass touches the LoRA tensors only: the head is evaluated at its own weights
    closure = _loss(model)
    opt.zero_grad()
    closure()
    head = [p.detach().clone() for p in model.head.parameters()]
    lora = [p.detach().clone() for p in (model.l0.lora_A, model.l0.lora_B, model.l1.lora_A, model.l1.lora_B)]
    opt.first_step(zero_grad=True)
    assert all(torch.equal(p, h) for p, h in zip(model.head.parameters(), head))
    moved = [not torch.equal(p, q) for p, q in zip((model.l0.lora_A, model.l0.lora_B, model.l1.lora_A,
                                                     model.l1.lora_B), lora)]
    assert any(moved)
    closure()
    opt.second_step()


def test_other_names_are_not_lora():
    """Outside the contract (the frozen layer under another name): no factors, so the LoRA methods refuse by name."""
    model = Net("inner")
    assert find_lora_layers(model) == ([], [])
    with pytest.raises(ValueError, match="needs trainable LoRA layers"):
        flatpeft.create_optimizer(model, "eflat-lora", lr=0.1)
