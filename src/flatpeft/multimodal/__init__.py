"""Multimodal PEFT on real pretrained parts (``docs/multimodal.md``).

* :class:`DualEncoder` (CLIP-style: EfficientNet-Lite0 + MiniLM + projections) and task ``clip_fewshot``;
* :class:`SmallVLM` (LLaVA-style: EfficientNet-Lite0 features -> projector -> soft visual tokens in front of
  SmolLM2-135M-Instruct) and task ``vlm_instruct``;
* task ``hf_vlm``: any Hugging Face image-text-to-text model (LLaVA, Qwen2-VL, Qwen2.5-VL, ...) on VQA JSONL.

Importing this package registers the three tasks. :func:`prepare_multimodal` builds the cached
pre-alignment checkpoints (``flatpeft data prepare`` may call it).
"""
from __future__ import annotations

from flatpeft._extras import require

require("multimodal", "transformers", "peft", "safetensors", "numpy", "pandas", "yaml", "tqdm", "PIL",
        part="flatpeft.multimodal")

from .clip_fewshot import ClipFewShotArgs, ClipFewShotTask
from .data import CLASS_NAMES, DOWNSTREAM_CLASSES, SEEN_CLASSES, normalise_answer
from .dual_encoder import ClipPrealignSettings, DualEncoder, build_dual_encoder, pretrained_dual_encoder
from .hf_vlm import HFVLMArgs, HFVLMTask, read_vqa_jsonl
from .small_vlm import SmallVLM, chat_parts
from .vlm_instruct import VLMInstructArgs, VLMInstructTask, VLMPrealignSettings, build_small_vlm, pretrained_small_vlm

__all__ = ["DualEncoder", "ClipPrealignSettings", "build_dual_encoder", "pretrained_dual_encoder",
           "ClipFewShotArgs", "ClipFewShotTask", "SmallVLM", "chat_parts", "VLMPrealignSettings",
           "build_small_vlm", "pretrained_small_vlm", "VLMInstructArgs", "VLMInstructTask", "HFVLMArgs",
           "HFVLMTask", "read_vqa_jsonl", "CLASS_NAMES", "SEEN_CLASSES", "DOWNSTREAM_CLASSES",
           "normalise_answer", "prepare_multimodal"]


def prepare_multimodal(*, force: bool = False) -> dict[str, str]:
    """Build (or find) the cached pre-alignment checkpoints of the default ``clip_fewshot`` and
    ``vlm_instruct`` settings; returns their paths. Idempotent (cached under ``<cache>/multimodal``)."""
    from .dual_encoder import clip_prealign_path
    from .vlm_instruct import vlm_prealign_path

    clip, vlm = ClipPrealignSettings(), VLMPrealignSettings()
    pretrained_dual_encoder(clip, force=force)
    pretrained_small_vlm(vlm, force=force)
    return {"clip_prealign": str(clip_prealign_path(clip)), "vlm_prealign": str(vlm_prealign_path(vlm))}
