"""Hessian operator tests: HVPs against torch.autograd.functional.hessian (float64), frozen-parameter
restriction, scipy LinearOperator view, eval mode, exact parameter restore, HF eager attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatpeft.analysis import HessianOperator, restore_parameters, trainable_parameters, use_eager_attention
from flatpeft.analysis.operators import MatrixOperator


pytestmark = pytest.mark.usefixtures("single_thread")


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.lin0 = nn.Linear(3, 4)
        self.lin1 = nn.Linear(4, 2)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.lin1(self.drop(torch.tanh(self.lin0(x))))


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture
def net_and_batches():
    torch.manual_seed(0)
    net = TinyNet().double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (5,), generator=gen))
        for _ in range(3)
    ]
    return net, batches


def full_hessian(net, batches, names):
    """Dense Hessian of the mean batch loss w.r.t. the named parameters, by torch.autograd.functional.hessian."""
    params = dict(net.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]

    def f(flat):
        chunks = torch.split(flat, sizes)
        values = dict(base)
        for n, c, s in zip(names, chunks, shapes):
            values[n] = c.reshape(s)
        total = 0.0
        for b in batches:
            total = total + ce_loss(lambda x: torch.func.functional_call(net, values, (x,)), b)
        return total / len(batches)

    flat0 = torch.cat([base[n].reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, flat0).numpy()


def test_hvp_matches_autograd_hessian_float64(net_and_batches):
    net, batches = net_and_batches
    op = HessianOperator(net, ce_loss, batches)
    names = [n for n, _ in net.named_parameters()]
    H = full_hessian(net, batches, names)
    assert op.dim == H.shape[0] == 4 * 3 + 4 + 2 * 4 + 2
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(op.dim)
        np.testing.assert_allclose(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    # the scipy view gives the same float64 product, and the dense matrix it spans is symmetric
    lin = op.as_linear_operator()
    assert lin.shape == (op.dim, op.dim) and lin.dtype == np.float64
    dense = lin @ np.eye(op.dim)
    np.testing.assert_allclose(dense, H, atol=1e-10)
    assert np.abs(H - H.T).max() < 1e-12


def test_hvp_restricted_to_trainable_parameters(net_and_batches):
    net, batches = net_and_batches
    net.lin0.weight.requires_grad_(False)
    net.lin1.bias.requires_grad_(False)
    op = HessianOperator(net, ce_loss, batches)
    assert op.names == ("lin0.bias", "lin1.weight")
    assert op.dim == 4 + 8
    H = full_hessian(net, batches, list(op.names))
    v = np.random.default_rng(1).standard_normal(op.dim)
    np.testing.assert_allclose(op.matvec(v), H @ v, atol=1e-10)
    # the same block of the full Hessian
    all_names = [n for n, _ in net.named_parameters()]
    H_all = full_hessian(net, batches, all_names)
    idx = np.r_[12:16, 16:24]
    np.testing.assert_allclose(H, H_all[np.ix_(idx, idx)], atol=1e-12)
    # .grad fields are never touched
    assert all(p.grad is None for p in net.parameters())


def test_gradient_matches_backward(net_and_batches):
    net, batches = net_and_batches
    op = HessianOperator(net, ce_loss, batches)
    loss, grads = op.gradient()
    total = sum(ce_loss(net, b) for b in batches) / len(batches)
    total.backward()
    assert loss == pytest.approx(float(total.detach()), abs=1e-14)
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(g, p.grad, atol=1e-14, rtol=0)


def test_eval_mode_makes_hvp_deterministic_and_mode_is_restored():
    torch.manual_seed(0)
    net = TinyNet(dropout=0.5).double().train()
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0]))]
    op = HessianOperator(net, ce_loss, batches)
    v = np.random.default_rng(0).standard_normal(op.dim)
    a, b = op.matvec(v), op.matvec(v)
    np.testing.assert_array_equal(a, b)
    assert net.training and net.drop.training
    assert op.num_matvecs == 2


def test_loss_at_restores_parameters_bit_exactly_even_on_error(net_and_batches):
    net, batches = net_and_batches
    op = HessianOperator(net, ce_loss, batches)
    before = [p.detach().clone() for p in net.parameters()]
    delta = np.random.default_rng(2).standard_normal(op.dim) * 0.3
    shifted = op.loss_at(delta)
    assert shifted != op.loss()
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)

    calls = {"n": 0}

    def failing(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return ce_loss(model, batch)

    op2 = HessianOperator(net, failing, batches)
    with pytest.raises(RuntimeError, match="boom"):
        op2.loss_at(delta)
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)


def test_restore_parameters_context():
    p = nn.Parameter(torch.randn(4, dtype=torch.float64))
    ref = p.detach().clone()
    with pytest.raises(ValueError):
        with restore_parameters([p]):
            with torch.no_grad():
                p.mul_(3.0).add_(1e-3)
            raise ValueError("x")
    assert torch.equal(p, ref)


def test_errors_name_the_argument(net_and_batches):
    net, batches = net_and_batches
    with pytest.raises(ValueError, match="batches"):
        HessianOperator(net, ce_loss, [])
    op = HessianOperator(net, ce_loss, batches)
    with pytest.raises(ValueError, match="length"):
        op.matvec(np.ones(op.dim + 1))
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        trainable_parameters(net)
    with pytest.raises(ValueError, match="symmetric"):
        MatrixOperator(np.array([[1.0, 2.0], [0.0, 1.0]]))


def test_peft_bert_hvp_with_eager_attention_matches_finite_differences():
    """Real HF + peft path: eager attention gives double backward; H v == central difference of gradients."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=2, max_position_embeddings=16,
    )
    model = transformers.BertForSequenceClassification(cfg)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    ).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    assert use_eager_attention(model)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 30, (3, 5), generator=gen), "labels": torch.tensor([0, 1, 1])}
        for _ in range(2)
    ]
    op = HessianOperator(model, lambda m, b: m(**b).loss, batches)
    assert all(("lora_" in n) or ("classifier" in n) for n in op.names)
    v = np.random.default_rng(0).standard_normal(op.dim)
    hv = op.matvec(v)
    h = 1e-5
    vt = op.split(v)
    gp = op.flatten(op.gradient_at([h * t for t in vt])[1])
    gm = op.flatten(op.gradient_at([-h * t for t in vt])[1])
    np.testing.assert_allclose(hv, (gp - gm) / (2 * h), atol=1e-7)
    assert np.linalg.norm(hv) > 1e-3


