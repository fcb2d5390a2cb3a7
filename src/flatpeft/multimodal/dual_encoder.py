"""CLIP-style dual encoder built from real pretrained towers, its pre-alignment and zero-shot scoring.

Architecture (``docs/multimodal.md``):

* image tower: EfficientNet-Lite0 (asset ``efficientnet``), features = spatial mean of ``extract_features`` (1280-d); kept in
  eval mode always (frozen BatchNorm statistics, no drop-connect), LoRA on its pointwise convolutions;
* text tower: MiniLM (asset ``minilm``, a ``BertModel``), sentence embedding = attention-masked mean of the last hidden
  states (what the model's ``1_Pooling`` encodes), LoRA on ``query`` / ``value``;
* linear projections ``image_proj`` (1280 -> d) and ``text_proj`` (384 -> d) into a shared space;
* scores ``s_ij = tau * cos(P_I f_i, P_T t_j)`` with a fixed logit scale ``tau`` (CLIP: learned, ~100;
  here 20: with the pre-aligned projections it separates the seen classes well, see ``docs/multimodal.md``).

Classification (CLIP zero-shot): the class embedding is the re-normalised mean of the normalised text
embeddings of the class under every prompt template (CLIP's prompt ensembling); the predicted class is the
argmax of the scores. Pre-alignment trains ``image_proj`` and ``text_proj`` only, with the towers frozen, on
precomputed tower features, by cross-entropy of the image-to-class-prompt scores (the image->text half of
CLIP's symmetric InfoNCE, with all classes as negatives).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from flatpeft.experiments.rundir import atomic_path

from flatpeft.experiments.sampling import sample_shots

from .data import (CLASS_NAMES, SEEN_CLASSES, TRAIN_TEMPLATES, load_fashion_mnist, to_pixels)

__all__ = ["DualEncoder", "ClipPrealignSettings", "build_dual_encoder", "prealign_dual_encoder",
           "pretrained_dual_encoder", "clip_prealign_path", "prealign_indices", "IMAGE_LORA_TARGETS",
           "lora_target_regex",
           "image_block_regex"]

#: peft target regex (full-matched) of EfficientNet-Lite's pointwise convolutions (after plain_pointwise).
IMAGE_LORA_TARGETS = r"_blocks\.\d+\.(_project_conv|_expand_conv)"


class DualEncoder(nn.Module):
    """Image tower + text tower + two linear projections; scores by scaled cosine similarity.

    ``image_encoder``: a module with ``extract_features(x) -> (B, C, H, W)`` (EfficientNet) or whose call
    returns ``(B, C)`` features; ``text_encoder``: a Hugging Face encoder returning ``last_hidden_state``;
    ``tokenizer``: its tokenizer (kept as a plain attribute, not a sub-module).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, tokenizer, *, image_dim: int,
                 text_dim: int, embed_dim: int = 384, logit_scale: float = 20.0, max_length: int = 32) -> None:
        super().__init__()
        if logit_scale <= 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.logit_scale = float(logit_scale)
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        with torch.no_grad():  # text side starts as the identity (embedding kept) where the shapes allow
            self.text_proj.weight.copy_(torch.eye(embed_dim, text_dim))

    def train(self, mode: bool = True) -> "DualEncoder":
        """Set train/eval mode; the image tower always stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    # ---- towers ---------------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tower features ``(B, image_dim)``: spatial mean of ``extract_features`` (or the module output)."""
        if hasattr(self.image_encoder, "extract_features"):
            return self.image_encoder.extract_features(pixels).mean(dim=(2, 3))
        return self.image_encoder(pixels)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise with padding/truncation to ``max_length`` onto the model's device."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = self.image_proj.weight.device
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings ``(T, text_dim)``: mean of the last hidden states over the attention mask."""
        enc = self.tokenize(texts)
        hidden = self.text_encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    # ---- shared space ---------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, embed_dim)``."""
        return F.normalize(self.image_proj(self.image_features(pixels)), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(T, embed_dim)``."""
        return F.normalize(self.text_proj(self.text_features(texts)), dim=-1)

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """``(C, embed_dim)``: for each class the re-normalised mean over templates of the normalised
        embeddings of ``template.format(name)`` (CLIP prompt ensembling)."""
        if not templates:
            raise ValueError("templates must not be empty")
        texts = [t.format(name) for name in class_names for t in templates]
        emb = self.encode_text(texts).view(len(class_names), len(templates), -1)
        return F.normalize(emb.mean(1), dim=-1)

    def logits(self, image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """Scores ``tau * image_emb @ class_emb.T`` (both already normalised: scaled cosine similarity)."""
        return self.logit_scale * image_emb @ class_emb.t()

    def forward(self, pixel_values: torch.Tensor, class_names: Sequence[str],
                templates: Sequence[str] = TRAIN_TEMPLATES) -> torch.Tensor:
        """Class scores ``(B, C)`` of the images against the prompts of ``class_names``."""
        return self.logits(self.encode_image(pixel_values), self.class_embeddings(class_names, templates))


# ---- construction --------------------------------------------------------------------------------
def build_dual_encoder(text_model: str, *, embed_dim: int = 384, logit_scale: float = 20.0,
                       text_dropout: float | None = 0.0) -> DualEncoder:
    """The real composite: EfficientNet-Lite0 (pointwise convs made plain ``nn.Conv2d`` for peft) and the
    Hugging Face encoder at ``text_model`` (MiniLM for ``builtin:minilm``); ``text_dropout`` overrides the
    BERT hidden/attention dropout (None keeps the model's)."""
    from transformers import AutoModel, AutoTokenizer

    from flatpeft import assets
    from flatpeft.experiments.config import resolve_model_path

    path = resolve_model_path(text_model)
    kwargs = {} if text_dropout is None else {"hidden_dropout_prob": text_dropout,
                                              "attention_probs_dropout_prob": text_dropout}
    tok = AutoTokenizer.from_pretrained(path)
    text = AutoModel.from_pretrained(path, **kwargs)
    image = assets.plain_pointwise(assets.load_efficientnet_lite0())
    image_dim = image._fc.in_features if hasattr(image, "_fc") else 1280
    image._fc = nn.Identity()  # the ImageNet head is never used (features only)
    return DualEncoder(image.eval(), text, tok, image_dim=image_dim, text_dim=text.config.hidden_size,
                       embed_dim=embed_dim, logit_scale=logit_scale)


def image_block_regex(first_block: int = 0) -> str:
    """:data:`IMAGE_LORA_TARGETS` restricted to blocks ``>= first_block`` (0 = all blocks). LoRA on late
    blocks only lets backward stop early: the frozen early blocks need no gradient."""
    if first_block < 0:
        raise ValueError(f"first_block must be >= 0, got {first_block}")
    if first_block == 0:
        return IMAGE_LORA_TARGETS
    tens, ones = divmod(first_block, 10)
    # numbers >= first_block up to 99: same tens digit with a larger unit, or a larger tens digit
    alts = [f"{tens}[{ones}-9]" if tens else f"[{ones}-9]"]
    if tens < 9:
        alts.append(f"[{tens + 1}-9][0-9]")
    return r"_blocks\.(?:" + "|".join(alts) + r")\.(_project_conv|_expand_conv)"


def lora_target_regex(text_modules: Sequence[str] | str | None, image: bool = True, first_block: int = 0) -> str:
    """One peft target regex (full match) for both towers of a :class:`DualEncoder`: the text tower's
    modules named in ``text_modules`` (e.g. ``["query", "value"]``) and, if ``image``, the pointwise
    convolutions of the image tower (blocks ``>= first_block``). Works on the bare model and inside peft's wrapper."""
    parts = []
    if text_modules:
        if isinstance(text_modules, str):
            parts.append(rf"text_encoder\..*(?:{text_modules})")
        else:
            parts.append(r"text_encoder\..*\.(?:" + "|".join(map(str, text_modules)) + ")")
    if image:
        parts.append(r"image_encoder\." + image_block_regex(first_block))
    if not parts:
        raise ValueError("lora_target_regex: no targets (text_modules empty and image=False)")
    return "(?:" + "|".join(parts) + ")"


# ---- pre-alignment -------------------------------------------------------------------------------
@dataclass
class ClipPrealignSettings:
    """What defines (and keys the cache of) a pre-aligned dual encoder."""

    text_model: str = "builtin:minilm"
    image_size: int = 64
    embed_dim: int = 384
    logit_scale: float = 20.0
    per_class: int = 400          # training images per seen class
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0

    def key(self) -> str:
        """Short content hash of the settings (the cache file name)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def clip_prealign_path(settings: ClipPrealignSettings) -> Path:
    """Cache file of the pre-aligned projections: ``<cache>/multimodal/clip_prealign_<key>.safetensors``."""
    from flatpeft import assets

    return Path(assets.cache_dir()) / "multimodal" / f"clip_prealign_{settings.key()}.safetensors"


@torch.no_grad()
def _batched_image_features(model: DualEncoder, images: np.ndarray, size: int, batch: int = 128,
                            desc: str = "image features") -> torch.Tensor:
    """Tower features of uint8 images, in batches, no grad."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        out.append(model.image_features(to_pixels(images[i:i + batch], size).to(model.image_proj.weight.device)))
    return torch.cat(out)


def prealign_dual_encoder(model: DualEncoder, images: np.ndarray, labels: np.ndarray,
                          class_names: Sequence[str], settings: ClipPrealignSettings) -> dict[str, float]:
    """Train ``model.image_proj`` and ``model.text_proj`` (towers frozen) in place.

    Tower features are computed once (frozen towers, no grad); each step draws ``batch_size`` images and
    one template, and minimises ``CE(tau * cos(P_I f, P_T t_c), y)`` over the classes. ``labels`` index
    ``class_names``. Returns the final training loss and accuracy (on the features, template-ensembled).
    """
    model.eval()
    feats = _batched_image_features(model, images, settings.image_size, desc="pre-alignment features")
    with torch.no_grad():
        texts = [t.format(c) for c in class_names for t in TRAIN_TEMPLATES]
        tfeat = model.text_features(texts).view(len(class_names), len(TRAIN_TEMPLATES), -1)
    y = torch.as_tensor(labels, dtype=torch.long, device=feats.device)
    gen = torch.Generator().manual_seed(settings.seed)
    params = list(model.image_proj.parameters()) + list(model.text_proj.parameters())
    opt = torch.optim.Adam(params, lr=settings.lr)
    for _ in tqdm(range(settings.steps), desc="pre-aligning projections", leave=False):
        idx = torch.randint(len(feats), (min(settings.batch_size, len(feats)),), generator=gen)
        t = int(torch.randint(len(TRAIN_TEMPLATES), (1,), generator=gen))
        img = F.normalize(model.image_proj(feats[idx]), dim=-1)
        txt = F.normalize(model.text_proj(tfeat[:, t]), dim=-1)
        loss = F.cross_entropy(model.logits(img, txt), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        img = F.normalize(model.image_proj(feats), dim=-1)
        cls = F.normalize(F.normalize(model.text_proj(tfeat), dim=-1).mean(1), dim=-1)
        acc = (model.logits(img, cls).argmax(1) == y).float().mean().item()
    return {"loss": float(loss.item()), "train_accuracy": acc}


def prealign_indices(labels: np.ndarray, settings: ClipPrealignSettings) -> np.ndarray:
    """Indices into the Fashion-MNIST training set of the images the pre-alignment trains on: ``settings.per_class``
    per seen class, drawn with ``settings.seed`` (a validation split of the seen classes must avoid them)."""
    return sample_shots(labels, settings.per_class, settings.seed, classes=SEEN_CLASSES,
                        key="pre-alignment per_class")


def pretrained_dual_encoder(settings: ClipPrealignSettings | None = None, *, force: bool = False) -> DualEncoder:
    """The pre-aligned dual encoder ("pre-trained model" of every downstream run).

    Loads the projections from :func:`clip_prealign_path` when cached; otherwise pre-aligns on
    ``settings.per_class`` Fashion-MNIST training images of each seen class (drawn with ``settings.seed``)
    and saves them (safetensors, settings in the metadata).
    """
    from safetensors.torch import save_file

    settings = settings or ClipPrealignSettings()
    model = build_dual_encoder(settings.text_model, embed_dim=settings.embed_dim, logit_scale=settings.logit_scale)
    path = clip_prealign_path(settings)
    if path.is_file() and not force:
        from flatpeft import assets

        state = assets.load_cached_safetensors(path)
        model.image_proj.weight.data.copy_(state["image_proj.weight"])
        model.text_proj.weight.data.copy_(state["text_proj.weight"])
        return model
    xtr, ytr, _, _ = load_fashion_mnist()
    idx = prealign_indices(ytr, settings)
    remap = {c: i for i, c in enumerate(SEEN_CLASSES)}
    labels = np.array([remap[int(c)] for c in ytr[idx]])
    stats = prealign_dual_encoder(model, xtr[idx], labels, [CLASS_NAMES[c] for c in SEEN_CLASSES], settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"settings": json.dumps(asdict(settings)), "stats": json.dumps(stats)}
    with atomic_path(path) as tmp:  # another process may read the cache meanwhile
        save_file({"image_proj.weight": model.image_proj.weight.detach().contiguous(),
                   "text_proj.weight": model.text_proj.weight.detach().contiguous()}, str(tmp), metadata=meta)
    return model
