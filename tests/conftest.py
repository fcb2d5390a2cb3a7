"""Shared fixtures: tiny float64 models (an MLP and its peft LoRA version), a functional loss, and the
single-thread fixtures (tiny models on a shared CPU run 10-80x faster with one intra-op thread, measured)."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (use with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def single_thread_module():
    """One intra-op thread for a whole module, including its module-scoped fixtures that request it."""
    with torch_threads(1):
        yield


class MLP(nn.Module):
    """``lin0 -> tanh -> lin1 -> tanh -> head``: two LoRA targets and a classifier head."""

    def __init__(self, d_in: int = 6, d_hidden: int = 5, d_mid: int = 4, d_out: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.drop = nn.Dropout(dropout)
        self.lin1 = nn.Linear(d_hidden, d_mid)
        self.head = nn.Linear(d_mid, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin1(self.drop(torch.tanh(self.lin0(x))))))


def make_lora_mlp(seed: int = 0, r: int = 2, alpha: int = 4, dropout: float = 0.0, nonzero_b: bool = True,
                  head_scale: float = 1.0) -> nn.Module:
    """A float64 peft LoRA MLP: LoRA on ``lin0`` and ``lin1``, the ``head`` trained in full (``modules_to_save``),
    so every method meets a trainable tensor that is not an adapter. ``B`` is made non-zero so every method has
    work to do; ``head_scale`` multiplies the head's weights (a small one shrinks the gradients upstream of the head, making the head the sharpest tensor)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin0", "lin1"], modules_to_save=["head"])
    model = get_peft_model(MLP(dropout=dropout), cfg)
    model = model.double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and nonzero_b:
                p.copy_(0.3 * torch.randn_like(p))
            if "modules_to_save" in n and "weight" in n:
                p.mul_(head_scale)
    return model


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().double()


def _register_custom_method() -> None:
    """A method registered the way users add one (SAM on the top half of the adapters, normalised over them), so the
    registry-wide contract tests cover user methods without naming them."""
    import flatpeft
    from flatpeft.perturb import GradientAscent, chain, normalize_global, scale_by_rho, select_top_fraction

    if "test-custom" in flatpeft.method_names():
        return

    def build(fraction: float = 0.5):
        return [GradientAscent(chain(select_top_fraction(fraction), normalize_global(), scale_by_rho()),
                               target="adapters")]

    flatpeft.register_method(flatpeft.MethodInfo("test-custom", build, defaults={"rho": 0.1}, summary="test-only custom method"))


_register_custom_method()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def make_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure():
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure
