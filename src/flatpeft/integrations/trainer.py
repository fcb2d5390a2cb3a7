"""``SharpnessAwareTrainer``: run any flatpeft method inside a Hugging Face ``transformers.Trainer``.

The Trainer calls ``training_step`` once per micro-batch and ``optimizer.step()`` (never with a closure) once
per accumulation window, after clipping the gradients. A two-pass method needs, per optimizer step
(``shared/spec/algorithms.md`` section 1, "Gradient accumulation"):

1. the *full* accumulated gradient at ``w`` over all micro-batches of the step (pass 1),
2. the perturbation ``e`` computed from it (``first_step``),
3. the gradient at ``w + e`` re-accumulated over *all* micro-batches (pass 2),
4. restore ``w`` and the base update with the (clipped) pass-2 gradient (``second_step``).

So this Trainer *caches* the micro-batches of the window (the Trainer has already prefetched them, so this
costs no memory) and does all the work on the window's last micro-batch, which the Trainer marks with
``accelerator.sync_gradients``::

    micro-batch 1 .. n-1:  cache the inputs, return 0
    micro-batch n:         two-pass:    snapshot RNG S0; pass 1 over all n (no DDP sync); snapshot S1;
                                        fp16: grads /= scaler scale; opt.first_step()  (perturb, zero grads);
                                        restore S0; pass 2 over all n (DDP sync on the last); restore S1
                           single-pass: opt.first_step() (perturb); one pass over all n
                           return the summed (already 1/n-scaled) loss of pass 1  (pass 2 for single-pass)
    Trainer:               clip (pass-2 gradient only), optimizer.step() -> SharpnessAware.step() without a
                           closure = second_step(): restore w exactly, base optimizer step

Each pass uses the Trainer's own ``training_step`` (autocast, loss scaling by the number of micro-batches or
``num_items_in_batch``, ``accelerator.backward`` with the fp16 GradScaler), so the losses and gradients are the
ones a plain Trainer would compute at the same weights.

Design decisions (where the spec leaves room):

* Pass 1 runs under ``accelerator.no_sync(model)`` (per-replica ascent direction, Foret et al.'s m-sharpness)
  unless ``sync_ascent_grad=True``; the pass-2 gradient is all-reduced once, on its last micro-batch.
* fp16: pass-1 gradients are scaled by the GradScaler; they are divided by the scaler's scale tensor (no host sync; not
  ``unscale_``, which may run only once per ``update()`` and is left to the Trainer's clipping) before
  ``first_step``; the engine skips a non-finite perturbation. If the scaler then skips the step (inf in pass 2),
  a callback restores the weights right after ``optimizer.step()``, before any evaluation or checkpoint.
* RNG: pass 2 replays pass 1's random state (same dropout masks per micro-batch) and the generators end where
  one pass would have left them, so a two-pass method consumes the random stream of plain training.
* The returned training loss is the loss at the unperturbed weights (pass 1), as plain training would log;
  ``flatpeft/loss_gap`` = L(w + e) - L(w) and ``flatpeft/perturbation_norm`` are averaged over the optimizer
  steps since the last log (and over DDP ranks) and added to the Trainer's training logs (so ``report_to`` picks
  them up); they are read from the device only at logging steps.
* DeepSpeed and FSDP are refused with ``NotImplementedError`` (their ``backward`` steps the optimizer or shards
  the gradients; see ``shared/spec/integration.md`` 1.4 and pitfalls 8-9).

Example::

    from flatpeft.integrations import SharpnessAwareTrainer
    trainer = SharpnessAwareTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                    flatpeft_method="flatpo", flatpeft_kwargs={"rho": 0.05, "fraction": 0.05})
    trainer.train()
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from flatpeft.optim.rng import RNGState

__all__ = ["SharpnessAwareTrainer", "base_optimizer_from_args"]



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
                f"args.optim={args.optim!r} builds its own parameter set ({special!r}); SharpnessAwareTrainer needs a "
                "plain torch optimizer class such as adamw_torch, adamw_torch_fused, sgd or adafactor"
            )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"args.optim={args.optim!r} is not a torch.optim.Optimizer class ({cls!r})")
    return cls, kwargs


class _RestoreIfStepSkipped(TrainerCallback):
    """Put the weights back when the optimizer step did not run (fp16 GradScaler found inf/NaN gradients).

    ``GradScaler.step`` skips ``optimizer.step()`` entirely on overflow, so ``second_step`` (which restores the
    weights) never ran; this runs right after, before the Trainer may evaluate or save a checkpoint.
    """

    def __init__(self, trainer: "SharpnessAwareTrainer") -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        opt = self.trainer.flatpeft_optimizer
        if opt is not None and self.trainer.accelerator.optimizer_step_was_skipped:
            opt.restore()
        return control


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer is a flatpeft sharpness-aware method.

    Args:
        flatpeft_method: one of ``flatpeft.METHODS`` (``"sam"``, ``"flatpo"``, ``"eflat-lora"``, ...).
        flatpeft_kwargs: method keywords for ``flatpeft.create_optimizer`` (``rho``, ``fraction``, ...). The base
            optimizer (class from ``args.optim``), ``lr=args.learning_rate`` and ``weight_decay=args.weight_decay``
            come from the ``TrainingArguments``; keys given here win.
        sync_ascent_grad: all-reduce the pass-1 gradient across DDP ranks (one global perturbation) instead of
            perturbing each replica with its local gradient (default, as in Foret et al.).
        *args, **kwargs: passed to ``transformers.Trainer``. ``optimizers=(opt, sched)`` is accepted only with a
            flatpeft ``SharpnessAware`` optimizer (then ``flatpeft_method`` may be omitted).
    """

    def __init__(
        self,
        *args: Any,
        flatpeft_method: str | None = None,
        flatpeft_kwargs: dict[str, Any] | None = None,
        sync_ascent_grad: bool = False,
        **kwargs: Any,
    ) -> None:
        import flatpeft

        given = kwargs.get("optimizers", (None, None))
        given_opt = given[0] if given else None
        if given_opt is not None and not isinstance(given_opt, flatpeft.SharpnessAware):
            raise ValueError(
                "optimizers[0] must be a flatpeft SharpnessAware optimizer (or None, to build one from "
                f"flatpeft_method), got {type(given_opt).__name__}"
            )
        if given_opt is None:
            if flatpeft_method is None:
                raise ValueError(f"flatpeft_method is required; one of {list(flatpeft.METHODS)}")
            if flatpeft_method not in flatpeft.METHODS:
                raise ValueError(f"flatpeft_method={flatpeft_method!r} is unknown; known: {list(flatpeft.METHODS)}")
        if flatpeft_kwargs is not None and not isinstance(flatpeft_kwargs, dict):
            raise ValueError(f"flatpeft_kwargs must be a dict, got {type(flatpeft_kwargs).__name__}")
        self.flatpeft_method = flatpeft_method if given_opt is None else given_opt.method
        self.flatpeft_kwargs = dict(flatpeft_kwargs or {})
        self.sync_ascent_grad = bool(sync_ascent_grad)
        self.flatpeft_optimizer = given_opt
        self._fp_cache: list[dict[str, Any]] = []
        self._fp_cache_step: int | None = None
        self._fp_sums: dict[str, torch.Tensor] = {}
        self._fp_count = 0
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "SharpnessAwareTrainer does not support DeepSpeed or FSDP yet: DeepSpeed's backward steps the "
                "optimizer at the accumulation boundary and shards gradients, FSDP shards parameters, so the extra "
                "pass and the global perturbation norm need collectives that are not implemented. Use DDP."
            )
        self.add_callback(_RestoreIfStepSkipped(self))

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the flatpeft optimizer: ``flatpeft.create_optimizer(model, method, base_optimizer=<args.optim class>, ...)``.

        Base keywords come from the ``TrainingArguments`` (``lr``, ``betas``, ``eps``, ``fused`` for the chosen
        ``optim``, and ``weight_decay``); ``flatpeft_kwargs`` override them. A non-constant ``rho_schedule``
        without ``total_steps`` runs over the Trainer's number of optimizer steps. Note: all trainable tensors get
        ``weight_decay`` (the plain Trainer exempts biases and LayerNorm weights; with LoRA these are frozen).
        """
        import flatpeft

        if self.optimizer is None:
            opt_model = self.model if model is None else model
            base_cls, base_kwargs = base_optimizer_from_args(self.args, opt_model)
            kwargs: dict[str, Any] = {**base_kwargs, "weight_decay": self.args.weight_decay}
            kwargs.update(self.flatpeft_kwargs)
            kwargs.setdefault("lr", self.args.learning_rate)
            total = getattr(self.state, "max_steps", 0)  # set by the Trainer before it builds the optimizer
            if kwargs.get("rho_schedule", "constant") != "constant" and kwargs.get("total_steps") is None and total:
                kwargs["total_steps"] = total
            self.optimizer = flatpeft.create_optimizer(opt_model, self.flatpeft_method, base_optimizer=base_cls, **kwargs)
        self.flatpeft_optimizer = self.optimizer
        return self.optimizer

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
        self._zero_trainable_grads(opt)
        if opt.passes == 2:
            loss = self._two_pass(model, batches, num_items_in_batch)
        else:
            opt.first_step()
            try:
                loss = self._accumulate(model, batches, num_items_in_batch, sync_last=True)
            except BaseException:
                opt.restore()
                raise
            opt.metrics["loss_perturbed"] = loss
        self._accumulate_metrics(opt.metrics)
        return loss

    def _two_pass(self, model: nn.Module, batches: list[dict[str, Any]], num_items_in_batch) -> torch.Tensor:
        """Pass 1 over all micro-batches, ``first_step``, pass 2 over all of them at ``w + e`` (same RNG)."""
        opt = self.flatpeft_optimizer
        replay = bool(getattr(opt, "replay_rng", True))
        start = RNGState.capture() if replay else None
        loss = self._accumulate(model, batches, num_items_in_batch, sync_last=self.sync_ascent_grad)
        after_pass1 = RNGState.capture() if replay else None
        self._unscale_pass1_grads(opt)
        opt.first_step()  # perturbs, and zeroes the pass-1 gradients
        try:
            if start is not None:
                start.restore()
            loss_perturbed = self._accumulate(model, batches, num_items_in_batch, sync_last=True)
        except BaseException:
            opt.restore()
            raise
        finally:
            if after_pass1 is not None:
                after_pass1.restore()
        opt.metrics["loss"] = loss
        opt.metrics["loss_perturbed"] = loss_perturbed
        return loss

    def _accumulate(self, model: nn.Module, batches: list[dict[str, Any]], num_items_in_batch, *, sync_last: bool) -> torch.Tensor:
        """Forward + backward over ``batches`` with the Trainer's own step; DDP syncs only on the last if ``sync_last``."""
        total = torch.zeros((), device=self.args.device)
        for i, inputs in enumerate(batches):
            sync = sync_last and i == len(batches) - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
            with ctx:
                total = total + super().training_step(model, dict(inputs), num_items_in_batch).to(total.device)
        return total

    def _zero_trainable_grads(self, opt) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None

    def _unscale_pass1_grads(self, opt) -> None:
        """fp16: divide the GradScaler-scaled pass-1 gradients by the scale (not ``unscale_``: pitfall 2)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        # The scale as a device tensor (no host sync); ``get_scale()`` would call ``.item()`` every step.
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
        if scale is None:
            torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
            return
        inv = scale.double().reciprocal()
        for dtype_group in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype_group]
            if dtype_group in (torch.float32, torch.float64):
                torch._foreach_mul_(same, inv.to(device=same[0].device, dtype=dtype_group))
            else:  # half-precision gradients (GradScaler itself refuses them): 1/scale may underflow there
                torch._foreach_mul_(same, 1.0 / scaler.get_scale())

    # ------------------------------------------------------------------ logging
    def _accumulate_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        """Running sums of this step's diagnostics on the device (no host sync until a log)."""
        values: dict[str, torch.Tensor] = {}
        if "perturbation_norm" in metrics:
            values["perturbation_norm"] = metrics["perturbation_norm"]
        if "loss" in metrics and "loss_perturbed" in metrics:
            values["loss_gap"] = metrics["loss_perturbed"] - metrics["loss"]
        for key, value in values.items():
            value = value.detach().float()
            self._fp_sums[key] = self._fp_sums[key] + value if key in self._fp_sums else value
        self._fp_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``flatpeft/perturbation_norm`` and ``flatpeft/loss_gap`` (means since the last log) to training logs."""
        if "loss" in logs and self._fp_count and self._fp_sums:
            keys = sorted(self._fp_sums)
            means = torch.stack([self._fp_sums[k] for k in keys]) / self._fp_count
            if self.accelerator.num_processes > 1:
                # every rank logs at the same steps (the Trainer gathers its loss there too): average over ranks
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            for key, value in zip(keys, means.tolist()):
                logs[f"flatpeft/{key}"] = round(value, 8)
            self._fp_sums, self._fp_count = {}, 0
        super().log(logs, start_time)
