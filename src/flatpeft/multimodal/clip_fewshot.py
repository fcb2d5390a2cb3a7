"""``clip_fewshot``: few-shot CLIP-LoRA fine-tuning of the pre-aligned dual encoder on new classes.

Protocol (CLIP-LoRA style, ``docs/multimodal.md``):

1. Start from the pre-aligned :class:`~flatpeft.multimodal.dual_encoder.DualEncoder` (cached, see
   :func:`~flatpeft.multimodal.dual_encoder.pretrained_dual_encoder`).
2. Draw ``data.shots`` training images per downstream class (sandal, shirt, sneaker, bag, ankle boot) with
   the run seed, outside the validation reserve (:func:`clip_train_splits`); LoRA (``peft``) on both towers:
   the text tower's ``peft.target_modules`` and the image tower's pointwise convolutions; the projections stay
   frozen.
3. Loss: cross-entropy of the scaled cosine scores of each image against the five class embeddings
   (prompt-ensembled over :data:`~flatpeft.multimodal.data.TRAIN_TEMPLATES`, through the text LoRA).
4. Metrics (``evaluate``): ``accuracy`` on the downstream test images; ``unseen_prompt_accuracy`` on the
   same images with :data:`~flatpeft.multimodal.data.UNSEEN_TEMPLATES`; ``seen_classes_accuracy`` on the
   pre-alignment classes' test images (forgetting); ``zero_shot_accuracy`` and
   ``seen_classes_accuracy_before`` of the pre-aligned model (adapters disabled; cached per setting).
   ``val``: the same metrics on validation images from the Fashion-MNIST *training* set (never the test set),
   disjoint from every seed's shots and from the pre-alignment images, the same for every run (``data.val_seed``);
   ``train.val_eval_steps`` records them along training (the learning-vs-forgetting curve; its step 0 is
   ``val_zero_shot_accuracy`` / ``val_seen_classes_accuracy_before``, since LoRA starts at ``B = 0``).
5. Anchors (:meth:`ClipFewShotTask.anchors`): majority class of the shots, a linear probe on the pre-aligned
   model's frozen image embeddings of the shots, and the pre-aligned model's zero-shot prompts.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from flatpeft.experiments.anchors import linear_probe, majority_class
from flatpeft.experiments.rundir import write_atomic
from flatpeft.experiments.tasks import Metric, Task, check_module_names, register_task

from flatpeft.experiments.sampling import carve_validation, epoch_batches, eval_subset, sample_shots

from .data import (CLASS_NAMES, DOWNSTREAM_CLASSES, SEEN_CLASSES, TRAIN_TEMPLATES, UNSEEN_TEMPLATES,
                   load_fashion_mnist, to_pixels)
from .dual_encoder import (IMAGE_LORA_TARGETS, ClipPrealignSettings, DualEncoder, clip_prealign_path,
                           lora_target_regex, prealign_indices, pretrained_dual_encoder)

__all__ = ["ClipFewShotArgs", "ClipFewShotTask", "ClipSplits", "clip_train_splits", "VAL_RESERVE_FRACTION"]

#: Share of the Fashion-MNIST training set carved off (seed ``data.val_seed``, the same for every run) as the
#: validation reserve: validation images come from it, k-shot images never do, so the two are disjoint for every
#: run seed and the validation images do not depend on the run seed or on the validation sizes.
VAL_RESERVE_FRACTION = 1 / 6


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
    val_per_class: int = field(default=100, metadata={"help": (
        "Downstream validation images per class (split val), from the training set's validation reserve.")})
    seen_val_per_class: int = field(default=100, metadata={"help": (
        "Seen-class validation images per class (val seen_classes_accuracy), from the validation reserve, "
        "never an image the pre-alignment trained on.")})
    eval_batch_size: int = field(default=128, metadata={"help": "Images per evaluation batch."})

    def __post_init__(self) -> None:
        for name in ("image_size", "embed_dim", "prealign_per_class", "prealign_steps", "eval_batch_size",
                     "val_per_class", "seen_val_per_class"):
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
#: in-process cache of the pre-aligned model's image embeddings of an evaluation split (the probe anchor's
#: inputs, the same for every seed): (settings key, eval spec) -> (N, embed_dim) float tensor on the CPU
_FROZEN_EMB_CACHE: dict[str, torch.Tensor] = {}


@dataclass
class ClipSplits:
    """Indices into the Fashion-MNIST training set: the run's shots and the two validation sets."""

    shots: np.ndarray
    val: np.ndarray
    seen_val: np.ndarray


