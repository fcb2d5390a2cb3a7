"""``flat-lora-random``: Flat-LoRA of Li et al. (arXiv 2409.14396, ICML 2025). 1 pass.

Filter-wise Gaussian noise on the frozen ``W0`` of every LoRA layer: ``sigma_i = f_t rho ||W[i,:]|| / sqrt(m)``
of the merged weight ``W = W0 + s B A``, ``f_t = (1 - cos(pi t / T)) / 2`` a cosine ramp from 0 to 1 over
``total_steps`` (1 without), ``eps_ij ~ N(0, sigma_i^2)`` (docs/algorithms.md, "Flat-LoRA (Li et al.)").

The noise is applied *functionally*: while the step is perturbed, a forward hook on each LoRA module adds
``x eps^T`` to its output, which is exactly the output at ``W0 + eps``; a custom autograd function regenerates
``eps`` from its seed in the backward pass instead of saving it. So the frozen weights are never written (they
stay bit-identical; the reference's in-place add and subtract drifts in bf16, and a snapshot would hold a copy of
every targeted weight), and the extra memory is one layer's noise at a time. Each layer's noise comes from a
private generator seeded by ``(seed, step, rank, module)``; a module with several active adapters gets one noise,
scaled by the row norms of its whole merged weight (:func:`merged_modules`): the same noise for every micro-batch of a step and in
the backward pass, reproducible, never the global RNG; each DDP rank draws its own noise (``per_rank_noise=True``,
the Monte-Carlo reading of the method; ``False`` gives every rank rank 0's noise).
Defaults ``rho = 0.05``, ``T = 1`` (nblt/Flat-LoRA README).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from flatpeft._dist import gather_dim0, is_sharded, local
from flatpeft.adapters.lora import LoRAFactors
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import StepState, step_generator
from flatpeft.perturb.rules import Rule
from flatpeft.perturb.schedules import cosine_ramp

__all__ = ["FilterNoise", "merged_modules", "row_sigma", "row_sigmas", "build"]


def _row_sigma(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, rho: float, cols: int) -> torch.Tensor:
    """``rho * ||(W0 + s B A)[i, :]|| / sqrt(cols)`` for the rows ``i`` of ``w0`` (n_local x m) and ``b``
    (n_local x r) with the whole ``a`` (r x m), without forming ``W``:
    ``||W0_i||^2 + 2 s <W0_i A^T, B_i> + s^2 B_i K_A B_i^T`` (at least float32)."""
    cd = torch.promote_types(w0.dtype, torch.float32)
    b = b.to(cd)
    w0a = (w0 @ a.to(w0.dtype).t()).to(cd)
    a32 = a.to(cd)
    sq = (
        torch.linalg.vector_norm(w0, dim=1, dtype=cd).square()
        + 2.0 * scale * (w0a * b).sum(1)
        + scale**2 * ((b @ (a32 @ a32.t())) * b).sum(1)
    )
    return rho * sq.clamp_min(0.0).sqrt() / (cols**0.5)


@torch.no_grad()
def row_sigma(f: LoRAFactors, rho: float) -> torch.Tensor:
    """``rho * ||(W0 + s B A)[i, :]|| / sqrt(m)`` for every output row ``i`` of an unsharded layer."""
    w0 = f.w0_matrix()
    return _row_sigma(w0, f.a_matrix(), f.b_matrix(), f.scale, rho, w0.shape[1])


@torch.no_grad()
def row_sigmas(layers: list[LoRAFactors], rho: float) -> list[torch.Tensor]:
    """:func:`row_sigma` of every layer, whole (``n`` floats each), also when the weights are sharded (FSDP2).

    Sharded layers: ``W0`` and ``B`` are split by rows the same way, so each rank computes the row norms of its
    own rows with the whole ``A`` (``r x in``, one all-gather for all layers), and one all-gather of the ``n``
    scales per layer makes them whole on every rank (the forward hook sees whole activations). ``W0`` itself is
    never gathered. One code path: unsharded layers are the case of a single shard.
    """
    sharded = [i for i, f in enumerate(layers) if is_sharded(f.base_weight)]
    for i in sharded:
        f = layers[i]
        if f.fan_in_fan_out or not is_sharded(f.B) or f.base_weight.shape[0] != f.B.shape[0]:
            raise NotImplementedError(
                f"flat-lora-random on the sharded layer {f.name}: only LoRA layers whose base weight and B are both "
                "sharded by output rows (FSDP2 fully_shard of nn.Linear / nn.Conv LoRA) are supported, not "
                "fan_in_fan_out (GPT-2 Conv1D) storage"
            )
    As = [layers[i].A for i in sharded]
    whole_a = dict(zip(sharded, gather_dim0([local(a) for a in As], As))) if sharded else {}
    out = []
    for i, f in enumerate(layers):
        if i not in whole_a:
            out.append(row_sigma(f, rho))
            continue
        w0 = local(f.base_weight).reshape(local(f.base_weight).shape[0], -1)
        a = whole_a[i].reshape(whole_a[i].shape[0], -1)
        b = local(f.B).reshape(local(f.B).shape[0], -1)
        out.append(_row_sigma(w0, a, b, f.scale, rho, f.base_weight.numel() // f.base_weight.shape[0]))
    if sharded:
        whole = gather_dim0([out[i] for i in sharded], [layers[i].base_weight for i in sharded],
                            [(layers[i].base_weight.shape[0],) for i in sharded])
        for i, sig in zip(sharded, whole):
            out[i] = sig.reshape(-1)
    return out


@dataclass(eq=False)
class _LayerNoise:
    """The noise of one layer for one step: ``eps = N(0, 1) * sigma[:, None]`` from a seeded generator."""

    factors: LoRAFactors
    sigma: torch.Tensor
    seed: int
    step: int
    rank: int
    stream: int
    keep: bool = False
    sq_norm: torch.Tensor | None = field(default=None)
    _kept: torch.Tensor | None = field(default=None, repr=False)

    def noise(self) -> torch.Tensor:
        """``eps`` as an ``n x m`` matrix in ``sigma``'s dtype (drawn in float32, regenerated identically; drawn once
        and held for the rest of the step with ``keep``)."""
        if self._kept is not None:
            return self._kept
        dev = self.sigma.device
        n = self.sigma.shape[0]
        shape = (n, self.factors.base_weight.numel() // n)  # whole (n x m) also when W0 is sharded
        g = step_generator(self.seed, self.step, dev, rank=self.rank, stream=self.stream)
        eps = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(self.sigma.dtype)
        eps.mul_(self.sigma[:, None])
        if self.keep:
            self._kept = eps
        return eps

    def forward_noise(self) -> torch.Tensor:
        """:meth:`noise` for a forward pass; the first one records ``||eps||^2`` (the step's perturbation norm)."""
        eps = self.noise()
        if self.sq_norm is None:
            self.sq_norm = eps.square().sum()
        return eps

    def conv(self) -> nn.Module | None:
        base = self.factors.base_layer
        return base if isinstance(base, nn.modules.conv._ConvNd) else None

    def output(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The extra output ``(W0 + eps) x - W0 x`` of the base layer."""
        conv = self.conv()
        if conv is None:
            return F.linear(x, eps.to(x.dtype))
        return conv._conv_forward(x, eps.view_as(conv.weight).to(x.dtype), None)


class _NoisyLinear(torch.autograd.Function):
    """``y = x (W0 + eps)^T + b`` for a frozen ``nn.Linear``: one matmul forward and one backward (the hook path
    needs two of each), the temporary ``W0 + eps`` one layer at a time; the backward regenerates ``eps``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _LayerNoise) -> torch.Tensor:  # type: ignore[override]
        eps = layer.forward_noise()
        ctx.layer = layer
        base = layer.factors.base_layer
        weight = base.weight.detach()
        return F.linear(x, weight + eps.to(weight.dtype), None if base.bias is None else base.bias.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer: _LayerNoise = ctx.layer
        weight = layer.factors.base_layer.weight.detach()
        return grad @ (weight + layer.noise().to(weight.dtype)).to(grad.dtype), None


def _fused(f: LoRAFactors) -> bool:
    """Whether the noise can replace the base layer's own product (``_NoisyLinear``): a plain, local, frozen
    ``nn.Linear`` (bias frozen too) whose ``forward`` nobody has wrapped; otherwise (conv, GPT-2 ``Conv1D``, FSDP2
    shards, a trainable base, a layer whose ``forward`` another library replaced on the instance, e.g.
    accelerate's device-map / offload hooks) the noise is added to its output by a forward hook."""
    base = f.base_layer
    return (type(base) is nn.Linear and not f.fan_in_fan_out and not is_sharded(base.weight)
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and "forward" not in vars(base) and not hasattr(base, "_hf_hook"))


class _AddNoise(torch.autograd.Function):
    """``y = layer.output(x, eps)``; the backward regenerates ``eps`` instead of saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _LayerNoise) -> torch.Tensor:  # type: ignore[override]
        eps = layer.forward_noise()
        ctx.layer = layer
        if layer.conv() is not None:
            ctx.save_for_backward(x)
        return layer.output(x, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer: _LayerNoise = ctx.layer
        eps = layer.noise()
        if layer.conv() is None:
            return grad @ eps.to(grad.dtype), None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(layer.output(x_, eps), x_, grad)
        return gx, None


def merged_modules(layers: Sequence[LoRAFactors]) -> list[LoRAFactors]:
    """One entry per LoRA *module*: the noise is on the module's frozen ``W0``, once, whatever the number of its
    active adapters. A module with several adapters ``W = W0 + sum_k s_k B_k A_k`` becomes one factor pair
    ``A = [A_1; A_2; ...]``, ``B = [s_1 B_1, s_2 B_2, ...]``, ``s = 1`` (the same merged weight, so
    :func:`row_sigma` is the row norm of the whole ``W``). Order: the modules' first appearance."""
    by_module: dict[int, list[LoRAFactors]] = {}
    for f in layers:
        by_module.setdefault(id(f.module) if f.module is not None else id(f), []).append(f)
    out = []
    for group in by_module.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        if any(is_sharded(f.A) or is_sharded(f.B) for f in group):
            raise NotImplementedError(
                f"flat-lora-random on {group[0].name.rsplit('[', 1)[0]}: several active adapters on a sharded (FSDP2) "
                "layer are not supported; activate one adapter, or train without sharding"
            )
        with torch.no_grad():
            a = torch.cat([f.a_matrix() for f in group], 0)
            b = torch.cat([f.scale * f.b_matrix() for f in group], 1)
        name = group[0].name.rsplit("[", 1)[0] + "[" + "+".join(f.name.rsplit("[", 1)[1].rstrip("]") for f in group) + "]"
        out.append(dataclasses.replace(group[0], name=name, A=a, B=b, scale=1.0))
    return out


class FilterNoise(Rule):
    """Li et al.'s filter-wise noise on the frozen weights of every LoRA layer, applied by forward hooks."""

    perturbs = True

    def __init__(self, per_rank_noise: bool = True, keep_noise: bool = False) -> None:
        self.per_rank_noise = per_rank_noise
        self.keep_noise = keep_noise
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._fused: list[nn.Module] = []
        self._layers: list[_LayerNoise] = []

    def perturb(self, state: StepState) -> None:
        rho = state.rho * cosine_ramp(state.step, state.total_steps)
        rank = state.rank if self.per_rank_noise else 0
        for f in state.lora:  # check every layer before any hook is registered
            if not f.base_weight.is_floating_point():
                raise ValueError(
                    f"flat-lora-random perturbs the frozen base weight of {f.name}, which is not a floating-point "
                    f"tensor ({f.base_weight.dtype}, e.g. a 4-bit QLoRA weight); quantised bases are not supported"
                )
            if f.module is None:
                raise ValueError(f"flat-lora-random needs the LoRA module of {f.name} to add its noise (LoRAFactors.module)")
        modules = merged_modules(state.lora)
        for i, (f, sigma) in enumerate(zip(modules, row_sigmas(modules, rho))):
            layer = _LayerNoise(f, sigma, state.seed, state.step, rank, i, keep=self.keep_noise)
            self._layers.append(layer)
            if _fused(f):  # the base layer computes x (W0 + eps)^T itself, until restore()
                f.base_layer.forward = self._noisy_forward(layer)
                self._fused.append(f.base_layer)
            else:
                self._hooks.append(f.module.register_forward_hook(self._hook(layer)))
        per_layer = [layer.factors.base_weight.numel() * layer.sigma.element_size() for layer in self._layers]
        held = sum(per_layer) if self.keep_noise else max(per_layer, default=0)
        self.transient_bytes = max(self.transient_bytes, held)

    @staticmethod
    def _noisy_forward(layer: _LayerNoise):
        def noisy_linear(x: torch.Tensor) -> torch.Tensor:
            return _NoisyLinear.apply(x, layer)

        return noisy_linear

    @staticmethod
    def _hook(layer: _LayerNoise):
        def add_noise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + _AddNoise.apply(args[0], layer)

        return add_noise

    def restore(self, state: StepState) -> None:
        for h in self._hooks:
            h.remove()
        for base in self._fused:
            del base.forward  # back to the class's forward
        self._fused = []
        sq = [layer.sq_norm for layer in self._layers if layer.sq_norm is not None]
        if sq:
            state.metrics["perturbation_norm"] = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
        self._hooks, self._layers = [], []


def build(per_rank_noise: bool = True, keep_noise: bool = False) -> list[Rule]:
    if not isinstance(keep_noise, bool):
        raise ValueError(f"Invalid keep_noise: {keep_noise!r} (must be True or False)")
    return [FilterNoise(per_rank_noise, keep_noise)]


register_method(
    MethodInfo("flat-lora-random", build, defaults={"rho": 0.05}, needs_lora=True, schedule="cosine noise ramp",
               summary="random filter-wise noise on the frozen weights of LoRA layers (Li et al.)",
               reference="arXiv 2409.14396",
               sources={"rho": "nblt/Flat-LoRA README (0.05)", "per_rank_noise": "flatpeft decision (independent noise per rank)",
                        "keep_noise": "flatpeft decision (False: bounded memory; True: draw each layer's noise once per step)"},
               perturbs="frozen W0 of every LoRA layer (functionally, through forward hooks)",
               memory="transient: one layer's noise at a time (keep_noise=True: every LoRA layer's noise, fp32, during the step); n floats per layer (row scales)")
)
