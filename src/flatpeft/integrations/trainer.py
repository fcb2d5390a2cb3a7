"""Run any flatpeft method inside a Hugging Face ``transformers.Trainer`` (or any subclass of it, e.g. trl's).

* :class:`SharpnessAwareMixin` replaces the Trainer's training step with the method's one or two gradient
  passes. Put it first in the bases of any ``transformers.Trainer`` subclass::

      class SharpnessAwareSFTTrainer(SharpnessAwareMixin, trl.SFTTrainer):
          pass

* :class:`SharpnessAwareTrainer` is ``SharpnessAwareMixin`` + ``transformers.Trainer``.

The Trainer calls ``training_step`` once per micro-batch and ``optimizer.step()`` (never with a closure) once
per accumulation window, after clipping the gradients. A two-pass method needs, per optimizer step, the full
accumulated gradient at ``w`` over all micro-batches of the step (pass 1), the perturbation ``e`` computed from
it (``first_step``), the gradient at ``w + e`` re-accumulated over all micro-batches (pass 2), and finally the
exact restoration of ``w`` and the base update with the (clipped) pass-2 gradient (see ``docs/algorithms.md``
for the methods and ``docs/trainer.md`` for this integration). So the mixin *caches* the micro-batches of the
window (the Trainer has already prefetched them, so this costs no memory) and does all the work on the
window's last micro-batch, which the Trainer marks with ``accelerator.sync_gradients``::

    micro-batch 1 .. n-1:  cache the inputs, return 0
    micro-batch n:         for index in opt.gradient_passes(scaler=accelerator.scaler):
                               (before pass 2: snapshot the subclass's metric store)
                               forward + backward over all n micro-batches (the Trainer's training_step);
                               DDP sync on the last micro-batch of the last pass (pass 1 too with
                               sync_ascent_grad)
                           (after the loop: put the metric store back; weights are left at w + e)
                           return the summed (already 1/n-scaled) loss of the first pass
    Trainer:               clip (update gradient only), optimizer.step() -> SharpnessAware.step() without a
                           closure: restore w exactly (and BatchNorm tracking), base optimizer step

``SharpnessAware.gradient_passes`` does the rest: for a two-pass method it snapshots the random state, yields
pass 1 at ``w``, divides the pass-1 gradients by the fp16 GradScaler's scale, calls ``first_step()`` (perturb,
zero the gradients, stop BatchNorm running statistics), replays the random state, yields pass 2 at ``w + e``
and leaves the random state where pass 1 left it; for a single-pass method it calls ``first_step()`` and yields
once.

Each pass uses the Trainer's own ``training_step`` (that of the subclass the mixin is combined with: autocast,
loss scaling by the number of micro-batches or ``num_items_in_batch``, ``accelerator.backward`` with the fp16
GradScaler, trl's activation offloading ...), so the losses and gradients are the ones a plain Trainer would
compute at the same weights.

Design decisions:

* Wrap, do not replace: ``create_optimizer`` runs the host Trainer's own ``create_optimizer`` and wraps its result
  (``flatpeft.create_optimizer(model, method, base_optimizer=<instance>)``), so the host's parameter groups,
  learning rates (LoRA+), hyper-parameters and state survive.
* Defaults: every schedule or ramp of the method (``rho_schedule``, Flat-LoRA's noise ramp, BAR's decay) runs
  over the Trainer's number of optimizer steps, and the method's private seed is ``TrainingArguments.seed``,
  unless ``flatpeft_kwargs`` names ``total_steps`` / ``seed``. transformers 4.46-4.57 build the optimizer before
  they set ``state.max_steps``: the step count comes from ``create_optimizer_and_scheduler(num_training_steps)``
  there, and ``on_train_begin`` sets it again from ``state.max_steps`` on every version.
* A plain ``Trainer`` given a flatpeft optimizer is refused before step 1's forward pass
  (``SharpnessAware.train()``); single-pass methods can run from :class:`SharpnessAwareCallback` instead.
* Pass 1 runs under ``accelerator.no_sync(model)`` (per-replica ascent direction, Foret et al.'s m-sharpness)
  unless ``sync_ascent_grad=True``; the pass-2 gradient is all-reduced once, on its last micro-batch.
* fp16: pass-1 gradients are scaled by the GradScaler; they are divided by the scaler's scale tensor (no host
  sync; not ``unscale_``, which may run only once per ``update()`` and is left to the Trainer's clipping) before
  ``first_step``; the engine skips a non-finite perturbation. If the scaler then skips the step (inf in pass 2),
  a callback restores the weights right after ``optimizer.step()``, before any evaluation or checkpoint.
* RNG: pass 2 replays pass 1's random state (same dropout masks per micro-batch) and the generators end where
  one pass would have left them, so a two-pass method consumes the random stream of plain training.
* Metrics of the Trainer subclass: a subclass that records metrics inside ``compute_loss`` (trl's
  ``self._metrics``: token accuracy, entropy, ``num_tokens``) would record them once per pass. The mixin keeps
  only pass 1's: it snapshots the attributes named in :attr:`SharpnessAwareMixin.flatpeft_metric_attributes`
  before pass 2 and puts them back afterwards. So every example is counted once and the metrics are those at the
  unperturbed weights (for single-pass methods: at the point where the update gradient is taken).
* The returned training loss is the loss at the unperturbed weights (pass 1), as plain training would log;
  ``flatpeft/loss_gap`` = L(w + e) - L(w) and ``flatpeft/perturbation_norm`` are averaged over the optimizer
  steps since the last log (and over DDP ranks) and added to the Trainer's training logs (so ``report_to`` picks
  them up); they are read from the device only at logging steps.
* FSDP2 (accelerate's ``fsdp_version: 2``, ``configs/accelerate/fsdp2.yaml``) and DDP are supported
  (docs/distributed.md). Under FSDP2 the weights are sharded, so there is one perturbation for all ranks: every
  pass's gradient is reduce-scattered on its last micro-batch (``sync_ascent_grad`` is implied). FSDP1 and
  DeepSpeed are refused with ``NotImplementedError`` naming the FSDP2 config (DeepSpeed's engine steps the
  optimizer inside its backward at the accumulation boundary and owns the gradient partitions, so a second pass
  and an exact restore cannot be placed around it; FSDP1's flat parameters hide the LoRA factors).
* ``trainer.optimizer`` is wrapped by accelerate (``AcceleratedOptimizer``) during ``train()``; the flatpeft
  optimizer itself (``first_step``, ``passes``, ``metrics``, ``current_rho()``) is ``trainer.flatpeft_optimizer``
  (or :func:`unwrap_optimizer` of any wrapper).

Example::

    from flatpeft.integrations import SharpnessAwareTrainer
    trainer = SharpnessAwareTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                    flatpeft_method="flatpo", flatpeft_kwargs={"rho": 0.05, "fraction": 0.05})
    trainer.train()
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

from flatpeft._extras import require

require("hf", "transformers", "accelerate", part="flatpeft.integrations")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import flatpeft  # noqa: E402

__all__ = [
    "SharpnessAwareCallback", "SharpnessAwareMixin", "SharpnessAwareTrainer", "base_optimizer_from_args", "unwrap_optimizer",
]


def unwrap_optimizer(optimizer: Any) -> "flatpeft.SharpnessAware":
    """The flatpeft optimizer inside ``optimizer``: itself, or the one wrapped by accelerate's
    ``AcceleratedOptimizer`` (``.optimizer``), following nested wrappers. ``ValueError`` if there is none."""
    seen = 0
    current = optimizer
    while current is not None and seen < 16:
        if isinstance(current, flatpeft.SharpnessAware):
            return current
        current = getattr(current, "optimizer", None)
        seen += 1
    raise ValueError(f"{type(optimizer).__name__} is not (and does not wrap) a flatpeft SharpnessAware optimizer")


def base_optimizer_from_args(args, model=None) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The Trainer's optimizer class and keyword arguments for ``args.optim`` (e.g. AdamW, lr, betas, eps).

    Uses ``Trainer.get_optimizer_cls_and_kwargs`` so ``optim``, ``optim_args``, ``adam_beta1/2`` and
    ``adam_epsilon`` mean what they mean for a plain Trainer. Optimizers that are not plain
    ``torch.optim.Optimizer`` classes over parameter groups (factories, GaLore, LOMO, layer-wise) are refused.
    """
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    for special in ("params", "model", "optimizer_dict"):
        if special in kwargs:
            raise ValueError(
                f"args.optim={args.optim!r} builds its own parameter set ({special!r}); the sharpness-aware Trainer "
                "needs a plain torch optimizer class such as adamw_torch, adamw_torch_fused, sgd or adafactor"
            )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"args.optim={args.optim!r} is not a torch.optim.Optimizer class ({cls!r})")
    return cls, kwargs


def _flatpeft_inside(optimizer: Any) -> "flatpeft.SharpnessAware | None":
    """The flatpeft optimizer in ``optimizer`` (itself or inside wrappers), or None."""
    if optimizer is None:
        return None
    try:
        return unwrap_optimizer(optimizer)
    except ValueError:
        return None


def _refuse_flatpeft_class(cls_and_kwargs: Any) -> None:
    """``optimizer_cls_and_kwargs`` names the *base* optimizer; a flatpeft class there cannot be built from groups."""
    if not cls_and_kwargs:
        return
    cls = cls_and_kwargs[0]
    if (isinstance(cls, type) and issubclass(cls, flatpeft.SharpnessAware)) or cls is flatpeft.create_optimizer:
        raise ValueError(
            "optimizer_cls_and_kwargs: give the base optimizer the Trainer should build, e.g. (torch.optim.AdamW, "
            "{'betas': (0.9, 0.95)}); SharpnessAwareMixin wraps it in flatpeft_method (a flatpeft optimizer cannot "
            "be built from the Trainer's parameter groups alone)"
        )


def _plain_base(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The host's optimizer, checked to be one flatpeft can wrap (a torch optimizer over the trainable tensors)."""
    name = type(optimizer).__name__
    if name == "LayerWiseDummyOptimizer":
        raise ValueError(
            "the Trainer built a layer-wise optimizer (optim=..._layerwise), which steps each layer inside backward; "
            "flatpeft needs the whole step's gradient before the update. Use the optimizer without _layerwise"
        )
    if not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        raise ValueError(
            f"the Trainer's optimizer is an object of type {name}, not a plain torch.optim.Optimizer that flatpeft can "
            "wrap (build the flatpeft optimizer before any wrapper is applied)"
        )
    return optimizer


def _set_group_keys(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> None:
    """Set each of ``settings`` on every parameter group of ``optimizer`` (``ValueError`` naming a key it lacks)."""
    for key, value in settings.items():
        if not all(key in g for g in optimizer.param_groups):
            have = sorted(k for k in optimizer.param_groups[0] if k != "params") if optimizer.param_groups else []
            raise ValueError(
                f"flatpeft_kwargs: {key!r} is neither a keyword of the flatpeft method nor a setting of the Trainer's "
                f"{type(optimizer).__name__} (its parameter groups have: {', '.join(have)})"
            )
        for group in optimizer.param_groups:
            group[key] = value


def _single_pass(opt: "flatpeft.SharpnessAware") -> "flatpeft.SharpnessAware":
    """``opt`` if its method never takes a second gradient pass, else ``ValueError`` naming the mixin."""
    if max((rule.passes for rule in opt.rules), default=1) > 1:
        raise ValueError(
            f"method {opt.method!r} takes two gradient passes per step (a pass at w, then one at w + e), which a "
            "callback cannot run: use SharpnessAwareTrainer or SharpnessAwareMixin. Single-pass methods: "
            f"{', '.join(n for n in flatpeft.optim.method_names() if flatpeft.get_method(n).passes == 1)}"
        )
    return opt


class _MetricSums:
    """Running sums of the flatpeft diagnostics over optimizer steps, on the device (read only at a log)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Add one step's ``perturbation_norm`` and ``loss_gap`` (``loss_perturbed - loss``) where present."""
        values: dict[str, torch.Tensor] = {}
        if "perturbation_norm" in metrics:
            values["perturbation_norm"] = metrics["perturbation_norm"]
        if "loss" in metrics and "loss_perturbed" in metrics:
            values["loss_gap"] = metrics["loss_perturbed"] - metrics["loss"]
        for key, value in values.items():
            value = torch.as_tensor(value).detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def pop_means(self, device: Any, reduce: Any = None) -> dict[str, float]:
        """``{"flatpeft/<name>": mean since the last call}`` (averaged over ranks by ``reduce``), then reset."""
        if not self.count or not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k].to(device) for k in keys]) / self.count
        if reduce is not None:
            means = reduce(means, reduction="mean")
        self.sums, self.count = {}, 0
        return {f"flatpeft/{key}": round(value, 8) for key, value in zip(keys, means.tolist())}