def clip_train_splits(labels: np.ndarray, *, shots: int, seed: int, val_per_class: int, seen_val_per_class: int,
                      val_seed: int, prealign: np.ndarray) -> ClipSplits:
    """Split the training set's ``labels`` into the run's k-shot images and the fixed validation images.

    A reserve of ``len(labels) * VAL_RESERVE_FRACTION`` images is carved off with ``val_seed``
    (:func:`~flatpeft.experiments.sampling.carve_validation`). The ``shots`` per downstream class are drawn with
    the run ``seed`` from the rest; ``val`` holds ``val_per_class`` reserve images per downstream class and
    ``seen_val`` ``seen_val_per_class`` per seen class that are not in ``prealign`` (the pre-alignment's images),
    both drawn with ``val_seed``: the same for every run seed and method, and independent of ``shots``.
    """
    reserve, rest = carve_validation(len(labels), int(len(labels) * VAL_RESERVE_FRACTION), val_seed)
    shot_idx = sample_shots(labels, shots, seed, classes=DOWNSTREAM_CLASSES, pool=rest, names=CLASS_NAMES,
                            source="the training images outside the validation reserve")
    val = sample_shots(labels, val_per_class, val_seed, classes=DOWNSTREAM_CLASSES, pool=reserve, names=CLASS_NAMES,
                       source="the validation reserve", key="task_args.val_per_class")
    seen_val = sample_shots(labels, seen_val_per_class, val_seed, classes=SEEN_CLASSES,
                            pool=np.setdiff1d(reserve, prealign), names=CLASS_NAMES,
                            source="the validation reserve less the pre-alignment images",
                            key="task_args.seen_val_per_class")
    return ClipSplits(shots=shot_idx, val=np.sort(val), seen_val=np.sort(seen_val))


