"""The core needs torch only: with every optional package made unimportable, ``import flatpeft`` and every
method that does not need peft run on a plain torch model; the parts that need an extra say which one.

Each check runs in a fresh interpreter whose import system refuses the optional packages (a meta-path finder
that takes the place of the path finder), so what the parent process has already imported does not leak in.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: every package an extra installs (import names), plus what they pull in
OPTIONAL = (
    "transformers", "peft", "accelerate", "trl", "datasets", "huggingface_hub", "tokenizers", "safetensors",
    "numpy", "scipy", "matplotlib", "pandas", "pyarrow", "yaml", "sklearn", "tensorboard", "tqdm", "rdata", "gguf",
    "PIL",
)

BLOCKER = """
import sys
from importlib.machinery import PathFinder

BLOCKED = set({blocked!r})


class _NotInstalled(PathFinder):
    # the path finder, except that the blocked packages are not found: exactly as if they were not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_NotInstalled if f is PathFinder else f for f in sys.meta_path]
assert not [m for m in sys.modules if m.partition(".")[0] in BLOCKED]
"""


def run_blocked(body: str, blocked=OPTIONAL, timeout: float = 240) -> subprocess.CompletedProcess:
    code = BLOCKER.format(blocked=tuple(blocked)) + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return res


CORE_RUN = """
import torch
from torch import nn
import flatpeft

torch.set_num_threads(1)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not leaked, leaked


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin1(torch.tanh(self.norm(self.lin0(x))))


g = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
ran, refused = [], []
for name in flatpeft.METHODS:
    info = flatpeft.get_method(name)
    torch.manual_seed(0)
    model = Net()
    if info.needs_lora:
        try:
            flatpeft.create_optimizer(model, name, lr=1e-2)
        except ValueError as err:  # names what it needs instead of failing on a missing import
            assert "LoRA" in str(err), (name, str(err))
            refused.append(name)
            continue
        raise AssertionError(f"{name} accepted a model without LoRA layers")
    opt = flatpeft.create_optimizer(model, name, base_optimizer="sgd", lr=0.1, rho=0.05)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.zero_grad()
        loss = opt.step(closure)
        assert torch.isfinite(torch.as_tensor(loss)).all(), name
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), f"{name} did not update"
    assert all(torch.isfinite(p).all() for p in model.parameters()), name
    ran.append(name)

leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not leaked, leaked
print("RAN", ",".join(ran))
print("REFUSED", ",".join(refused))
"""


LORA_RUN = """
import torch
from torch import nn
import flatpeft

torch.set_num_threads(1)


class LoRALinear(nn.Module):
    # a hand-written LoRA layer: y = x W0^T + b + s x A^T B^T, W0 and b frozen
    def __init__(self, d_in, d_out, r=2, alpha=4.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / d_in ** 0.5)
        self.lora_B = nn.Parameter(0.1 * torch.randn(d_out, r))
        self.scaling = alpha / r

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) + self.scaling * (x @ self.lora_A.t() @ self.lora_B.t())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = LoRALinear(6, 8)
        self.lin1 = LoRALinear(8, 3)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


g = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
ran = []
for name in flatpeft.METHODS:
    torch.manual_seed(0)
    model = Net()
    frozen = [p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad]
    lora = [p.detach().clone() for n, p in model.named_parameters() if p.requires_grad]
    opt = flatpeft.create_optimizer(model, name, base_optimizer="sgd", lr=0.1, rho=0.05, total_steps=3)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.zero_grad()
        loss = opt.step(closure)
        assert torch.isfinite(torch.as_tensor(loss)).all(), name
    now_frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(frozen, now_frozen)), f"{name} changed frozen weights"
    now_lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(lora, now_lora)), f"{name} did not update"
    ran.append(name)

leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not leaked, leaked
print("RAN", ",".join(ran))
"""


def test_core_runs_every_method_on_a_hand_written_lora_model():
    res = run_blocked(LORA_RUN)
    assert res.returncode == 0, res.stdout + res.stderr
    ran = next(line for line in res.stdout.splitlines() if line.startswith("RAN ")).split(" ", 1)[1].split(",")
    assert {"flat-lora", "eflat-lora", "flat-lora-random", "nbar", "obar", "flatpo", "sam"} <= set(ran), ran


def test_core_runs_every_non_peft_method_with_torch_only():
    res = run_blocked(CORE_RUN)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("RAN ", "REFUSED ")))
    ran = set(lines["RAN"].split(","))
    # the methods that work on any trainable tensor
    assert {"base", "sam", "asam", "flatpo", "spider"} <= ran, lines


@pytest.mark.parametrize("statement, blocked, extra", [
    ("import flatpeft.experiments", ("yaml", "pandas"), "cli"),
    ("import flatpeft.analysis", ("scipy",), "analysis"),
    ("import flatpeft.multimodal", ("PIL",), "multimodal"),
    ("from flatpeft.integrations import SharpnessAwareTrainer", ("transformers", "peft", "accelerate"), "hf"),
])
def test_missing_extra_is_named(statement, blocked, extra):
    res = run_blocked(f"""
        try:
            {statement}
        except ImportError as err:
            print("ERROR", err)
        else:
            print("IMPORTED")
        """, blocked=blocked)
    assert res.returncode == 0, res.stderr
    assert "ERROR" in res.stdout, res.stdout
    assert f"pip install 'flatpeft[{extra}]'" in res.stdout, res.stdout


def test_require_helper():
    from flatpeft._extras import EXTRAS, missing, require

    assert missing("torch", "flatpeft_no_such_module_xyz") == ["flatpeft_no_such_module_xyz"]
    require("hf", "torch")  # present: no error
    with pytest.raises(ImportError, match=r"pip install 'flatpeft\[cli\]'"):
        require("cli", "flatpeft_no_such_module_xyz")
    with pytest.raises(ValueError, match="unknown extra"):
        require("nosuch")
    assert set(EXTRAS) >= {"hf", "analysis", "cli", "multimodal", "trl"}
