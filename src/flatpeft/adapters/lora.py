"""Find the LoRA factors of a peft model: ``W = W0 + s * B @ A`` for every active adapter.

The scale ``s`` is always read from the module (``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` for rsLoRA),
never hard-coded: the only public Flat-LoRA (Deng et al.) code hard-codes ``s = 0.5`` and so realises a
W-space radius about 4x rho (shared/spec/algorithms.md section 4, bug 1).

Linear and Conv LoRA layers are covered: a conv factor is viewed as a matrix (``A``: r x (in*kh*kw),
``B``: out x r), for which ``Delta W = s * B @ A`` holds exactly. LoRA on embeddings and DoRA are not covered
by the LoRA-space methods (their effective-weight algebra differs); they are reported by
:func:`find_lora_layers` in ``skipped`` so callers can say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LoRAFactors", "find_lora_layers", "require_lora_layers"]


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
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float
    base_weight: torch.Tensor
    fan_in_fan_out: bool = False

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


def find_lora_layers(model: nn.Module) -> tuple[list[LoRAFactors], list[str]]:
    """Return the trainable LoRA factors of ``model`` and the names of LoRA-like layers it skipped.

    A factor pair is returned for every active adapter of every peft ``LoraLayer`` whose ``A`` and ``B``
    both require gradients. Embedding LoRA and DoRA adapters are skipped (listed in the second value).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return [], []
    found: list[LoRAFactors] = []
    skipped: list[str] = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
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
                )
            )
    return found, skipped


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
