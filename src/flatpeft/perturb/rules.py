"""Rules: where in a step a method acts. A method is a list of rules run by :class:`flatpeft.SharpnessAware`.

Every step of the wrapper runs these hooks in order; each receives only the step's
:class:`~flatpeft.perturb.base.StepState` (``state``)::

    [pass 1 forward+backward, only if some rule has passes == 2]
    perturb(state)        # first_step(): move the weights to the point where the update gradient is taken
    [forward+backward at the perturbed point]
    restore(state)        # put every perturbed tensor back exactly (copy from a saved buffer, never subtract)
    before_update(state)  # act on the update gradient / weights before the base optimizer (EMA, BAR, SPIDER)
    base_optimizer.step()
    after_update(state)   # act after the update (SPIDER interpolation)

The generic rules live here (:class:`GradientAscent`: fresh two-pass ascent; :class:`LaggedAscent`: one pass at a
perturbation computed on earlier steps); a rule that belongs to one method lives beside that method in
:mod:`flatpeft.methods`. Rules keep persistent buffers through ``state.buffers(key)`` (saved by
``state_dict()``) and transient ones (saved weights) on themselves. Nothing here reads a device value on the host
or branches on one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from flatpeft._dist import local, locals_
from flatpeft._foreach import clone_all, global_norm
from flatpeft.perturb.base import StepState, Transform, materialize, run_transform


def zeros_fp32(p: torch.Tensor) -> torch.Tensor:
    """A zero buffer shaped like ``p`` (a DTensor for a DTensor), at least float32."""
    return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))

__all__ = ["Rule", "GradientAscent", "LaggedAscent", "Radius", "gradients", "l2_radius"]


class Rule:
    """Base rule: every hook is a no-op.

    ``passes`` is 2 for rules that need a fresh ascent gradient at ``w`` before the update pass; ``perturbs`` is
    True when ``perturb`` moves the weights (then ``step()`` without a closure needs ``first_step()`` first).
    ``transient_bytes`` is the size of the copies the rule holds between ``perturb`` and ``restore``.
    ``lora_factors`` names the LoRA factors the rule needs among the optimizer's parameters (checked when the
    optimizer is built).
    ``passes_at(step)`` may vary the number of passes from step to step (``GradientAscent(every=k)``).
    """

    passes: int = 1
    perturbs: bool = False
    transient_bytes: int = 0
    lora_factors: tuple[str, ...] = ()
    """The LoRA factors (``"A"``, ``"B"``) of every layer that must be optimizer parameters (state, learning rate)."""

    def passes_at(self, step: int) -> int:
        """Forward+backward passes this rule needs on step ``step`` (completed steps so far)."""
        return self.passes

    def materialize(self, state: StepState) -> None:
        """Create every persistent buffer this rule may use (as on first use). The optimizer calls it before saving
        a state dict, so a state dict of a fresh optimizer is a complete template to load a checkpoint into
        (``torch.distributed.checkpoint``)."""

    def perturb(self, state: StepState) -> None:
        pass

    def restore(self, state: StepState) -> None:
        pass

    def before_update(self, state: StepState) -> None:
        pass

    def after_update(self, state: StepState) -> None:
        pass


class _CopyRestore(Rule):
    """Shared machinery: add ``e`` to target tensors after saving them; restore by exact copy."""

    perturbs = True

    def __init__(self) -> None:
        self._targets: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []

    def _apply(self, targets: list[torch.Tensor], deltas: list[torch.Tensor]) -> None:
        # sharded (FSDP2) targets: the shards are moved and restored in place, deltas are aligned local shards
        targets, deltas = locals_(targets), locals_(deltas)
        self._targets = targets
        self._saved = clone_all(targets)
        self.transient_bytes = max(self.transient_bytes, sum(t.numel() * t.element_size() for t in self._saved))
        with torch.no_grad():
            torch._foreach_add_(targets, [d.to(t.dtype) for d, t in zip(deltas, targets)])

    def restore(self, state: StepState) -> None:
        if self._saved:
            with torch.no_grad():
                torch._foreach_copy_(self._targets, self._saved)
        self._targets, self._saved = [], []


class GradientAscent(_CopyRestore):
    """Two-pass SAM family: ``e = transform(grad)`` at ``w``; the update gradient is taken at ``w + e``.

    ``target``: ``"trainable"`` perturbs the trainable tensors that have a gradient (SAM, ASAM);
    ``"adapters"`` only the PEFT adapter tensors (FlatPO's default scope; every trainable tensor when the model
    has no adapter); ``"lora_B"`` the LoRA ``B`` factors (Flat-LoRA of Deng et al.). Tensors outside the target
    are updated normally and never perturbed.

    ``every = k > 1`` (*ascent reuse*, flatpeft's ``ascent_every``): the ascent step is computed on steps
    ``0, k, 2k, ...`` only (two passes) and stored; the steps in between take the update gradient at ``w + e`` with
    the stored ``e`` in a single pass. Costs one persistent copy of the targets. This is not LookSAM (Liu et al.,
    CVPR 2022), which perturbs nothing on its cheap steps and instead reuses the component of the SAM gradient
    orthogonal to the plain gradient (docs/algorithms.md, "Ascent reuse"). On a reuse step the diagnostics of the
    step that computed ``e`` (``grad_norm``, ``selected``) are reported again (NaN ``grad_norm`` right after a
    checkpoint load, before the first fresh ascent).
    """

    passes = 2

    def __init__(self, transform: Transform, target: str = "trainable", every: int = 1) -> None:
        super().__init__()
        self.transform = transform
        self.target = target
        self.every = every
        self.lora_factors = ("B",) if target == "lora_B" else ()
        self._ascent_stats: dict[str, torch.Tensor] = {}

    def passes_at(self, step: int) -> int:
        return 2 if step % self.every == 0 else 1

    def materialize(self, state: StepState) -> None:
        step = state.on(self.target, with_grad_only=False)
        if self.every > 1:
            state.buffers("ascent", step.params, zeros_fp32)
        materialize(self.transform, step)

    def perturb(self, state: StepState) -> None:
        if self.every == 1:
            ctx = state.on(self.target)
            deltas = run_transform(self.transform, gradients(ctx.params), ctx)
        else:
            ctx = state.on(self.target, with_grad_only=False)
            stored = state.buffers("ascent", ctx.params, zeros_fp32)
            stored = locals_(stored)
            if self.passes_at(state.step) == 2:
                before = set(state.metrics)
                fresh = run_transform(self.transform, gradients(ctx.params), ctx)
                torch._foreach_copy_(stored, [f.to(d.dtype) for f, d in zip(fresh, stored)])
                self._ascent_stats = {k: v for k, v in state.metrics.items() if k not in before}
            else:
                nan = torch.full((), float("nan"), device=stored[0].device if stored else "cpu")
                state.metrics.update({"grad_norm": nan, **self._ascent_stats})
            deltas = stored
        state.metrics["perturbation_norm"] = global_norm(deltas, like=ctx.params)
        self._apply(ctx.params, deltas)


Radius = Callable[[StepState, list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
"""``radius(state, targets, deltas)``: the size of a perturbation in the metric its method measures rho in (a 0-d
device tensor)."""


def l2_radius(state: StepState, targets: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
    """The plain L2 norm of the perturbation over its target tensors (sharded targets count whole)."""
    return global_norm(deltas, like=targets)


class LaggedAscent(_CopyRestore):
    """Single pass at an EMA of perturbations computed on earlier steps (EFlat-LoRA, Deng et al., arXiv 2508.00522).

    Step ``t``: ``w <- w + c_t E`` on the targets (clean values saved); forward+backward there; restore;
    ``e_t = transform(g~)`` from the gradient at the perturbed point with the *clean* weights;
    ``E <- beta E + (1 - beta) e_t`` (``beta`` = weight of the past, ``E_0 = 0``: step 0 is the base optimizer's
    step); base step. ``E`` is one persistent fp32 buffer per target, ``"ema"``.

    ``c_t = min(1, rho_t / radius(E))`` caps the applied perturbation at the step's radius in the method's own
    metric (``radius``; default the L2 norm): ``E`` mixes perturbations computed at earlier radii (a decaying
    ``rho_t``) and, for LoRA-space steps, earlier ``A`` factors, so it can exceed ``rho_t`` although each of its
    terms did not. No bias correction of the EMA (docs/algorithms.md, "EFlat-LoRA"). Metrics:
    ``perturbation_norm`` (L2 norm of the applied perturbation) and ``perturbation_radius`` (its radius).
    """

    def __init__(self, transform: Transform, target: str = "lora_B", beta: float = 0.9, radius: Radius = l2_radius) -> None:
        super().__init__()
        self.transform = transform
        self.target = target
        self.beta = beta
        self.radius = radius
        self.lora_factors = ("B",) if target == "lora_B" else ()

    def _lagged(self, state: StepState, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return state.buffers("ema", params, zeros_fp32)

    def materialize(self, state: StepState) -> None:
        step = state.on(self.target, with_grad_only=False)
        self._lagged(state, step.params)
        materialize(self.transform, step)

    def perturb(self, state: StepState) -> None:
        params, _ = state.targets(self.target, with_grad_only=False)
        lagged = locals_(self._lagged(state, params))
        radius = self.radius(state, params, lagged)
        cap = torch.clamp(state.rho / radius.clamp_min(torch.finfo(radius.dtype).tiny), max=1.0)
        deltas = torch._foreach_mul(lagged, cap.to(lagged[0].dtype)) if lagged else []
        state.metrics["perturbation_norm"] = global_norm(deltas, like=params)
        state.metrics["perturbation_radius"] = radius * cap
        self._apply(params, deltas)

    def before_update(self, state: StepState) -> None:
        ctx = state.on(self.target, with_grad_only=False)
        fresh = run_transform(self.transform, gradients(ctx.params), ctx)
        lagged = locals_(self._lagged(state, ctx.params))
        with torch.no_grad():
            torch._foreach_lerp_(lagged, [f.to(d.dtype) for f, d in zip(fresh, lagged)], 1.0 - self.beta)


def gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The input of a transform chain: the gradient of each target (its local shard; zeros where it has none)."""
    return [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in params]
