"""``SharpnessAware``: one ``torch.optim.Optimizer`` that runs any flatpeft method around a base optimizer.

The wrapper follows timm's ``Lookahead`` and davda54/sam: it *shares* ``param_groups`` and ``state`` with the
base optimizer (so LR schedulers and ``state_dict()`` see one optimizer) and drives a list of
:class:`~flatpeft.perturb.rules.Rule` objects through each step. Its own persistent state (step counter,
EMA buffers, SPIDER anchors) lives in ``base.state["flatpeft"]``: a string key, so the base optimizer's
lazy per-parameter initialisation is never disturbed and ``load_state_dict`` never casts it.

Closure API (``step(closure)``)::

    opt.zero_grad()
    loss = opt.step(closure)      # closure(): forward + backward, returns the loss

Two-call API (for loops that cannot pass a closure)::

    if opt.passes == 2:           # two-pass methods need the gradient at w first
        loss_fn().backward()
    opt.first_step()              # perturb (and zero the pass-1 gradients)
    loss_fn().backward()          # gradient at the perturbed point
    opt.second_step()             # restore exactly, then the base optimizer's step

``second_step()`` is ``restore()`` followed by ``step()``; with an fp16 ``GradScaler`` call ``opt.restore()``
and then ``scaler.step(opt)``, so the weights are clean even when the scaler skips the step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from flatpeft._foreach import global_norm
from flatpeft.adapters.lora import LoRAFactors
from flatpeft.optim.rng import RNGState
from flatpeft.perturb.base import StepContext, step_generator
from flatpeft.perturb.rules import Rule
from flatpeft.perturb.schedules import scheduled

__all__ = ["SharpnessAware"]

_KEY = "flatpeft"


class SharpnessAware(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` with the perturbation ``rules`` of one flatpeft method.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` over the trainable tensors.
        rules: the method's rules (see :mod:`flatpeft.perturb.rules`), run in order.
        names: parameter names aligned with the base optimizer's flattened parameter list (for diagnostics).
        lora: the model's LoRA factors (needed by LoRA-space rules).
        rho: neighbourhood radius; ``rho_schedule`` / ``rho_min`` / ``total_steps`` decay it
            (:func:`flatpeft.perturb.schedules.scheduled`).
        seed: seed of the method's private random generators (random selection, noise), never the global RNG.
        replay_rng: in ``step(closure)``, give pass 2 the random state of pass 1 (same dropout masks) and leave
            the global generators where one pass would have left them. Default True.
        method: the registered method name (for messages).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rules: Sequence[Rule],
        *,
        names: Sequence[str] | None = None,
        lora: Sequence[LoRAFactors] = (),
        rho: float = 0.0,
        rho_schedule: str = "constant",
        rho_min: float = 0.0,
        total_steps: int | None = None,
        seed: int = 0,
        replay_rng: bool = True,
        method: str = "custom",
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer instance, got {type(base_optimizer).__name__}")
        super().__init__([{"params": g["params"]} for g in base_optimizer.param_groups], base_optimizer.defaults)
        self.base_optimizer = base_optimizer
        # Share groups and state with the base optimizer (LR schedulers, state_dict, GradScaler all see one).
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self.rules = list(rules)
        self.method = method
        self.trainable: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.trainable))]
        self._index = {id(p): i for i, p in enumerate(self.trainable)}
        self.lora = list(lora)
        self.rho = float(rho)
        self.rho_schedule = rho_schedule
        self.rho_min = float(rho_min)
        self.total_steps = total_steps
        self.seed = int(seed)
        self.replay_rng = bool(replay_rng)
        self.passes = max([r.passes for r in self.rules], default=1)
        self.metrics: dict[str, torch.Tensor] = {}
        self._perturbed = False
        self._awaiting_update = False

    # ------------------------------------------------------------------ state shared with the rules
    @property
    def _own(self) -> dict[str, Any]:
        own = self.state.get(_KEY)
        if own is None:
            own = {"step": 0, "buffers": {}}
            self.state[_KEY] = own
        return own

    @property
    def step_count(self) -> int:
        """Number of completed optimizer steps (saved in ``state_dict()``)."""
        return int(self._own["step"])

    def current_rho(self) -> float:
        """The radius of the current step after the schedule (host arithmetic, no device sync)."""
        return scheduled(self.rho, self.step_count, self.total_steps, self.rho_schedule, self.rho_min)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A private generator seeded from ``(seed, step)``: replayable and identical on every rank."""
        return step_generator(self.seed, self.step_count, device)

    def buffers(
        self,
        key: str,
        params: Sequence[torch.Tensor],
        init: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Persistent per-parameter buffers named ``key`` (created with ``init`` on first use)."""
        store = self._own["buffers"].setdefault(key, {})
        out = []
        for p in params:
            i = self._index[id(p)]
            if i not in store:
                if init is None:
                    raise RuntimeError(f"flatpeft buffer {key!r} of {self.names[i]} was never initialised")
                store[i] = init(p)
            out.append(store[i])
        return out

    def lr_of(self, p: torch.Tensor) -> float:
        """Learning rate of the parameter group holding ``p``."""
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return float(g["lr"])
        raise KeyError("parameter not managed by this optimizer")

    def context(self, target: str = "trainable", *, with_grad_only: bool = True) -> StepContext:
        """The :class:`StepContext` of this step for ``target`` (``"trainable"`` or ``"lora_B"``)."""
        if target == "lora_B":
            params = [f.B for f in self.lora]
            names = [f.name for f in self.lora]
        else:
            pairs = [(p, n) for p, n in zip(self.trainable, self.names) if not with_grad_only or p.grad is not None]
            params = [p for p, _ in pairs]
            names = [n for _, n in pairs]
        return StepContext(params, names, self.current_rho(), self.step_count, self.seed, self.lora, {})

    def record(self, ctx: StepContext, deltas: Sequence[torch.Tensor]) -> None:
        """Store the step's diagnostics (device tensors; read them only at logging steps)."""
        self.metrics.update(ctx.stats)
        self.metrics["perturbation_norm"] = global_norm(list(deltas))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move the weights to the point where the update gradient is taken.

        For a two-pass method this needs the pass-1 gradients in ``.grad`` and zeroes them afterwards (unless
        ``zero_grad=False``). For a single-pass method call it before the step's forward pass. On error the
        weights are restored before the exception propagates.
        """
        if self._perturbed:
            self.restore()
        if self.passes == 2 and all(p.grad is None for p in self.trainable):
            raise RuntimeError(
                f"first_step() of {self.method!r} needs the gradients of pass 1: run forward and backward at the "
                "current weights first (or use step(closure))"
            )
        self.metrics = {}
        self._perturbed = True
        self._awaiting_update = True
        try:
            for rule in self.rules:
                rule.perturb(self)
        except BaseException:
            self.restore()
            raise
        if self.passes == 2 and zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every perturbed tensor back exactly (idempotent). Gradients are left untouched."""
        for rule in reversed(self.rules):
            rule.restore(self)
        self._perturbed = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights, then run the update (``before_update``, base step, ``after_update``)."""
        self.restore()
        self._update()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _update(self) -> None:
        for rule in self.rules:
            rule.before_update(self)
        self.base_optimizer.step()
        for rule in self.rules:
            rule.after_update(self)
        self._own["step"] = self.step_count + 1
        self._awaiting_update = False

    def _needs_first_step(self) -> bool:
        return any(r.perturbs for r in self.rules)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step.

        With a closure (which runs forward and backward and returns the loss) the closure is called once or
        twice as the method needs, gradients are zeroed between passes, pass 2 replays pass 1's random state
        (``replay_rng``), the weights are restored even if the closure raises, and the loss at the unperturbed
        point is returned. Without a closure this finishes a step begun by :meth:`first_step` (what
        ``GradScaler.step`` and ``transformers.Trainer`` call); methods that perturb nothing (``base``,
        ``spider``, ``nbar``, ``obar``) may also be stepped without a closure like any torch optimizer.
        """
        if closure is None:
            if not self._awaiting_update and self._needs_first_step():
                raise RuntimeError(
                    f"step() without a closure: method {self.method!r} must perturb the weights before the "
                    "gradient is taken. Use opt.step(closure), or opt.first_step() / forward+backward / "
                    "opt.second_step()."
                )
            self.restore()
            self._update()
            return None
        closure = torch.enable_grad()(closure)
        if self.passes == 1:
            self.first_step()
            try:
                loss = closure()
            finally:
                self.restore()
            self._update()
            if isinstance(loss, torch.Tensor):
                self.metrics["loss"] = loss.detach()
            return loss
        start = RNGState.capture() if self.replay_rng else None
        loss = closure()
        after_pass1 = RNGState.capture() if self.replay_rng else None
        self.first_step()
        try:
            if start is not None:
                start.restore()
            loss_perturbed = closure()
        finally:
            self.restore()
            if after_pass1 is not None:
                after_pass1.restore()
        self._update()
        if isinstance(loss, torch.Tensor):
            self.metrics["loss"] = loss.detach()
        if isinstance(loss_perturbed, torch.Tensor):
            self.metrics["loss_perturbed"] = loss_perturbed.detach()
        return loss

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; flatpeft's buffers ride along under ``state["flatpeft"]``."""
        if self._perturbed:
            raise RuntimeError("state_dict() while the weights are perturbed: call it outside first_step()/second_step()")
        self._own  # noqa: B018 - make sure the entry exists (step counter)
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; flatpeft's buffers are copied, not cast to param dtypes."""
        state_dict = dict(state_dict)
        inner = dict(state_dict["state"])
        own = inner.pop(_KEY, None)
        state_dict["state"] = inner
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if own is not None:
            buffers = {
                key: {int(i): t.detach().clone().to(self.trainable[int(i)].device) for i, t in store.items()}
                for key, store in own.get("buffers", {}).items()
            }
            self.state[_KEY] = {"step": int(own.get("step", 0)), "buffers": buffers}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (shared), and track its tensors."""
        if not hasattr(self, "base_optimizer"):
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        for p in self.base_optimizer.param_groups[-1]["params"]:
            self._index[id(p)] = len(self.trainable)
            self.trainable.append(p)
            self.names.append(f"param{len(self.names)}")

    def __repr__(self) -> str:
        return f"SharpnessAware(method={self.method!r}, passes={self.passes}, base={self.base_optimizer.__class__.__name__})"