@register_task("clip_fewshot")
class ClipFewShotTask(Task):
    """Few-shot LoRA fine-tuning of the pre-aligned EfficientNet-Lite0 + MiniLM dual encoder."""

    args_cls = ClipFewShotArgs
    metrics = {"accuracy": Metric(), "unseen_prompt_accuracy": Metric(),
               "seen_classes_accuracy": Metric(before="seen_classes_accuracy_before"),
               "seen_classes_accuracy_before": Metric(), "zero_shot_accuracy": Metric()}

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
        base = self.pretrained_model()
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

        xtr, ytr, xte, yte = self.images()
        self.class_names = [CLASS_NAMES[c] for c in DOWNSTREAM_CLASSES]
        self.seen_names = [CLASS_NAMES[c] for c in SEEN_CLASSES]
        self.splits = clip_train_splits(ytr, shots=cfg.data.shots, seed=self.seed, val_per_class=a.val_per_class,
                                        seen_val_per_class=a.seen_val_per_class, val_seed=cfg.data.val_seed,
                                        prealign=prealign_indices(ytr, self.settings))
        idx = self.splits.shots
        self.train_pixels = to_pixels(xtr[idx], a.image_size)
        self.train_labels = torch.as_tensor(np.searchsorted(DOWNSTREAM_CLASSES, ytr[idx]), dtype=torch.long)
        te = eval_subset(yte, DOWNSTREAM_CLASSES, a.eval_per_class)
        se = eval_subset(yte, SEEN_CLASSES, a.seen_eval_per_class)
        self.test_images, self.test_labels = xte[te], np.searchsorted(DOWNSTREAM_CLASSES, yte[te])
        self.seen_images, self.seen_labels = xte[se], np.searchsorted(SEEN_CLASSES, yte[se])
        va, sv = self.splits.val, self.splits.seen_val
        self.val_images, self.val_labels = xtr[va], np.searchsorted(DOWNSTREAM_CLASSES, ytr[va])
        self.seen_val_images, self.seen_val_labels = xtr[sv], np.searchsorted(SEEN_CLASSES, ytr[sv])

    def pretrained_model(self) -> DualEncoder:
        """The pre-aligned dual encoder every run starts from (:func:`pretrained_dual_encoder`, cached)."""
        return pretrained_dual_encoder(self.settings)

    def images(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fashion-MNIST ``(Xtr, ytr, Xte, yte)`` (uint8 images, integer labels)."""
        return load_fashion_mnist()

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

    def _eval_sets(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(downstream images, labels, seen-class images, labels)`` of ``split`` (``test`` or ``val``)."""
        if split == "test":
            return self.test_images, self.test_labels, self.seen_images, self.seen_labels
        if split == "val":
            return self.val_images, self.val_labels, self.seen_val_images, self.seen_val_labels
        raise ValueError(f"clip_fewshot: split must be 'test', 'val' or 'train', got {split!r}")

    def _before_key(self, split: str) -> str:
        """Cache key of the pre-aligned model's metrics on ``split`` (the test key is the one older code used)."""
        a = self.args
        if split == "test":
            return f"{self.settings.key()}_{a.eval_per_class}_{a.seen_eval_per_class}"
        return f"{self.settings.key()}_val{self.cfg.data.val_seed}_{a.val_per_class}_{a.seen_val_per_class}"

    def _before_metrics(self, model, split: str = "test") -> dict[str, float]:
        """``zero_shot_accuracy`` and ``seen_classes_accuracy_before`` of the pre-aligned model (adapters
        disabled) on ``split``, cached in memory and in ``<cache>/multimodal`` per (pre-alignment, eval subset)."""
        from flatpeft import assets

        key = self._before_key(split)
        if key in _BEFORE_CACHE:
            return _BEFORE_CACHE[key]
        path = Path(assets.cache_dir()) / "multimodal" / f"clip_before_{key}.json"
        if path.is_file():
            _BEFORE_CACHE[key] = json.loads(path.read_text())
            return _BEFORE_CACHE[key]
        images, labels, seen_images, seen_labels = self._eval_sets(split)
        with model.disable_adapter():
            out = {"zero_shot_accuracy": self._accuracy(model, self._image_embeddings(model, images),
                                                        labels, self.class_names, TRAIN_TEMPLATES),
                   "seen_classes_accuracy_before": self._accuracy(
                       model, self._image_embeddings(model, seen_images), seen_labels, self.seen_names,
                       TRAIN_TEMPLATES)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(out))  # another process may read the cache meanwhile
        _BEFORE_CACHE[key] = out
        return out

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        """``test`` / ``val``: accuracy, unseen_prompt_accuracy, seen_classes_accuracy (+ the pre-aligned model's
        zero_shot_accuracy, seen_classes_accuracy_before) on that split's images; ``train``: accuracy on the
        few-shot pool."""
        was_training = model.training
        model.eval()
        try:
            if split == "train":
                with torch.no_grad():
                    emb = model.encode_image(self.train_pixels.to(self.device))
                return {"accuracy": self._accuracy(model, emb, self.train_labels.numpy(), self.class_names,
                                                   TRAIN_TEMPLATES)}
            images, labels, seen_images, seen_labels = self._eval_sets(split)
            emb = self._image_embeddings(model, images)
            out = {"accuracy": self._accuracy(model, emb, labels, self.class_names, TRAIN_TEMPLATES),
                   "unseen_prompt_accuracy": self._accuracy(model, emb, labels, self.class_names, UNSEEN_TEMPLATES),
                   "seen_classes_accuracy": self._accuracy(model, self._image_embeddings(model, seen_images),
                                                           seen_labels, self.seen_names, TRAIN_TEMPLATES)}
            out.update(self._before_metrics(model, split))
            return out
        finally:
            model.train(was_training)

    def anchors(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Anchors on the downstream images of ``split`` (``test`` or ``val``) with this run's shots:
        ``majority`` (the most frequent shot label, ties to the lowest class), ``probe``
        (:func:`~flatpeft.experiments.anchors.linear_probe` on the pre-aligned model's normalised image
        embeddings, adapters disabled) and ``zero_shot`` (the pre-aligned model's prompts: ``zero_shot_accuracy``).
        The split's frozen embeddings are cached in memory per (pre-alignment, eval subset), so later seeds only
        encode their shots. Weights, adapter state and train/eval mode are left as they were."""
        images, labels = self._eval_sets(split)[:2]
        model = self.model
        was_training = model.training
        model.eval()
        key = self._before_key(split)
        try:
            with model.disable_adapter():
                with torch.no_grad():
                    shot_emb = model.encode_image(self.train_pixels.to(self.device))
                if key not in _FROZEN_EMB_CACHE:
                    _FROZEN_EMB_CACHE[key] = self._image_embeddings(model, images).cpu()
            split_emb = _FROZEN_EMB_CACHE[key]
            zero_shot = self._before_metrics(model, split)["zero_shot_accuracy"]
        finally:
            model.train(was_training)
        k = len(self.class_names)
        probe = linear_probe(shot_emb, self.train_labels.numpy(), split_emb, k)
        majority = majority_class(self.train_labels.numpy(), k)
        return {"majority": {"accuracy": float((labels == majority).mean())},
                "probe": {"accuracy": float((probe == labels).mean())},
                "zero_shot": {"accuracy": float(zero_shot)}}

    def describe(self) -> dict[str, Any]:
        """Settings worth recording next to the metrics."""
        return {"prealign": asdict(self.settings), "image_lora_targets": IMAGE_LORA_TARGETS}
