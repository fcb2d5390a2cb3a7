"""``SharpnessAware``: one ``torch.optim.Optimizer`` that runs any flatpeft method around a base optimizer.

The wrapper follows timm's ``Lookahead`` and davda54/sam: it *shares* ``param_groups`` and ``state`` with the
base optimizer (so LR schedulers and ``state_dict()`` see one optimizer) and drives a list of
:class:`~flatpeft.perturb.rules.Rule` objects through each step, handing them a narrow
:class:`~flatpeft.perturb.base.StepState`. Its own persistent state (step counter, EMA buffers, SPIDER anchors)
lives on the wrapper, apart from the base optimizer's per-parameter state (so the base optimizer's lazy
initialisation, e.g. Adam's ``len(state[p]) == 0``, is never disturbed); ``state_dict()`` writes it into each
parameter's entry under ``"flatpeft.<buffer>"`` keys and the step counter into every parameter group
(``"flatpeft_step"``), so ``torch.distributed.checkpoint`` maps every buffer to its parameter's name and shards it
like the parameter (FSDP2). ``load_state_dict`` takes these keys out again before the base optimizer's state is
loaded (never cast to the parameter dtype). Both are torch's optimizer state-dict hooks, not overrides.

Closure API (``step(closure)``)::

    opt.zero_grad()
    loss = opt.step(closure)      # closure(): forward + backward, returns the loss

Loop API, one pattern for every method (single- or two-pass), with gradient accumulation::

    opt.zero_grad()
    for _ in opt.gradient_passes():          # 1 or 2 passes; perturbs (and zeroes grads) between them
        for x, y in micro_batches:
            (loss_fn(model(x), y) / len(micro_batches)).backward()
    opt.second_step()                        # restore exactly, then the base optimizer's step

With an fp16 ``GradScaler``: ``for _ in opt.gradient_passes(scaler=scaler): scaler.scale(loss).backward()``, then
``opt.restore(); scaler.step(opt); scaler.update()`` (weights clean even when the scaler skips the step).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from flatpeft._dist import is_dtensor, local
from flatpeft.adapters.lora import LoRAFactors
from flatpeft.optim.rng import RNGState
from flatpeft.perturb.base import StepState
from flatpeft.perturb.rules import Rule
from flatpeft.perturb.schedules import scheduled

__all__ = ["SharpnessAware"]

_PREFIX = "flatpeft."
_STEP_KEY = "flatpeft_step"


class SharpnessAware(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` with the perturbation ``rules`` of one flatpeft method.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer`` over the trainable tensors.
        rules: the method's rules (see :mod:`flatpeft.perturb.rules`), run in order.
        names: parameter names aligned with the base optimizer's flattened parameter list (for diagnostics).
        lora: the model's LoRA factors (needed by LoRA-space rules).
        adapters: per flattened parameter, whether it is a PEFT adapter tensor (default: none known).
        norm_modules: the model's BatchNorm-like modules; pass 2 of a two-pass step leaves their running
            statistics alone unless ``pass2_norm_stats``.
        rho: neighbourhood radius; ``rho_schedule`` / ``rho_min`` / ``total_steps`` decay it
            (:func:`flatpeft.perturb.schedules.scheduled`).
        seed: seed of the method's private random generators (random selection, noise), never the global RNG.
        rank: this process's rank (per-rank noise).
        replay_rng: give pass 2 the random state of pass 1 (same dropout masks) and leave the global generators
            where one pass would have left them. Default True.
        method: the registered method name (for messages).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        rules: Sequence[Rule] | None = None,
        *,
        names: Sequence[str] | None = None,
        lora: Sequence[LoRAFactors] = (),
        adapters: Sequence[bool] | None = None,
        norm_modules: Sequence[nn.Module] = (),
        rho: float = 0.0,
        rho_schedule: str = "constant",
        rho_min: float = 0.0,
        total_steps: int | None = None,
        seed: int = 0,
        rank: int = 0,
        replay_rng: bool = True,
        pass2_norm_stats: bool = False,
        method: str = "custom",
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer) or rules is None:
            raise ValueError(
                "SharpnessAware wraps a constructed torch.optim.Optimizer with a method's rules "
                f"(got {type(base_optimizer).__name__}{'' if rules is not None else ' and no rules'}): build it with "
                "flatpeft.create_optimizer(model, method, ...), or in a transformers Trainer use "
                "flatpeft.integrations.SharpnessAwareTrainer / SharpnessAwareMixin (not optimizer_cls_and_kwargs)"
            )
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
        self.adapters = list(adapters) if adapters is not None else [False] * len(self.trainable)
        self._index = {id(p): i for i, p in enumerate(self.trainable)}
        self.lora = list(lora)
        self.norm_modules = list(norm_modules)
        self.rho = float(rho)
        self.rho_schedule = rho_schedule
        self.rho_min = float(rho_min)
        self.total_steps = total_steps
        self.seed = int(seed)
        self.rank = int(rank)
        self.replay_rng = bool(replay_rng)
        self.pass2_norm_stats = bool(pass2_norm_stats)
        self.metrics: dict[str, torch.Tensor] = {}
        self._perturbed = False
        self._awaiting_update = False
        self._frozen_norms: list[nn.Module] = []
        self._store: dict[str, Any] = {"step": 0, "buffers": {}}
        self._check_lora_factors()
        self._mark_step()
        # flatpeft's state travels in torch's own state dict through its hooks (no override of state_dict)
        self.register_state_dict_pre_hook(SharpnessAware._before_state_dict)
        self.register_state_dict_post_hook(SharpnessAware._add_own_state)
        self.register_load_state_dict_pre_hook(SharpnessAware._take_own_state)
        self.register_load_state_dict_post_hook(SharpnessAware._share_loaded_state)

    def _check_lora_factors(self) -> None:
        """Every LoRA factor a rule keeps state for or reads a learning rate of (:attr:`Rule.lora_factors`) must be
        one of the optimizer's parameters: refuse at construction, naming the tensor, instead of failing at step 1."""
        for rule in self.rules:
            for which in rule.lora_factors:
                for f in self.lora:
                    if id(getattr(f, which)) not in self._index:
                        raise ValueError(
                            f"{self.method}: the LoRA factor {which} of {f.name} ({'lora_A' if which == 'A' else 'lora_B'}) "
                            f"is not among the optimizer's parameters, but {self.method} needs the "
                            f"{' and '.join('lora_' + w for w in rule.lora_factors)} factor(s) of every LoRA layer in its "
                            "parameter groups. Pass the model (or all of its trainable parameters) to create_optimizer, "
                            "or freeze that adapter (requires_grad=False) so it is not a LoRA layer of the method."
                        )

    # ------------------------------------------------------------------ state shared with the rules
    @property
    def _own(self) -> dict[str, Any]:
        """``{"step": int, "buffers": {key: {position: tensor}}}``: the method's own state."""
        return self._store

    @property
    def passes(self) -> int:
        """Forward+backward passes of the current step (1 or 2; may vary by step, e.g. ``ascent_every``)."""
        step = self.step_count
        return max([r.passes_at(step) for r in self.rules], default=1)

    @property
    def step_count(self) -> int:
        """Number of completed optimizer steps (saved in ``state_dict()``)."""
        return int(self._own["step"])

    def current_rho(self) -> float:
        """The radius of the current step after the schedule (host arithmetic, no device sync)."""
        return scheduled(self.rho, self.step_count, self.total_steps, self.rho_schedule, self.rho_min)

    def _lrs(self) -> list[Any]:
        return [g["lr"] for g in self.param_groups for _ in g["params"]]

    def sync_parameters(self) -> None:
        """Follow parameters swapped inside the shared groups, position by position: accelerate's FSDP2 preparation
        replaces an optimizer's parameters by their sharded DTensor versions after the optimizer was built. The
        LoRA factors then point at the new ``A`` / ``B`` and at the module's current (sharded) base weight, so no
        reference to the replaced full tensors is kept. Called at every step (identity checks on the host)."""
        flat = [p for g in self.param_groups for p in g["params"]]
        if len(flat) == len(self.trainable) and all(a is b for a, b in zip(flat, self.trainable)):
            return
        if len(flat) != len(self.trainable):
            raise RuntimeError("the optimizer's parameter groups changed size; build the flatpeft optimizer again")
        mapping = {id(old): new for old, new in zip(self.trainable, flat)}
        self.trainable = flat
        self._index = {id(p): i for i, p in enumerate(flat)}
        for slot in self._own["buffers"].values():  # buffers made for the replaced tensors: shard them likewise
            for i, t in list(slot.items()):
                if is_dtensor(flat[i]) and not is_dtensor(t):
                    slot[i] = self._placed(t, flat[i])
        lora = []
        for f in self.lora:
            holder = f.base_layer if f.base_layer is not None else f.module
            weight = getattr(holder, "weight", None) if holder is not None else None
            lora.append(dataclasses.replace(
                f, A=mapping.get(id(f.A), f.A), B=mapping.get(id(f.B), f.B),
                base_weight=weight if isinstance(weight, torch.Tensor) and weight.shape == f.base_weight.shape else f.base_weight,
            ))
        self.lora = lora

    def step_state(self) -> StepState:
        """The :class:`StepState` the rules see now (built on each call, so learning rates are current)."""
        self.sync_parameters()
        return StepState(
            trainable=self.trainable, names=self.names, adapters=self.adapters, lrs=self._lrs(), lora=self.lora,
            rho=self.current_rho(), step=self.step_count, total_steps=self.total_steps, seed=self.seed,
            rank=self.rank, store=self._own["buffers"], metrics=self.metrics, _index=self._index,
        )

    def memory_report(self) -> dict[str, int]:
        """Bytes the method holds beyond the base optimizer: ``persistent`` (buffers saved with the state) and
        ``transient`` (the largest copy held between ``first_step`` and ``restore`` so far)."""
        persistent = sum(local(t).numel() * t.element_size() for slot in self._own["buffers"].values() for t in slot.values())
        return {"persistent": int(persistent), "transient": int(sum(r.transient_bytes for r in self.rules))}

    # ------------------------------------------------------------------ the step
    def _freeze_norm_stats(self) -> None:
        """Pass 2 must not move BatchNorm running statistics: switch tracking off on modules in training mode
        (they normalise with batch statistics either way)."""
        if self.passes != 2 or self.pass2_norm_stats:
            return
        for m in self.norm_modules:
            if m.training and m.track_running_stats:
                m.track_running_stats = False
                self._frozen_norms.append(m)

    def _thaw_norm_stats(self) -> None:
        for m in self._frozen_norms:
            m.track_running_stats = True
        self._frozen_norms = []

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move the weights to the point where the update gradient is taken, and zero the gradients.

        For a two-pass method this needs the pass-1 gradients in ``.grad``. For a single-pass method call it
        before the step's forward pass; any gradient present then is stale and is discarded (``zero_grad``). On
        error the weights are restored before the exception propagates.
        """
        if self._perturbed:
            self.restore()
        self.sync_parameters()
        if self.passes == 2 and all(p.grad is None for p in self.trainable):
            raise RuntimeError(
                f"first_step() of {self.method!r} needs the gradients of pass 1: run forward and backward at the "
                "current weights first (or use step(closure) / gradient_passes())"
            )
        self.metrics = {}
        self._perturbed = True
        self._awaiting_update = True
        state = self.step_state()
        try:
            for rule in self.rules:
                rule.perturb(state)
            self._freeze_norm_stats()
        except BaseException:
            self.restore()
            raise
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every perturbed tensor back exactly (idempotent). Gradients are left untouched."""
        state = self.step_state()
        for rule in reversed(self.rules):
            rule.restore(state)
        self._thaw_norm_stats()
        self._perturbed = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights, then run the update (``before_update``, base step, ``after_update``)."""
        self.restore()
        self._update()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _update(self) -> None:
        state = self.step_state()
        for rule in self.rules:
            rule.before_update(state)
        self.base_optimizer.step()
        for rule in self.rules:
            rule.after_update(state)
        self._own["step"] = self.step_count + 1
        self._mark_step()
        self._awaiting_update = False

    def _needs_first_step(self) -> bool:
        return any(r.perturbs for r in self.rules)

    @torch.no_grad()
    def unscale_grads_(self, scaler: Any) -> None:
        """Divide the trainable gradients by an fp16 ``GradScaler``'s scale, on the device (no host sync).

        Used between the passes of a two-pass step: the perturbation needs the true pass-1 gradient, and
        ``scaler.unscale_`` may run only once per ``update()`` (it is left to the update gradient's clipping).
        """
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return
        self.sync_parameters()
        grads = [local(p.grad) for p in self.trainable if p.grad is not None]
        if not grads:
            return
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
        if scale is None:
            torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
            return
        inv = scale.double().reciprocal()
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            if dtype in (torch.float32, torch.float64):
                torch._foreach_mul_(same, inv.to(device=same[0].device, dtype=dtype))
            else:  # half-precision gradients (GradScaler itself refuses them): 1/scale may underflow there
                torch._foreach_mul_(same, 1.0 / scaler.get_scale())

    def gradient_passes(self, scaler: Any = None) -> Iterator[int]:
        """Yield once per gradient pass of the method (``0``, then ``1`` for a two-pass method).

        The loop body runs forward and backward (all micro-batches of the step). Two-pass methods: pass 0 at
        ``w``; then (pass-1 gradients divided by ``scaler``'s scale when given) :meth:`first_step` perturbs and
        zeroes the gradients, the global random state is set back to where pass 0 started (same dropout masks)
        and pass 1 runs at ``w + e``; afterwards the random state is where pass 0 left it. Single-pass methods:
        :meth:`first_step` (perturb, zero stale gradients), then one pass. The weights stay perturbed after the
        loop: finish with :meth:`second_step` (or :meth:`restore` + ``scaler.step(opt)``). If the loop body
        raises, the weights are restored when the loop is left.
        """
        if self.passes == 1:
            self.first_step()
            try:
                yield 0
            except BaseException:
                self.restore()
                raise
            return
        start = RNGState.capture() if self.replay_rng else None
        yield 0
        after_pass1 = RNGState.capture() if self.replay_rng else None
        self.unscale_grads_(scaler)
        self.first_step()
        try:
            if start is not None:
                start.restore()
            yield 1
        except BaseException:
            self.restore()
            raise
        finally:
            if after_pass1 is not None:
                after_pass1.restore()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step.

        With a closure (which runs forward and backward and returns the loss) the closure is called once or
        twice as the method needs (:meth:`gradient_passes`), the weights are restored even if the closure raises,
        and the loss of the first pass is returned (at the unperturbed point for two-pass methods). Without a
        closure this finishes a step begun by :meth:`first_step` / :meth:`gradient_passes` (what
        ``GradScaler.step`` and ``transformers.Trainer`` call); methods that perturb nothing (``base``,
        ``spider``, ``nbar``, ``obar``) may also be stepped without a closure like any torch optimizer.
        """
        if closure is None:
            if not self._awaiting_update and self._is_state_initialisation():
                self.base_optimizer.step()
                return None
            if not self._awaiting_update and self._needs_first_step():
                raise RuntimeError(
                    f"step() without a closure: method {self.method!r} must perturb the weights before the "
                    "gradient is taken. Use opt.step(closure), or the gradient_passes() loop followed by "
                    "opt.second_step()."
                )
            self.restore()
            self._update()
            return None
        closure = torch.enable_grad()(closure)
        two_pass = self.passes == 2
        losses = []
        passes = self.gradient_passes()
        try:
            for _ in passes:
                losses.append(closure())
        finally:
            passes.close()
            self.restore()
        self._update()
        for key, value in zip(("loss", "loss_perturbed") if two_pass else ("loss",), losses):
            if isinstance(value, torch.Tensor):
                self.metrics[key] = value.detach()
        return losses[0]

    def _is_state_initialisation(self) -> bool:
        """A closure-less step on an optimizer that has never stepped, with every learning rate 0 and every gradient
        present: what ``torch.distributed.checkpoint.state_dict`` does (zero gradients, lr 0) to create the base
        optimizer's state before saving or loading. Only the base optimizer runs then (a no-op on the weights); the
        method's rules and step counter are left alone."""
        if self.step_count != 0 or any(isinstance(k, torch.Tensor) for k in self.state):
            return False
        self.sync_parameters()
        if any(p.grad is None for p in self.trainable):
            return False
        return all(float(g["lr"]) == 0.0 for g in self.param_groups)

    # ------------------------------------------------------------------ state_dict
    def materialize_state(self) -> None:
        """Create every persistent buffer the method may use (as it would on first use). ``state_dict()`` calls it,
        so the state dict of a fresh optimizer is a complete template for ``torch.distributed.checkpoint.load``."""
        state = self.step_state()
        for rule in self.rules:
            rule.materialize(state)

    @staticmethod
    def _before_state_dict(opt: "SharpnessAware") -> None:
        """State-dict pre-hook: refuse while perturbed; create every buffer, so the state dict of a fresh optimizer
        is a complete template for ``torch.distributed.checkpoint.load``."""
        if opt._perturbed:
            raise RuntimeError("state_dict() while the weights are perturbed: call it outside first_step()/second_step()")
        opt.materialize_state()

    @staticmethod
    def _add_own_state(opt: "SharpnessAware", sd: dict[str, Any]) -> dict[str, Any]:
        """State-dict post-hook: the base optimizer's own state dict (its ``state_dict`` override and hooks run,
        e.g. an 8-bit optimizer's), plus each persistent buffer of a parameter in that parameter's entry under
        ``"flatpeft.<key>"`` (a DTensor shaped like the parameter under FSDP2, so ``torch.distributed.checkpoint``
        shards it), and the step counter as ``"flatpeft_step"`` in every group."""
        sd = opt.base_optimizer.state_dict()
        inner = dict(sd["state"])
        for key, slot in opt._own["buffers"].items():
            for position, tensor in slot.items():
                inner[position] = {**inner.get(position, {}), _PREFIX + key: tensor}  # never the live entry
        sd["state"] = {k: inner[k] for k in sorted(inner)}
        step = opt.step_count
        sd["param_groups"] = [{**g, _STEP_KEY: step} for g in sd["param_groups"]]
        return sd

    @staticmethod
    def _take_own_state(opt: "SharpnessAware", state_dict: dict[str, Any]) -> dict[str, Any]:
        """Load pre-hook: take the ``"flatpeft.<key>"`` entries and ``"flatpeft_step"`` out (parameter keys may be
        positions or, through ``torch.distributed.checkpoint``, names), so the base optimizer's state is loaded as
        torch loads it and flatpeft's buffers are taken as saved, never cast to the parameter dtypes."""
        groups = [dict(g) for g in state_dict["param_groups"]]
        steps = [g.pop(_STEP_KEY) for g in groups if _STEP_KEY in g]
        position_of = {k: i for i, k in enumerate(k for g in groups for k in g["params"])}
        foreign = [k for k in state_dict["state"] if k not in position_of]
        if foreign:
            raise ValueError(
                f"optimizer state dict: entry {foreign[0]!r} belongs to no parameter of its groups"
                + (" (the layout of a pre-release flatpeft, which kept everything under state['flatpeft']; it is no "
                   "longer read: resume that run with the flatpeft version that saved it)" if foreign[0] == "flatpeft"
                   else "")
            )
        inner: dict[Any, Any] = {}
        buffers: dict[str, dict[int, torch.Tensor]] = {}
        for k, entry in state_dict["state"].items():
            base_entry = {}
            for name, value in entry.items():
                if isinstance(name, str) and name.startswith(_PREFIX):
                    buffers.setdefault(name[len(_PREFIX):], {})[position_of[k]] = value
                else:
                    base_entry[name] = value
            if base_entry:
                inner[k] = base_entry
        opt._loaded = {"step": int(steps[0]) if steps else 0, "buffers": buffers}
        # the base optimizer loads its own state (its load_state_dict override and hooks run); torch's load of the
        # wrapper then only checks the groups, and the post-hook shares the base's loaded state again
        opt.base_optimizer.load_state_dict({**state_dict, "state": inner, "param_groups": groups})
        return {**state_dict, "state": {}, "param_groups": groups}

    @staticmethod
    def _share_loaded_state(opt: "SharpnessAware") -> None:
        """Load post-hook: share the base optimizer's loaded ``state`` / ``param_groups`` again (torch's load gave the
        wrapper objects of its own), then place flatpeft's buffers like their parameters.

        A state dict saved after step 0 that lacks buffers the method keeps is refused:
        ``torch.distributed.checkpoint`` with ``flatten_optimizer_state_dict=True`` (which transformers' distributed
        optimizer saving uses) keeps only the keys of the live optimizer state, so flatpeft's buffers are lost there.
        """
        opt.param_groups = opt.base_optimizer.param_groups
        opt.state = opt.base_optimizer.state
        loaded = opt.__dict__.pop("_loaded")
        opt.sync_parameters()
        buffers = {key: {i: opt._placed(t, opt.trainable[i]) for i, t in store.items()}
                   for key, store in loaded["buffers"].items()}
        opt._store = {"step": loaded["step"], "buffers": buffers}
        opt._mark_step()
        held = {(key, i) for key, store in buffers.items() for i in store}
        opt.materialize_state()
        missing = sorted({key for key, store in opt._own["buffers"].items() for i in store if (key, i) not in held})
        if loaded["step"] > 0 and missing:
            raise ValueError(
                f"optimizer state dict of step {loaded['step']} holds no flatpeft buffer(s) {', '.join(missing)} for "
                f"method {opt.method!r}: it was saved by another method, or through torch.distributed.checkpoint with "
                "flatten_optimizer_state_dict=True, which keeps only the keys of the live optimizer state and drops "
                "flatpeft's (save with flatten_optimizer_state_dict=False; docs/distributed.md)"
            )

    def _mark_step(self) -> None:
        """Keep the step counter in the live parameter groups too, so that a state dict that keeps only the live
        groups' keys (a flattened distributed checkpoint) still carries it."""
        for g in self.param_groups:
            g[_STEP_KEY] = self.step_count

    @staticmethod
    def _placed(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A loaded buffer as a fresh tensor on ``param``'s device, sharded like ``param`` when ``param`` is a
        DTensor and the buffer was saved whole (one process, or a full state dict); a buffer of another shape (a
        per-tensor scalar) stays whole."""
        tensor = tensor.detach()
        if is_dtensor(param) and not is_dtensor(tensor) and tuple(tensor.shape) == tuple(param.shape):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(tensor.to(local(param).device).clone(), param.device_mesh, param.placements,
                                     src_data_rank=None)
        if is_dtensor(tensor):
            return tensor.clone()
        return tensor.clone().to(local(param).device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (shared), and track its tensors."""
        if not hasattr(self, "base_optimizer"):
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        for p in self.base_optimizer.param_groups[-1]["params"]:
            self._index[id(p)] = len(self.trainable)
            self.trainable.append(p)
            self.names.append(f"param{len(self.names)}")
            self.adapters.append(False)

    def __repr__(self) -> str:
        return f"SharpnessAware(method={self.method!r}, passes={self.passes}, base={self.base_optimizer.__class__.__name__})"

    # ------------------------------------------------------------------ hosts that call optimizer.train()
    driver: str | None = None
    """The integration that runs this optimizer's passes (``flatpeft.integrations`` sets it: ``"SharpnessAwareMixin"``,
    ``"SharpnessAwareCallback"``); None for the closure API, ``gradient_passes()`` loops and accelerate loops."""

    def train(self) -> None:
        """The hook ``transformers.Trainer.training_step`` calls before every forward pass (meant for schedule-free
        optimizers; forwarded to the base optimizer when it has one).

        A plain ``Trainer(optimizers=(opt, None))`` never calls :meth:`first_step`, so a method that perturbs would
        silently train without its perturbation, and a two-pass method would fail only after step 1's forward
        and backward. This refuses before that forward pass, naming the integrations that run the passes.
        """
        if self.driver is None and not self._perturbed and self._needs_first_step():
            raise RuntimeError(
                f"flatpeft method {self.method!r} is being trained by a Trainer that does not run its gradient passes "
                "(e.g. a plain transformers.Trainer given optimizers=(opt, None)). Use "
                "flatpeft.integrations.SharpnessAwareTrainer, or put flatpeft.integrations.SharpnessAwareMixin first in "
                "the bases of your Trainer subclass (class MyTrainer(SharpnessAwareMixin, SFTTrainer)); single-pass "
                "methods can also run through callbacks=[flatpeft.integrations.SharpnessAwareCallback(opt)] "
                "(docs/trainer.md)."
            )
        hook = getattr(self.base_optimizer, "train", None)
        if callable(hook):
            hook()

    def eval(self) -> None:
        """Forwarded to the base optimizer's ``eval()`` when it has one (schedule-free optimizers)."""
        hook = getattr(self.base_optimizer, "eval", None)
        if callable(hook):
            hook()
