"""Adapters: discovery of PEFT structure (LoRA factors, scales, frozen base weights) in peft models."""
from flatpeft.adapters.lora import LoRAFactors, find_lora_layers, require_lora_layers

__all__ = ["LoRAFactors", "find_lora_layers", "require_lora_layers"]