def _dist_mean(values: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean of ``values`` over the ranks of the default process group."""
    values = values.clone()
    torch.distributed.all_reduce(values)
    return values / torch.distributed.get_world_size()


class _AfterOptimizerStep(TrainerCallback):
    """Right after ``optimizer.step()``: restore the weights if the step did not run, then collect the step's
    diagnostics.

    ``GradScaler.step`` skips ``optimizer.step()`` entirely on overflow (fp16 inf/NaN gradients), so the
    restoration that ``SharpnessAware.step()`` does never ran; this runs before the Trainer may evaluate or save a
    checkpoint. The diagnostics are read here, after the restoration, because some methods complete them there
    (e.g. the norm of noise applied through forward hooks).
    """

    def __init__(self, trainer: "SharpnessAwareMixin") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        """The schedules of an optimizer the mixin built run over this ``train()``'s steps (``state.max_steps``,
        set by now on every transformers version), unless ``flatpeft_kwargs`` names ``total_steps``."""
        opt, trainer = self.trainer.flatpeft_optimizer, self.trainer
        if opt is not None and trainer._fp_wrapped and "total_steps" not in trainer.flatpeft_kwargs and state.max_steps > 0:
            opt.total_steps = int(state.max_steps)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        opt = self.trainer.flatpeft_optimizer
        if opt is not None:
            if self.trainer.accelerator.optimizer_step_was_skipped:
                opt.restore()
            self.trainer._accumulate_metrics(opt.metrics)
        return control


class SharpnessAwareMixin:
    """The sharpness-aware training step for any ``transformers.Trainer`` subclass.

    Use it as the first base: ``class MyTrainer(SharpnessAwareMixin, trl.SFTTrainer): pass``; then
    ``MyTrainer(..., flatpeft_method="sam", flatpeft_kwargs={"rho": 0.05})`` takes every argument of the
    subclass plus the ones below.

    Args:
        flatpeft_method: a registered method name (``flatpeft.get_method``: the built-in ``"sam"``, ``"flatpo"``,
            ``"eflat-lora"``, ... or one added with ``flatpeft.register_method``).
        flatpeft_kwargs: method keywords for ``flatpeft.create_optimizer`` (``rho``, ``fraction``, ...);
            ``total_steps`` defaults to the Trainer's number of optimizer steps and ``seed`` to ``args.seed``. Keys
            given here win. The base optimizer is the one the host Trainer builds (:meth:`create_optimizer` wraps
            it: ``args.optim``, the weight-decay split, a subclass's LoRA+ groups ...); other keys given here
            (``lr``, ``betas``, ...) are set on each of its parameter groups.
        sync_ascent_grad: all-reduce the pass-1 gradient across DDP ranks (one global perturbation) instead of
            perturbing each replica with its local gradient (default, as in Foret et al.). Under FSDP2 the
            pass-1 gradient is always reduced (the sharded weights hold one perturbation for all ranks).
        *args, **kwargs: passed to the Trainer class. ``optimizers=(opt, sched)``: a torch optimizer is wrapped in
            ``flatpeft_method``; a flatpeft ``SharpnessAware`` optimizer is used as built (then ``flatpeft_method``
            may be omitted). ``optimizer_cls_and_kwargs`` names the base optimizer the Trainer builds.

    Attributes:
        flatpeft_optimizer: the flatpeft optimizer (``trainer.optimizer`` may be accelerate's wrapper of it).
        flatpeft_metric_attributes: names of instance attributes where the Trainer subclass records training
            metrics from ``compute_loss`` (default: trl's ``_metrics`` and ``_total_train_tokens``). They are
            snapshotted (deep copy) before pass 2 of a two-pass step and put back after it, so the metrics are
            those of pass 1: each example counted once, at the unperturbed weights. Extend the tuple in your
            subclass if it records metrics elsewhere; override :meth:`flatpeft_metric_snapshot` /
            :meth:`flatpeft_metric_restore` for stores that cannot be deep-copied.
    """

    flatpeft_metric_attributes: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init__(
        self,
        *args: Any,
        flatpeft_method: str | None = None,
        flatpeft_kwargs: dict[str, Any] | None = None,
        sync_ascent_grad: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__}: SharpnessAwareMixin must be combined with a transformers.Trainer subclass, "
                "first in the bases: class MyTrainer(SharpnessAwareMixin, SFTTrainer)"
            )
        given = kwargs.get("optimizers", (None, None))
        given_opt = given[0] if given else None
        if given_opt is not None and not isinstance(given_opt, torch.optim.Optimizer):
            raise ValueError(
                f"optimizers[0] must be a torch.optim.Optimizer (wrapped with flatpeft_method) or a flatpeft "
                f"SharpnessAware optimizer, got an object of type {type(given_opt).__name__}"
            )
        prebuilt = _flatpeft_inside(given_opt)
        _refuse_flatpeft_class(kwargs.get("optimizer_cls_and_kwargs"))
        if prebuilt is None:
            if flatpeft_method is None:
                raise ValueError(f"flatpeft_method is required; registered methods: {list(flatpeft.optim.method_names())}")
            try:
                flatpeft.get_method(flatpeft_method)  # the live registry: methods added with register_method count
            except ValueError as err:
                raise ValueError(f"flatpeft_method={flatpeft_method!r}: {err}") from None
        if flatpeft_kwargs is not None and not isinstance(flatpeft_kwargs, dict):
            raise ValueError(f"flatpeft_kwargs must be a dict, got {type(flatpeft_kwargs).__name__}")
        self.flatpeft_method = flatpeft_method if prebuilt is None else prebuilt.method
        self.flatpeft_kwargs = dict(flatpeft_kwargs or {})
        self.sync_ascent_grad = bool(sync_ascent_grad)
        self.flatpeft_optimizer = prebuilt
        self._fp_wrapped = False  # True once the mixin has wrapped the host's optimizer (it then owns total_steps)
        self._fp_total_steps: int | None = None
        self._fp_cache: list[dict[str, Any]] = []
        self._fp_cache_step: int | None = None
        self._fp_metrics = _MetricSums()
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                f"{type(self).__name__} does not support DeepSpeed: its engine steps the optimizer inside backward at "
                "the accumulation boundary and owns the gradient partitions, so the second gradient pass and the "
                "exact restore of the weights cannot be placed around it. Use FSDP2 for sharded training: "
                "`accelerate launch --config_file \"$(flatpeft configs accelerate/fsdp2 --path)\" train.py` (distributed_type: FSDP, "
                "fsdp_version: 2), or TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2, ...}); "
                "DDP (flatpeft configs accelerate/ddp) when the model fits on one device (flatpeft docs distributed)."
            )
        if self.is_fsdp_enabled and self._fsdp_version() != 2:
            raise NotImplementedError(
                f"{type(self).__name__} supports FSDP2 only (fully_shard, DTensor parameters), not FSDP1's flat "
                "parameters: set fsdp_version: 2 in the accelerate config (flatpeft configs accelerate/fsdp2) or "
                "fsdp_config={'version': 2} in TrainingArguments (flatpeft docs distributed)."
            )
        self.add_callback(_AfterOptimizerStep(self))

    def _fsdp_version(self) -> int:
        plugin = getattr(getattr(self.accelerator, "state", None), "fsdp_plugin", None)
        return int(getattr(plugin, "fsdp_version", 1) or 1) if plugin is not None else 0

    # ------------------------------------------------------------------ optimizer
    def flatpeft_optimizer_kwargs(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The method keywords passed to ``flatpeft.create_optimizer`` when the host's optimizer is wrapped.

        ``total_steps`` is the Trainer's number of optimizer steps (once training has computed it) and ``seed`` is
        ``args.seed``; ``flatpeft_kwargs`` override both. Keywords of ``flatpeft_kwargs`` that are not method
        keywords are base-optimizer settings (see :meth:`create_optimizer`) and are not included.
        """
        kwargs: dict[str, Any] = {"seed": int(self.args.seed)}
        total = self._trainer_total_steps()
        if total:
            kwargs["total_steps"] = total
        method_keys = flatpeft.get_method(self.flatpeft_method).all_defaults()
        kwargs.update({k: v for k, v in self.flatpeft_kwargs.items() if k in method_keys})
        return kwargs

    def _trainer_total_steps(self) -> int | None:
        """The number of optimizer steps of the current ``train()``: what the Trainer passed to
        ``create_optimizer_and_scheduler`` (transformers 4.x builds the optimizer before it sets ``state.max_steps``),
        else ``state.max_steps`` (transformers 5 sets it first)."""
        if self._fp_total_steps:
            return self._fp_total_steps
        total = getattr(self.state, "max_steps", 0)
        return int(total) if total and total > 0 else None

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Note the number of training steps before the optimizer is built (transformers 4.x calls this before it
        sets ``state.max_steps``), then the host's ``create_optimizer_and_scheduler``."""
        self._fp_total_steps = int(num_training_steps) if num_training_steps and num_training_steps > 0 else None
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Wrap the optimizer the host Trainer builds (or was given) in the flatpeft method.

        The host's own ``create_optimizer`` runs first, so everything it does survives: its parameter groups and
        learning rates (the weight-decay split, LoRA+ ratios, GaLore or APOLLO groups, ``optimizer_cls_and_kwargs``,
        a subclass's custom optimizer), its hyper-parameters and its state. The result is
        ``flatpeft.create_optimizer(model, flatpeft_method, base_optimizer=<that optimizer instance>,
        **self.flatpeft_optimizer_kwargs())``. Keys of ``flatpeft_kwargs`` that are not method keywords (``lr``,
        ``betas``, ``weight_decay``, ...) are set on every parameter group of the host's optimizer (each must be a
        key of its groups). A flatpeft optimizer given through ``optimizers=`` is used as built.
        """
        opt_model = self.model if model is None else model
        # transformers 4.x: create_optimizer(self); 5.x: create_optimizer(self, model=None)
        host = super().create_optimizer() if model is None else super().create_optimizer(model)
        if _flatpeft_inside(host) is None:
            base = _plain_base(host)
            _set_group_keys(base, {k: v for k, v in self.flatpeft_kwargs.items()
                                   if k not in flatpeft.get_method(self.flatpeft_method).all_defaults()})
            method_kwargs = self.flatpeft_optimizer_kwargs(opt_model)
            with warnings.catch_warnings():
                if "total_steps" not in method_kwargs:  # built before train(): on_train_begin sets it
                    warnings.filterwarnings("ignore", message=".*needs total_steps")
                self.optimizer = flatpeft.create_optimizer(opt_model, self.flatpeft_method, base_optimizer=base,
                                                           **method_kwargs)
            self._fp_wrapped = True
        self.flatpeft_optimizer = unwrap_optimizer(self.optimizer)
        self.flatpeft_optimizer.driver = "SharpnessAwareMixin"
        return self.optimizer

    # ------------------------------------------------------------------ metric store of the subclass
    def flatpeft_metric_snapshot(self) -> dict[str, Any]:
        """Deep copies of the attributes in :attr:`flatpeft_metric_attributes` that this trainer has."""
        missing = object()
        snap = {}
        for name in self.flatpeft_metric_attributes:
            value = getattr(self, name, missing)
            if value is not missing:
                snap[name] = copy.deepcopy(value)
        return snap

    def flatpeft_metric_restore(self, snapshot: dict[str, Any]) -> None:
        """Put back the attributes taken by :meth:`flatpeft_metric_snapshot` (drops what pass 2 recorded)."""
        for name, value in snapshot.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ the step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Cache the micro-batch; on the window's last one run the method's passes over all of them.

        Leaves the update gradient (pass 2, or the single pass) in ``.grad`` and the weights perturbed; the
        Trainer's ``optimizer.step()`` restores them and applies the base update. Returns the loss to add to the
        Trainer's running training loss (0 for all but the last micro-batch of the window).
        """
        opt = self.flatpeft_optimizer
        if opt is None:
            raise RuntimeError("training_step() before create_optimizer(): call trainer.train()")
        if self._fp_cache_step != self.state.global_step:
            # A window interrupted before its sync micro-batch (e.g. a callback stopped training) is discarded.
            self._fp_cache, self._fp_cache_step = [], self.state.global_step
        self._fp_cache.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._fp_cache = self._fp_cache, []
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None
        scaler = getattr(self.accelerator, "scaler", None)
        losses: list[torch.Tensor] = []
        metric_store: dict[str, Any] | None = None
        passes = opt.gradient_passes(scaler=scaler)  # leaves the weights perturbed for optimizer.step()
        try:
            for index in passes:
                last = index == opt.passes - 1
                if index > 0:
                    # what the Trainer subclass records in compute_loss during pass 2 is dropped (see the class doc)
                    metric_store = self.flatpeft_metric_snapshot()
                # DDP: the update gradient is all-reduced on the last micro-batch of the last pass; the ascent
                # gradient (pass 1 of a two-pass method) only with sync_ascent_grad
                # FSDP2: the sharded weights take one perturbation, from the reduced gradient of every pass
                sync = last or self.sync_ascent_grad or self.is_fsdp_enabled
                losses.append(self._accumulate(model, batches, num_items_in_batch, sync_last=sync))
        except BaseException:
            passes.close()  # restores the weights (and the random state) before the error propagates
            raise
        finally:
            if metric_store is not None:
                self.flatpeft_metric_restore(metric_store)
        opt.metrics["loss"] = losses[0]
        if len(losses) > 1:
            opt.metrics["loss_perturbed"] = losses[1]
        return losses[0]

    def _accumulate(self, model: nn.Module, batches: list[dict[str, Any]], num_items_in_batch, *, sync_last: bool) -> torch.Tensor:
        """Forward + backward over ``batches`` with the Trainer's own step; DDP syncs only on the last if ``sync_last``."""
        total = torch.zeros((), device=self.args.device)
        for i, inputs in enumerate(batches):
            sync = sync_last and i == len(batches) - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
            with ctx:
                total = total + super().training_step(model, dict(inputs), num_items_in_batch).to(total.device)
        return total

    # ------------------------------------------------------------------ logging
    def _accumulate_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Running sums of this step's diagnostics on the device (no host sync until a log)."""
        self._fp_metrics.add(metrics)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``flatpeft/perturbation_norm`` and ``flatpeft/loss_gap`` (means since the last log) to training logs."""
        if "loss" in logs:
            reduce = self.accelerator.reduce if self.accelerator.num_processes > 1 else None
            logs.update(self._fp_metrics.pop_means(self.args.device, reduce))
        super().log(logs, *args, **kwargs)


class SharpnessAwareCallback(TrainerCallback):
    """Run a *single-pass* flatpeft method from a ``TrainerCallback`` alone, for hosts that accept callbacks but
    not a Trainer subclass.

    A single-pass method (``eflat-lora``, ``flat-lora-random``, ``flatpo-lagged``, ``base``, ``spider``, ``nbar``,
    ``obar``: every method whose ``flatpeft.get_method(name).passes`` is 1) perturbs the weights before the
    step's forward pass and takes its update gradient there, so the Trainer's own step does the rest::

        opt = flatpeft.create_optimizer(model, "eflat-lora", base_optimizer=torch.optim.AdamW(...), total_steps=...)
        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                          callbacks=[SharpnessAwareCallback(opt)])

    ``on_step_begin`` perturbs (``opt.first_step()``); the Trainer accumulates the micro-batches' gradients at the
    perturbed weights, clips them and calls ``optimizer.step()``, which restores the weights exactly and runs the
    base update; ``on_optimizer_step`` restores them again (a no-op, unless an fp16 scaler skipped the step) and
    collects ``flatpeft/perturbation_norm``, added to the training logs of later callbacks and
    ``state.log_history``. Two-pass methods (sam, asam, flat-lora, flatpo) need the second pass inside the
    training step: use :class:`SharpnessAwareMixin`.

    Args:
        optimizer: the flatpeft optimizer (or a wrapper of it). None: the Trainer's optimizer, as the callback
            receives it at ``on_train_begin`` (transformers 4.x passes it to callbacks; 5.x only an optimizer given
            through ``optimizers=``), which must be a flatpeft optimizer.

    If the optimizer was built without ``total_steps``, it is set to the Trainer's ``state.max_steps`` at
    ``on_train_begin``.
    """

    def __init__(self, optimizer: Any = None) -> None:
        self.optimizer = None if optimizer is None else _single_pass(unwrap_optimizer(optimizer))
        self._metrics = _MetricSums()
        self._steps_before = 0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.optimizer is None:
            if optimizer is None:
                raise ValueError(
                    "SharpnessAwareCallback() got no optimizer and the Trainer passed none to its callbacks: build the "
                    "flatpeft optimizer, pass it as optimizers=(opt, None) and as SharpnessAwareCallback(opt)"
                )
            self.optimizer = _single_pass(unwrap_optimizer(optimizer))
        elif optimizer is not None and _flatpeft_inside(optimizer) is not self.optimizer:
            raise ValueError(
                "SharpnessAwareCallback(opt): the Trainer steps another optimizer; pass the same flatpeft optimizer as "
                "optimizers=(opt, None)"
            )
        self.optimizer.driver = "SharpnessAwareCallback"
        if self.optimizer.total_steps is None and state.max_steps > 0:
            self.optimizer.total_steps = int(state.max_steps)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        """Perturb before the first forward pass of the optimizer step (stale gradients are dropped)."""
        self._steps_before = self.optimizer.step_count
        _single_pass(self.optimizer).first_step()
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer.restore()  # idempotent; puts the weights back when an fp16 GradScaler skipped the step
        if not args.fp16 and self.optimizer.step_count == self._steps_before:
            raise RuntimeError(
                "SharpnessAwareCallback(opt): the Trainer stepped another optimizer than opt (the weights were put "
                "back); pass the same flatpeft optimizer as optimizers=(opt, None)"
            )
        self._metrics.add(self.optimizer.metrics)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the means since the last log to ``logs`` (seen by callbacks after this one) and to the log history."""
        if logs is None or "loss" not in logs:
            return control
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        reduce = _dist_mean if dist and torch.distributed.get_world_size() > 1 else None
        extra = self._metrics.pop_means(args.device, reduce)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(extra)
        return control


class SharpnessAwareTrainer(SharpnessAwareMixin, Trainer):
    """A ``transformers.Trainer`` whose optimizer is a flatpeft sharpness-aware method.

    ``SharpnessAwareMixin`` + ``transformers.Trainer``; see :class:`SharpnessAwareMixin` for the arguments
    (``flatpeft_method``, ``flatpeft_kwargs``, ``sync_ascent_grad``) and for combining the step with other
    Trainer subclasses such as trl's ``SFTTrainer``.
    """
