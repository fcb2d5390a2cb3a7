"""Find the LoRA factors of a peft model: ``W = W0 + s * B @ A`` for every active adapter.

The scale ``s`` is always read from the module (``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` for rsLoRA),
never hard-coded: the only public Flat-LoRA (Deng et al.) code hard-codes ``s = 0.5`` and so realises a
W-space radius about 4x rho (docs/algorithms.md, "Flat-LoRA").

Hand-written LoRA: the contract
-------------------------------
Besides peft's ``LoraLayer``, a module of your own is a LoRA layer (its factors found by the five LoRA methods,
its ``A`` and ``B`` ranked by FlatPO and left unmasked by SPIDER) when it has

* ``lora_A`` (``r x in``) and ``lora_B`` (``out x r``): ``nn.Parameter`` objects or ``nn.Linear`` modules of those
  shapes, both trainable;
* ``scaling``: a Python number ``s``;
* the frozen 2-D base weight ``W0`` (``out x in``) either as its own ``weight`` or as the ``weight`` of a child
  module named ``base_layer`` (peft's name), ``base`` or ``linear`` (litgpt's ``LoRALinear``), looked up in
  that order;

and computes ``base(x) + s * x A^T B^T``. Any other layout (other names, a ``scaling`` tensor, a 3-D weight) is
not a LoRA layer here: the LoRA-only methods refuse the model and FlatPO ranks its tensors as plain weights.

Linear and Conv LoRA layers are covered: a conv factor is viewed as a matrix (``A``: r x (in*kh*kw),
``B``: out x r), for which ``Delta W = s * B @ A`` holds exactly. LoRA on embeddings and DoRA are not covered
by the LoRA-space methods (their effective-weight algebra differs); they are reported by
:func:`find_lora_layers` in ``skipped`` so callers can say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LoRAFactors", "find_lora_layers", "require_lora_layers", "adapter_parameters"]


@dataclass(frozen=True, eq=False)
class LoRAFactors:
    """One active LoRA adapter of one layer.

    Attributes:
        name: qualified module name plus adapter name (``"...query[default]"``).
        A: the ``lora_A`` weight, shape ``(r, in)`` (conv: ``(r, in, kh, kw)``).
        B: the ``lora_B`` weight, shape ``(out, r)`` (conv: ``(out, r, 1, 1)``).
        scale: ``s`` in ``W = W0 + s B A``.
        base_weight: the frozen ``W0`` (``(out, in)``; ``(in, out)`` storage when ``fan_in_fan_out``).
        fan_in_fan_out: ``W0`` is stored transposed (GPT-2 ``Conv1D``).
        module: the LoRA module itself (its input is the base layer's input), or None.
        base_layer: the frozen base layer (``nn.Linear``, ``nn.Conv*``, ``Conv1D``), or None.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float
    base_weight: torch.Tensor
    fan_in_fan_out: bool = False
    module: nn.Module | None = None
    base_layer: nn.Module | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def a_matrix(self) -> torch.Tensor:
        """``A`` as an ``r x m`` matrix view."""
        return self.A.reshape(self.A.shape[0], -1)

    def b_matrix(self) -> torch.Tensor:
        """``B`` as an ``n x r`` matrix view."""
        return self.B.reshape(self.B.shape[0], -1)

    def w0_matrix(self) -> torch.Tensor:
        """``W0`` as an ``n x m`` matrix view (``out x in``), transposing ``fan_in_fan_out`` storage."""
        w = self.base_weight.reshape(self.base_weight.shape[0], -1)
        return w.t() if self.fan_in_fan_out else w


def _as_param(obj) -> torch.Tensor | None:
    if isinstance(obj, nn.Parameter):
        return obj
    if isinstance(obj, nn.Linear):
        return obj.weight
    return None


#: names of the child module holding a hand-written LoRA layer's frozen weight, in lookup order (module docstring)
BASE_LAYER_NAMES: tuple[str, ...] = ("base_layer", "base", "linear")


def _frozen_base(module: nn.Module) -> nn.Module | None:
    """The child module of ``module`` that holds ``W0``: the first of :data:`BASE_LAYER_NAMES` that has a weight."""
    for attr in BASE_LAYER_NAMES:
        child = getattr(module, attr, None)
        if isinstance(child, nn.Module) and isinstance(getattr(child, "weight", None), torch.Tensor):
            return child
    return None


def _hand_written(mod_name: str, module: nn.Module) -> LoRAFactors | None:
    """A non-peft module with ``lora_A``/``lora_B``/``scaling`` and a frozen base weight (see module docstring)."""
    a, b = _as_param(getattr(module, "lora_A", None)), _as_param(getattr(module, "lora_B", None))
    scale = getattr(module, "scaling", None)
    if a is None or b is None or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None
    base = _frozen_base(module)
    weight = getattr(base if base is not None else module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        return None
    if not (a.requires_grad and b.requires_grad):
        return None
    return LoRAFactors(name=mod_name, A=a, B=b, scale=float(scale), base_weight=weight, module=module,
                       base_layer=base)


def find_lora_layers(model: nn.Module) -> tuple[list[LoRAFactors], list[str]]:
    """Return the trainable LoRA factors of ``model`` and the names of LoRA-like layers it skipped.

    A factor pair is returned for every active adapter of every peft ``LoraLayer`` whose ``A`` and ``B``
    both require gradients, and for every hand-written LoRA module (module docstring). Embedding LoRA and
    DoRA adapters are skipped (listed in the second value). Works without peft installed.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        LoraLayer = None
    found: list[LoRAFactors] = []
    skipped: list[str] = []
    for mod_name, module in model.named_modules():
        if LoraLayer is None or not isinstance(module, LoraLayer):
            own = _hand_written(mod_name, module)
            if own is not None:
                found.append(own)
            continue
        for adapter in module.active_adapters:
            label = f"{mod_name}[{adapter}]"
            if adapter in getattr(module, "lora_embedding_A", {}):
                skipped.append(label + " (embedding LoRA)")
                continue
            if adapter not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(adapter, False):
                skipped.append(label + " (DoRA)")
                continue
            a = module.lora_A[adapter].weight
            b = module.lora_B[adapter].weight
            if not (a.requires_grad and b.requires_grad):
                continue
            found.append(
                LoRAFactors(
                    name=label,
                    A=a,
                    B=b,
                    scale=float(module.scaling[adapter]),
                    base_weight=module.get_base_layer().weight,
                    fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                    module=module,
                    base_layer=module.get_base_layer(),
                )
            )
    return found, skipped


def adapter_parameters(model: nn.Module) -> set[int]:
    """``id`` of every PEFT adapter tensor of ``model``: what FlatPO ranks and what SPIDER leaves unmasked.

    Adapter tensors are the parameters a PEFT method adds: every tensor held under a peft tuner layer's
    ``adapter_layer_names`` (LoRA ``A``/``B``, DoRA magnitudes, LoHa/LoKr/OFT/BOFT/VeRA/IA3 factors, ...), the
    prompt encoder of prompt, prefix and p-tuning models, and ``lora_A``/``lora_B`` of hand-written LoRA
    modules. Not adapter tensors: ``modules_to_save`` copies (e.g. a classifier head), biases, norms, or any
    other trainable tensor of the backbone.
    """
    ids: set[int] = set()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        BaseTunerLayer = None
    for mod_name, module in model.named_modules():
        if BaseTunerLayer is not None and isinstance(module, BaseTunerLayer):
            for attr in getattr(module, "adapter_layer_names", ()):
                sub = getattr(module, attr, None)
                if isinstance(sub, nn.Module):
                    ids.update(id(p) for p in sub.parameters())
                elif isinstance(sub, nn.Parameter):
                    ids.add(id(sub))
        elif mod_name.split(".")[-1] == "prompt_encoder":
            ids.update(id(p) for p in module.parameters())
        else:
            own = _hand_written(mod_name, module)
            if own is not None:
                ids.update((id(own.A), id(own.B)))
    return ids


def require_lora_layers(model: nn.Module, method: str) -> list[LoRAFactors]:
    """Like :func:`find_lora_layers` but raise ``ValueError`` when there is no trainable LoRA layer."""
    layers, skipped = find_lora_layers(model)
    if not layers:
        extra = f" (skipped: {', '.join(skipped[:5])})" if skipped else ""
        raise ValueError(
            f"method={method!r} needs trainable LoRA layers (peft LoraConfig on Linear or Conv modules), "
            f"but the model has none{extra}. Use 'sam', 'asam', 'flatpo', 'spider' or 'base' for prefix, "
            "prompt or full fine-tuning."
        )
    return layers
