"""Rules: where in a step a method acts. A method is a list of rules run by :class:`flatpeft.SharpnessAware`.

Every step of the wrapper runs these hooks in order (``opt`` is the wrapper)::

    [pass 1 forward+backward, only if some rule has passes == 2]
    perturb(opt)          # first_step(): move the weights to the point where the update gradient is taken
    [forward+backward at the perturbed point]
    restore(opt)          # put every perturbed tensor back exactly (copy from a saved buffer, never subtract)
    before_update(opt)    # act on the update gradient / weights before the base optimizer (EMA, BAR, SPIDER)
    base_optimizer.step()
    after_update(opt)     # act after the update (SPIDER interpolation)

Rules keep persistent buffers through ``opt.buffers(key)`` (saved by ``state_dict()``) and transient ones
(saved weights) on themselves. Nothing here reads a device value on the host or branches on one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flatpeft._foreach import clone_all, finite_or_zero, global_norm, sanitize_, sq_norms
from flatpeft.perturb.base import Transform
from flatpeft.perturb.schedules import cosine_ramp, scheduled

if TYPE_CHECKING:  # pragma: no cover
    from flatpeft.optim.sharpness_aware import SharpnessAware

__all__ = ["Rule", "GradientAscent", "LaggedAscent", "FilterNoise", "ImportanceMask", "Balancedness", "psi"]


class Rule:
    """Base rule: every hook is a no-op. ``passes`` is 2 for rules that need a fresh ascent gradient."""

    passes: int = 1
    perturbs: bool = False

    def perturb(self, opt: "SharpnessAware") -> None:  # noqa: D102
        pass

    def restore(self, opt: "SharpnessAware") -> None:  # noqa: D102
        pass

    def before_update(self, opt: "SharpnessAware") -> None:  # noqa: D102
        pass

    def after_update(self, opt: "SharpnessAware") -> None:  # noqa: D102
        pass


class _CopyRestore(Rule):
    """Shared machinery: add ``e`` to target tensors after saving them; restore by exact copy."""

    perturbs = True

    def __init__(self) -> None:
        self._targets: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def _apply(self, targets: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        self._targets = targets
        self._saved = clone_all(targets)
        with torch.no_grad():
            torch._foreach_add_(targets, [d.to(t.dtype) for d, t in zip(deltas, targets)])

    def restore(self, opt: "SharpnessAware") -> None:
        if self._saved:
            with torch.no_grad():
                torch._foreach_copy_(self._targets, self._saved)
        self._targets, self._saved = [], []


class GradientAscent(_CopyRestore):
    """Two-pass SAM family: ``e = transform(grad)`` at ``w``; the update gradient is taken at ``w + e``.

    ``target="trainable"`` perturbs the trainable tensors that have a gradient (SAM, ASAM, FlatPO);
    ``target="lora_B"`` perturbs the LoRA ``B`` factors (Flat-LoRA of Deng et al.).
    """

    passes = 2

    def __init__(self, transform: Transform, target: str = "trainable") -> None:
        super().__init__()
        self.transform = transform
        self.target = target

    def perturb(self, opt: "SharpnessAware") -> None:
        ctx = opt.context(self.target)
        deltas = self.transform([], ctx)
        opt.record(ctx, deltas)
        self._apply(ctx.params, deltas)


class LaggedAscent(_CopyRestore):
    """EFlat-LoRA (Deng et al.): one pass at ``B + E_bar``, where ``E_bar`` is an EMA of past perturbations.

    Step ``t``: ``B <- B + E_bar`` (clean ``B`` saved); forward+backward; restore ``B``; compute
    ``E_new = transform(g~)`` from the gradient at the perturbed point with the clean ``B`` and current ``A``;
    base step; ``E_bar <- beta * E_bar + (1 - beta) * E_new`` (``beta`` = weight of the past). ``E_bar`` starts
    at 0, so step 0 is plain LoRA. shared/spec/algorithms.md section 5.
    """

    def __init__(self, transform: Transform, beta: float, target: str = "lora_B") -> None:
        super().__init__()
        self.transform = transform
        self.beta = beta
        self.target = target

    def _ema(self, opt: "SharpnessAware", params: list[torch.Tensor]) -> list[torch.Tensor]:
        return opt.buffers("ema", params, lambda p: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)))

    def perturb(self, opt: "SharpnessAware") -> None:
        ctx = opt.context(self.target, with_grad_only=False)
        ema = self._ema(opt, ctx.params)
        ctx.stats["perturbation_norm"] = global_norm(ema)
        opt.metrics.update(ctx.stats)
        self._apply(ctx.params, ema)

    def before_update(self, opt: "SharpnessAware") -> None:
        ctx = opt.context(self.target, with_grad_only=False)
        fresh = self.transform([], ctx)
        ema = self._ema(opt, ctx.params)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [f.to(e.dtype) for f, e in zip(fresh, ema)], 1.0 - self.beta)


class FilterNoise(Rule):
    """Flat-LoRA (Li et al., ICML 2025): filter-wise Gaussian noise on the frozen ``W0`` of every LoRA layer.

    ``sigma_i = f_t * rho * ||W[i, :]|| / sqrt(m)`` for each output row ``i`` of the merged weight
    ``W = W0 + s B A`` (row norms computed without forming ``W``: ``||W0_i||^2 + 2 s <W0_i A^T, B_i> +
    s^2 B_i K_A B_i^T``), ``eps_ij ~ N(0, sigma_i^2)`` from a generator seeded by ``(seed, step)`` (never the
    global RNG), ``f_t`` the cosine ramp from 0 to 1 over ``total_steps`` (1 without). ``W0`` is snapshot before
    the noise and restored by copy, so the frozen weights are bit-identical after every step (the reference
    subtracts the regenerated noise, which drifts in bf16). shared/spec/algorithms.md section 6.
    """

    perturbs = True

    def __init__(self) -> None:
        self._weights: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    @staticmethod
    @torch.no_grad()
    def row_sigma(f, rho: float) -> torch.Tensor:
        """``rho * ||(W0 + s B A)[i, :]|| / sqrt(m)`` for every output row ``i`` (at least float32)."""
        w0 = f.w0_matrix()
        cd = torch.promote_types(w0.dtype, torch.float32)
        a = f.a_matrix().to(w0.dtype)
        b = f.b_matrix().to(cd)
        w0a = (w0 @ a.t()).to(cd)
        a32 = f.a_matrix().to(cd)
        ka = a32 @ a32.t()
        sq = (
            torch.linalg.vector_norm(w0, dim=1, dtype=cd).square()
            + 2.0 * f.scale * (w0a * b).sum(1)
            + f.scale**2 * ((b @ ka) * b).sum(1)
        )
        return rho * sq.clamp_min(0.0).sqrt() / (w0.shape[1] ** 0.5)

    def perturb(self, opt: "SharpnessAware") -> None:
        rho = opt.current_rho() * cosine_ramp(opt.step_count, opt.total_steps)
        layers = opt.lora
        for f in layers:
            if not f.base_weight.is_floating_point():
                raise ValueError(
                    f"flat-lora-random perturbs the frozen base weight of {f.name}, which is not a floating-point "
                    f"tensor ({f.base_weight.dtype}, e.g. a 4-bit QLoRA weight); quantised bases are not supported"
                )
        self._weights = [f.base_weight for f in layers]
        self._saved = clone_all(self._weights)
        gens: dict[torch.device, torch.Generator] = {}
        sq = []
        with torch.no_grad():
            for f in layers:
                dev = f.base_weight.device
                if dev not in gens:
                    gens[dev] = opt.generator(dev)
                sigma = self.row_sigma(f, rho)
                w0 = f.w0_matrix()
                noise = torch.randn(w0.shape, generator=gens[dev], device=dev, dtype=torch.float32)
                noise = noise.to(sigma.dtype).mul_(sigma[:, None])
                sq.append(noise.square().sum())
                w0.add_(noise.to(w0.dtype))
        opt.metrics["perturbation_norm"] = torch.stack(sq).sum().sqrt() if sq else torch.zeros(())

    def restore(self, opt: "SharpnessAware") -> None:
        if self._saved:
            with torch.no_grad():
                torch._foreach_copy_(self._weights, self._saved)
        self._weights, self._saved = [], []


def psi(x: torch.Tensor) -> torch.Tensor:
    """SPIDER's standardised magnitude score ``sigmoid((|X| - mean|X|) / std|X|)`` (unbiased std, per tensor).

    Edge cases (shared/spec/algorithms.md section 8): an all-zero tensor scores 0 everywhere; any other
    tensor whose std is 0 or undefined (constant values, a single element) scores 0.5 (z = 0). No NaN.
    """
    a = x.abs().to(torch.promote_types(x.dtype, torch.float32))
    if a.numel() > 1:
        std = a.std()
    else:
        std = torch.zeros((), dtype=a.dtype, device=a.device)
    ok = torch.isfinite(std) & (std > 0)
    z = torch.where(ok, (a - a.mean()) / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(a))
    score = torch.sigmoid(z)
    return torch.where(a.amax() > 0, score, torch.zeros_like(score))


class ImportanceMask(Rule):
    """SPIDER (Huang et al., ICML 2025): update only where fine-tuning importance beats pre-trained importance.

    At the first step ``theta0`` (float32 copy of every trainable tensor) and ``I_pre = psi(theta0)`` are stored.
    Every step: ``G <- G + g`` (running sum of the update gradients, read before the base step; non-finite entries
    count as 0), ``I_ft = psi(G)``, ``c = I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre`` else 0,
    ``c <- min(1, c / mean(c[c != 0]))``, and after the base step ``theta <- theta0 + c * (theta~ - theta0)``.
    shared/spec/algorithms.md section 8.
    """

    def before_update(self, opt: "SharpnessAware") -> None:
        params = opt.trainable
        fp32 = lambda p: torch.promote_types(p.dtype, torch.float32)  # noqa: E731
        # anchors of the first step (created once, read in after_update)
        opt.buffers("theta0", params, lambda p: p.detach().to(fp32(p)).clone())
        opt.buffers("importance_pre", params, lambda p: psi(p.detach()))
        acc = opt.buffers("grad_sum", params, lambda p: torch.zeros_like(p, dtype=fp32(p)))
        grads = [p.grad.to(a.dtype) if p.grad is not None else torch.zeros_like(a) for p, a in zip(params, acc)]
        grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
        torch._foreach_add_(acc, grads)

    @torch.no_grad()
    def after_update(self, opt: "SharpnessAware") -> None:
        params = opt.trainable
        theta0 = opt.buffers("theta0", params)
        i_pre = opt.buffers("importance_pre", params)
        acc = opt.buffers("grad_sum", params)
        kept = []
        for p, t0, ip, g in zip(params, theta0, i_pre, acc):
            c = self.coefficients(ip, psi(g))
            kept.append(c.mean())
            p.copy_(torch.lerp(t0, p.to(t0.dtype), c).to(p.dtype))
        if kept:
            opt.metrics["update_fraction"] = torch.stack([k.to(kept[0].device) for k in kept]).mean()

    @staticmethod
    def coefficients(i_pre: torch.Tensor, i_ft: torch.Tensor) -> torch.Tensor:
        """``c = min(1, c0 / mean(c0[c0 != 0]))`` with ``c0 = I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre``."""
        sel = i_ft > i_pre
        c = torch.where(sel, i_ft / (i_pre + i_ft).clamp_min(torch.finfo(i_ft.dtype).tiny), torch.zeros_like(i_ft))
        mean_nz = c.sum() / sel.sum().clamp_min(1)
        return torch.where(sel, (c / mean_nz.clamp_min(torch.finfo(c.dtype).tiny)).clamp_max(1.0), torch.zeros_like(c))


class Balancedness(Rule):
    """BAR (Li, Zhang & He, NeurIPS 2024) for LoRA pairs; experimental (no official code; constants unverified).

    ``mode="nbar"``: before the base step rescale ``B <- (1 + eta a D / (2||B||^2)) B`` and
    ``A <- (1 - eta a D / (2||A||^2)) A`` with ``D = (||g_B||^2 - ||g_A||^2) / sqrt(||g_B||^2 + ||g_A||^2)`` (a zero
    factor is not rescaled). ``mode="obar"``: add the gradient of ``(a/4)(||B||^2 - ||A||^2)^2``:
    ``g_B += a beta B``, ``g_A -= a beta A`` with ``beta = (||B||^2 - ||A||^2) / 2``. ``a_t = alpha (1 - t/T)``
    (linear decay, third-party gBAR default alpha = 0.2; constant without ``total_steps``); ``eta`` is the
    learning rate of the factor's parameter group. shared/spec/algorithms.md section 9.
    """

    def __init__(self, mode: str, alpha: float) -> None:
        self.mode = mode
        self.alpha = alpha

    @torch.no_grad()
    def before_update(self, opt: "SharpnessAware") -> None:
        layers = opt.lora
        if not layers:
            return
        a_t = scheduled(self.alpha, opt.step_count, opt.total_steps, "linear", 0.0)
        As = [f.A for f in layers]
        Bs = [f.B for f in layers]
        ga = [f.A.grad if f.A.grad is not None else torch.zeros_like(f.A) for f in layers]
        gb = [f.B.grad if f.B.grad is not None else torch.zeros_like(f.B) for f in layers]
        na, nb = sq_norms(As), sq_norms(Bs)
        if self.mode == "obar":
            coef = list((0.5 * (nb - na) * a_t).unbind())
            torch._foreach_add_(gb, torch._foreach_mul(Bs, [c.to(b.dtype) for c, b in zip(coef, Bs)]))
            torch._foreach_sub_(ga, torch._foreach_mul(As, [c.to(a.dtype) for c, a in zip(coef, As)]))
            for f, g_b, g_a in zip(layers, gb, ga):
                f.B.grad, f.A.grad = g_b, g_a
            return
        gna, gnb = sq_norms(ga), sq_norms(gb)
        denom = (gna + gnb).sqrt()
        d = torch.where(denom > 0, (gnb - gna) / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(denom))
        lrs = torch.tensor([opt.lr_of(f.B) for f in layers], dtype=d.dtype, device=d.device)
        step = lrs * a_t * d / 2.0
        fb = torch.where(nb > 0, 1.0 + step / nb.clamp_min(torch.finfo(nb.dtype).tiny), torch.ones_like(nb))
        fa = torch.where(na > 0, 1.0 - step / na.clamp_min(torch.finfo(na.dtype).tiny), torch.ones_like(na))
        torch._foreach_mul_(Bs, [x.to(b.dtype) for x, b in zip(fb.unbind(), Bs)])
        torch._foreach_mul_(As, [x.to(a.dtype) for x, a in zip(fa.unbind(), As)])
        opt.metrics["balancedness"] = 0.5 * (nb - na).sum()
