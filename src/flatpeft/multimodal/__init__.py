"""Multimodal PEFT on real pretrained parts (``docs/multimodal.md``).

* :class:`DualEncoder` (CLIP-style: EfficientNet-Lite0 + MiniLM + projections) and task ``clip_fewshot``;
* :class:`SmallVLM` (LLaVA-style: EfficientNet-Lite0 features -> projector -> soft visual tokens in front of
  SmolLM2-135M-Instruct) and task ``vlm_instruct``;
* task ``hf_vlm``: any Hugging Face image-text-to-text model (LLaVA, Qwen2-VL, Qwen2.5-VL, ...) on VQA JSONL.

Importing this package registers the three tasks. :func:`prepare_multimodal` builds the cached
pre-alignment checkpoints (``flatpeft data prepare`` calls it).
"""
from __future__ import annotations

from .clip_fewshot import ClipFewShotArgs, ClipFewShotTask
from .data import CLASS_NAMES, DOWNSTREAM_CLASSES, SEEN_CLASSES, normalise_answer
from .dual_encoder import ClipPrealignSettings, DualEncoder, build_dual_encoder, pretrained_dual_encoder

__all__ = ["DualEncoder", "ClipPrealignSettings", "build_dual_encoder", "pretrained_dual_encoder",
           "ClipFewShotArgs", "ClipFewShotTask", "CLASS_NAMES", "SEEN_CLASSES", "DOWNSTREAM_CLASSES",
           "normalise_answer"]
