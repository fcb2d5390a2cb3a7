"""``clip_fewshot``: few-shot CLIP-LoRA fine-tuning of the pre-aligned dual encoder on new classes.

Protocol (CLIP-LoRA style, ``docs/multimodal.md``):

1. Start from the pre-aligned :class:`~flatpeft.multimodal.dual_encoder.DualEncoder` (cached, see
   :func:`~flatpeft.multimodal.dual_encoder.pretrained_dual_encoder`).
2. Draw ``data.shots`` training images per downstream class (sandal, shirt, sneaker, bag, ankle boot) with
   the run seed; LoRA (``peft``) on both towers: the text tower's ``peft.target_modules`` and the image
   tower's pointwise convolutions; the projections stay frozen.
3. Loss: cross-entropy of the scaled cosine scores of each image against the five class embeddings
   (prompt-ensembled over :data:`~flatpeft.multimodal.data.TRAIN_TEMPLATES`, through the text LoRA).
4. Metrics (``evaluate``): ``accuracy`` on the downstream test images; ``unseen_prompt_accuracy`` on the
   same images with :data:`~flatpeft.multimodal.data.UNSEEN_TEMPLATES`; ``seen_classes_accuracy`` on the
   pre-alignment classes' test images (forgetting); ``zero_shot_accuracy`` and
   ``seen_classes_accuracy_before`` of the pre-aligned model (adapters disabled; cached per setting).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from flatpeft.experiments.rundir import write_atomic
from flatpeft.experiments.tasks import Task, check_module_names, register_task

from flatpeft.experiments.sampling import epoch_batches, eval_subset, sample_shots

from .data import (CLASS_NAMES, DOWNSTREAM_CLASSES, SEEN_CLASSES, TRAIN_TEMPLATES, UNSEEN_TEMPLATES,
                   load_fashion_mnist, to_pixels)
from .dual_encoder import (IMAGE_LORA_TARGETS, ClipPrealignSettings, clip_prealign_path, lora_target_regex,
                           pretrained_dual_encoder)

__all__ = ["ClipFewShotArgs", "ClipFewShotTask"]


@dataclass
class ClipFewShotArgs:
    """``task_args`` of ``clip_fewshot``."""

    image_size: int = field(default=64, metadata={"help": "Image side in pixels (Fashion-MNIST is upsampled from 28)."})
    embed_dim: int = field(default=384, metadata={"help": "Shared embedding dimension of the projections."})
    logit_scale: float = field(default=20.0, metadata={"help": "Fixed logit scale tau (1 / temperature)."})
    prealign_per_class: int = field(default=400, metadata={"help": "Pre-alignment images per seen class."})
    prealign_steps: int = field(default=300, metadata={"help": "Adam steps of the pre-alignment."})
    image_lora: bool = field(default=True, metadata={"help": "LoRA on the image tower's pointwise convolutions."})
    image_lora_first_block: int = field(default=0, metadata={"help": (
        "LoRA only on image blocks >= this index (EfficientNet-Lite0 has 16; backward then stops early).")})
    text_dropout: float = field(default=0.0, metadata={"help": "Text tower hidden/attention dropout (MiniLM default 0.1)."})
    eval_per_class: int | None = field(default=None, metadata={"help": (
        "Downstream test images per class (fixed subset, same for every run); null = all 1000 per class.")})
    seen_eval_per_class: int | None = field(default=None, metadata={"help": (
        "Seen-class test images per class for seen_classes_accuracy; null = all 1000 per class.")})
    eval_batch_size: int = field(default=128, metadata={"help": "Images per evaluation batch."})

    def __post_init__(self) -> None:
        for name in ("image_size", "embed_dim", "prealign_per_class", "prealign_steps", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"task_args.{name} must be a positive integer, got {v!r}")
        for name in ("eval_per_class", "seen_eval_per_class"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 1 <= v <= 1000):
                raise ValueError(f"task_args.{name} must be an integer in [1, 1000] or null, got {v!r}")
        if not isinstance(self.image_lora_first_block, int) or not 0 <= self.image_lora_first_block < 16:
            raise ValueError(f"task_args.image_lora_first_block must be in [0, 15], got {self.image_lora_first_block!r}")
        if not 0.0 <= float(self.text_dropout) < 1.0:
            raise ValueError(f"task_args.text_dropout must be in [0, 1), got {self.text_dropout!r}")
        if self.logit_scale <= 0:
            raise ValueError(f"task_args.logit_scale must be positive, got {self.logit_scale!r}")


#: in-process cache of the pre-aligned model's metrics: (settings key, eval spec) -> metrics
_BEFORE_CACHE: dict[str, dict[str, float]] = {}


@register_task("clip_fewshot")
class ClipFewShotTask(Task):
    """Few-shot LoRA fine-tuning of the pre-aligned EfficientNet-Lite0 + MiniLM dual encoder."""

    args_cls = ClipFewShotArgs

    @staticmethod
    def prealign_settings(cfg, a: ClipFewShotArgs) -> ClipPrealignSettings:
        """The pre-alignment of the dual encoder that ``cfg`` fine-tunes."""
        return ClipPrealignSettings(text_model=cfg.model, image_size=a.image_size, embed_dim=a.embed_dim,
                                    logit_scale=a.logit_scale, per_class=a.prealign_per_class,
                                    steps=a.prealign_steps)

    @classmethod
    def data_paths(cls, cfg) -> dict[str, Path]:
        """The cached pre-aligned projections (``prealign``: the starting weights of every run; built on first
        use): a cache made by other code or on another machine holds other weights, so their sha256 is recorded
        and compared like a data file's."""
        from flatpeft.experiments.config import parse_dataclass

        path = clip_prealign_path(cls.prealign_settings(cfg, parse_dataclass(cls.args_cls, cfg.task_args,
                                                                             "task_args.")))
        return {"prealign": path}

    def __init__(self, cfg, seed: int) -> None:
        super().__init__(cfg, seed)
        from peft import LoraConfig, get_peft_model

        a: ClipFewShotArgs = self.args
        if cfg.peft.type != "lora":
            raise ValueError(f"peft.type: clip_fewshot supports lora only, got {cfg.peft.type!r}")
        if cfg.data.shots is None:
            raise ValueError("data.shots: clip_fewshot needs a number of shots per class (e.g. 1, 4 or 16)")
        self.settings = self.prealign_settings(cfg, a)
        base = pretrained_dual_encoder(self.settings)
        if a.text_dropout:
            for mod in base.text_encoder.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = a.text_dropout
        for p in base.parameters():
            p.requires_grad_(False)
        targets = lora_target_regex(cfg.peft.target_modules, image=a.image_lora, first_block=a.image_lora_first_block)
        check_module_names(base, cfg.peft.modules_to_save or [], "peft.modules_to_save", cfg.model)
        lcfg = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                          target_modules=targets, modules_to_save=cfg.peft.modules_to_save)
        self.model = get_peft_model(base, lcfg).to(self.device)

        xtr, ytr, xte, yte = load_fashion_mnist()
        self.class_names = [CLASS_NAMES[c] for c in DOWNSTREAM_CLASSES]
        self.seen_names = [CLASS_NAMES[c] for c in SEEN_CLASSES]
        idx = sample_shots(ytr, cfg.data.shots, self.seed, classes=DOWNSTREAM_CLASSES)
        self.train_pixels = to_pixels(xtr[idx], a.image_size)
        self.train_labels = torch.as_tensor(np.searchsorted(DOWNSTREAM_CLASSES, ytr[idx]), dtype=torch.long)
        te = eval_subset(yte, DOWNSTREAM_CLASSES, a.eval_per_class)
        se = eval_subset(yte, SEEN_CLASSES, a.seen_eval_per_class)
        self.test_images, self.test_labels = xte[te], np.searchsorted(DOWNSTREAM_CLASSES, yte[te])
        self.seen_images, self.seen_labels = xte[se], np.searchsorted(SEEN_CLASSES, yte[se])

    # ---- training -------------------------------------------------------------------------------
    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless seed-fixed batches of the few-shot pool (``pixel_values``, ``labels``)."""
        for idx in epoch_batches(len(self.train_labels), self.cfg.train.batch_size, self.seed):
            yield {"pixel_values": self.train_pixels[idx], "labels": self.train_labels[idx]}

    def loss(self, model, batch) -> torch.Tensor:
        """Cross-entropy of ``tau * cos(image, class prompt)`` over the downstream classes."""
        logits = model(batch["pixel_values"].to(self.device), class_names=self.class_names,
                       templates=TRAIN_TEMPLATES)
        return F.cross_entropy(logits, batch["labels"].to(self.device))

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def _image_embeddings(self, model, images: np.ndarray) -> torch.Tensor:
        """Normalised image embeddings of uint8 images (batches of ``eval_batch_size``)."""
        bs = self.args.eval_batch_size
        return torch.cat([model.encode_image(to_pixels(images[i:i + bs], self.args.image_size).to(self.device))
                          for i in range(0, len(images), bs)])

    @torch.no_grad()
    def _accuracy(self, model, emb: torch.Tensor, labels: np.ndarray, names, templates) -> float:
        """Fraction of images whose highest-scoring class prompt is the true class."""
        pred = model.logits(emb, model.class_embeddings(names, templates)).argmax(1).cpu().numpy()
        return float((pred == labels).mean())

    def _before_metrics(self, model) -> dict[str, float]:
        """``zero_shot_accuracy`` and ``seen_classes_accuracy_before`` of the pre-aligned model (adapters
        disabled), cached in memory and in ``<cache>/multimodal`` per (pre-alignment, eval subset)."""
        from flatpeft import assets

        key = f"{self.settings.key()}_{self.args.eval_per_class}_{self.args.seen_eval_per_class}"
        if key in _BEFORE_CACHE:
            return _BEFORE_CACHE[key]
        path = Path(assets.cache_dir()) / "multimodal" / f"clip_before_{key}.json"
        if path.is_file():
            _BEFORE_CACHE[key] = json.loads(path.read_text())
            return _BEFORE_CACHE[key]
        with model.disable_adapter():
            out = {"zero_shot_accuracy": self._accuracy(model, self._image_embeddings(model, self.test_images),
                                                        self.test_labels, self.class_names, TRAIN_TEMPLATES),
                   "seen_classes_accuracy_before": self._accuracy(
                       model, self._image_embeddings(model, self.seen_images), self.seen_labels, self.seen_names,
                       TRAIN_TEMPLATES)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(out))  # another process may read the cache meanwhile
        _BEFORE_CACHE[key] = out
        return out

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        """``test``: accuracy, unseen_prompt_accuracy, seen_classes_accuracy (+ the pre-aligned model's
        zero_shot_accuracy, seen_classes_accuracy_before); ``train``: accuracy on the few-shot pool."""
        was_training = model.training
        model.eval()
        try:
            if split == "train":
                with torch.no_grad():
                    emb = model.encode_image(self.train_pixels.to(self.device))
                return {"accuracy": self._accuracy(model, emb, self.train_labels.numpy(), self.class_names,
                                                   TRAIN_TEMPLATES)}
            if split != "test":
                raise ValueError(f"clip_fewshot: split must be 'test' or 'train', got {split!r}")
            emb = self._image_embeddings(model, self.test_images)
            out = {"accuracy": self._accuracy(model, emb, self.test_labels, self.class_names, TRAIN_TEMPLATES),
                   "unseen_prompt_accuracy": self._accuracy(model, emb, self.test_labels, self.class_names,
                                                            UNSEEN_TEMPLATES),
                   "seen_classes_accuracy": self._accuracy(model, self._image_embeddings(model, self.seen_images),
                                                           self.seen_labels, self.seen_names, TRAIN_TEMPLATES)}
            out.update(self._before_metrics(model))
            return out
        finally:
            model.train(was_training)

    def describe(self) -> dict[str, Any]:
        """Settings worth recording next to the metrics."""
        return {"prealign": asdict(self.settings), "image_lora_targets": IMAGE_LORA_TARGETS}