def test_analyze_model_pipeline_on_peft_bert_against_dense_hessian(tmp_path):
    """Whole pipeline on a tiny peft BERT: eigenvalues vs numpy eigvalsh of the dense Hessian, trace within 4
    standard errors, parameters bit-identical and train mode restored afterwards."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from flatpeft.analysis import AnalysisSettings, analyze_model, write_report

    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        num_labels=2, max_position_embeddings=16,
    )
    model = peft.get_peft_model(
        transformers.BertForSequenceClassification(cfg),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.train()
    gen = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 30, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 1, 0])}]
    loss_fn = lambda m, b: m(**b).loss
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = AnalysisSettings(top_k=2, eig_tol=0.0, hutchinson_samples=64, ascent_steps=2,
                                landscape_points_1d=5, landscape_points_2d=3, progress=False)
    report = analyze_model(model, loss_fn, batches, settings)
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    use_eager_attention(model)
    op = HessianOperator(model, loss_fn, batches)
    H = op.as_linear_operator() @ np.eye(op.dim)
    lam = np.linalg.eigvalsh((H + H.T) / 2)[::-1]
    np.testing.assert_allclose(report.top_eigenvalues, lam[:2], rtol=1e-6, atol=1e-9)
    assert abs(report.trace - np.trace(H)) <= 4 * report.trace_std_error
    assert report.num_parameters == op.dim == 2 * (2 * 8 + 8 * 2) + 8 * 2 + 2
    paths = write_report(report, tmp_path)
    with np.load(paths["elements"], allow_pickle=False) as z:
        np.testing.assert_allclose(z["gradient"], op.flatten(op.gradient()[1]), atol=1e-14)
        assert list(z["names"]) == list(op.names)
