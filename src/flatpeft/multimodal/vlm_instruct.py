"""``vlm_instruct``: instruction fine-tuning of the LLaVA-style small VLM, with SPIDER-style trade-off metrics.

* Pre-trained model: :class:`~flatpeft.multimodal.small_vlm.SmallVLM` = frozen EfficientNet-Lite0 features ->
  projector -> ``num_visual_tokens`` soft tokens in front of SmolLM2-135M-Instruct. Pre-alignment (LLaVA
  stage 1) trains the projector only, captioning the five seen classes ("Describe the picture briefly." ->
  "a photo of a {class}."), and is cached (:func:`pretrained_small_vlm`).
* Downstream (LLaVA stage 2): image + question (:data:`~flatpeft.multimodal.data.QUESTIONS`) -> class name,
  for the five downstream classes, ``data.shots`` images per class drawn with the run seed; peft on the LM
  (LoRA on ``peft.target_modules``, or prefix / prompt tuning) and the projector trainable.
* Metrics: ``accuracy`` (greedy answer, normalised string match, downstream test subset),
  ``unseen_question_accuracy`` (a question wording never trained on), ``seen_classes_accuracy`` (the
  pre-alignment captioning task on the seen classes' test images: forgetting), ``ppl_after`` on held-out Jane
  Austen text (asset ``janeausten``), and the pre-trained model's ``zero_shot_accuracy``, ``seen_classes_accuracy_before``,
  ``ppl_before`` (cached per setting).

Image features are frozen, so they are computed once per image set and cached in
``<cache>/multimodal/features_<hash>.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from flatpeft.experiments.rundir import atomic_path, write_atomic
from flatpeft.experiments.tasks import Metric, Task, check_module_names, register_task

from flatpeft.experiments.sampling import epoch_batches, eval_subset, sample_shots

from .data import (CAPTION_INSTRUCTION, CLASS_NAMES, DOWNSTREAM_CLASSES, QUESTIONS, SEEN_CLASSES, UNSEEN_QUESTIONS,
                   load_fashion_mnist, normalise_answer, to_pixels)
from .small_vlm import PromptParts, SmallVLM, chat_parts

__all__ = ["VLMPrealignSettings", "VLMInstructArgs", "VLMInstructTask", "build_small_vlm", "pretrained_small_vlm",
           "vlm_prealign_path", "frozen_image_features", "heldout_text_ids", "perplexity", "answer_accuracy",
           "caption_answer"]


def caption_answer(class_id: int) -> str:
    """Pre-alignment caption of a class: ``"a photo of a {name}."``."""
    return f"a photo of a {CLASS_NAMES[class_id]}."


@dataclass
class VLMPrealignSettings:
    """What defines (and keys the cache of) a pre-aligned small VLM."""

    language_model: str = "builtin:smollm2"
    image_size: int = 64
    num_visual_tokens: int = 4
    system_prompt: str | None = ""
    per_class: int = 200
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0

    def key(self) -> str:
        """Short content hash of the settings (the cache file name)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def vlm_prealign_path(settings: VLMPrealignSettings) -> Path:
    """``<cache>/multimodal/vlm_prealign_<key>.safetensors`` (the projector)."""
    from flatpeft import assets

    return Path(assets.cache_dir()) / "multimodal" / f"vlm_prealign_{settings.key()}.safetensors"


def build_small_vlm(language_model: str = "builtin:smollm2", *, num_visual_tokens: int = 4) -> SmallVLM:
    """EfficientNet-Lite0 (frozen) + fresh projector + the causal LM at ``language_model`` (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flatpeft import assets
    from flatpeft.experiments.config import resolve_model_path

    path = resolve_model_path(language_model)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for p in lm.parameters():
        p.requires_grad_(False)
    image = assets.load_efficientnet_lite0()
    image_dim = image._fc.in_features
    image._fc = torch.nn.Identity()
    return SmallVLM(image.eval(), lm, tok, image_dim=image_dim, num_visual_tokens=num_visual_tokens)


def frozen_image_features(model: SmallVLM, images: np.ndarray, size: int, batch: int = 128) -> torch.Tensor:
    """Features of uint8 images from the frozen encoder, cached on disk by a hash of (pixels, size)."""
    from safetensors.torch import save_file

    from flatpeft import assets

    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes() + str(size).encode()).hexdigest()[:16]
    path = Path(assets.cache_dir()) / "multimodal" / f"features_{digest}.safetensors"
    if path.is_file():
        return assets.load_cached_safetensors(path)["features"]
    out = [model.image_features(to_pixels(images[i:i + batch], size).to(model.device)).cpu()
           for i in tqdm(range(0, len(images), batch), desc="image features", leave=False)]
    feats = torch.cat(out).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"features": feats}, str(tmp))
    return feats


def _system_parts(tokenizer, question: str, answer: str | None, system_prompt: str | None) -> PromptParts:
    """:func:`chat_parts` with an explicit system message (``""`` keeps the turn but drops the default text)."""
    if system_prompt is None or not getattr(tokenizer, "chat_template", None):
        return chat_parts(tokenizer, question, answer)
    return chat_parts(_WithSystem(tokenizer, system_prompt), question, answer)


class _WithSystem:
    """Tokenizer proxy whose ``apply_chat_template`` prepends a system message."""

    def __init__(self, tokenizer, system: str) -> None:
        self._tok, self._system = tokenizer, system

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        return self._tok.apply_chat_template([{"role": "system", "content": self._system}, *messages], **kwargs)


def pretrained_small_vlm(settings: VLMPrealignSettings | None = None, *, force: bool = False) -> SmallVLM:
    """The pre-aligned small VLM: projector trained (LM and image encoder frozen) to caption the seen classes.

    Loaded from :func:`vlm_prealign_path` when cached; otherwise trained (AdamW, answer-token loss,
    ``settings.steps`` steps of ``settings.batch_size`` examples from ``settings.per_class`` images per seen
    class) and saved.
    """
    from safetensors.torch import save_file

    settings = settings or VLMPrealignSettings()
    model = build_small_vlm(settings.language_model, num_visual_tokens=settings.num_visual_tokens)
    path = vlm_prealign_path(settings)
    if path.is_file() and not force:
        from flatpeft import assets

        model.projector.load_state_dict(assets.load_cached_safetensors(path))
        return model
    xtr, ytr, _, _ = load_fashion_mnist()
    idx = sample_shots(ytr, settings.per_class, settings.seed, classes=SEEN_CLASSES, key="pre-alignment per_class")
    feats = frozen_image_features(model, xtr[idx], settings.image_size)
    parts = [_system_parts(model.tokenizer, CAPTION_INSTRUCTION, caption_answer(int(c)), settings.system_prompt)
             for c in ytr[idx]]
    opt = torch.optim.AdamW(model.projector.parameters(), lr=settings.lr)
    model.train()
    batches = epoch_batches(len(idx), settings.batch_size, settings.seed)
    bar = tqdm(range(settings.steps), desc="pre-aligning projector", leave=False)
    for _ in bar:
        b = next(batches)
        loss = model(feats[b], [parts[i] for i in b.tolist()]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.projector.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"settings": json.dumps(asdict(settings)), "final_loss": f"{loss.item():.4f}"})
    return model


# ---- metrics -------------------------------------------------------------------------------------
def heldout_text_ids(tokenizer, n_chunks: int, length: int, book: str = "persuasion") -> torch.Tensor:
    """``(n_chunks, length)`` token ids of held-out Jane Austen text (asset ``janeausten``): the first non-empty lines of
    ``book`` after its first 200 lines, joined with spaces, cut into consecutive chunks."""
    from flatpeft import assets

    books = {str(k): v for k, v in assets.load_janeausten().items()}
    if book not in books:
        raise ValueError(f"unknown Jane Austen book {book!r} (valid: {', '.join(sorted(books))})")
    text = " ".join(line.strip() for line in books[book][200:] if line.strip())
    ids = tokenizer(text[: n_chunks * length * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < n_chunks * length:
        raise ValueError(f"held-out text too short for {n_chunks} x {length} tokens")
    return torch.tensor(ids[: n_chunks * length]).view(n_chunks, length)


@torch.no_grad()
def perplexity(language_model, ids: torch.Tensor, batch: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all predicted positions of ``ids``."""
    device = next(p.device for p in language_model.parameters())
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch].to(device)
        logits = language_model(input_ids=x).logits[:, -x.shape[1]:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def answer_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target after :func:`normalise_answer`."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    return float(np.mean([normalise_answer(p) == normalise_answer(t) for p, t in zip(predictions, targets)]))


@dataclass
class VLMInstructArgs:
    """``task_args`` of ``vlm_instruct``."""

    image_size: int = field(default=64, metadata={"help": "Image side in pixels for the frozen encoder."})
    num_visual_tokens: int = field(default=4, metadata={"help": "Soft visual tokens per image."})
    system_prompt: str | None = field(default="", metadata={"help": (
        "System message of the chat template; '' keeps an empty system turn (short prompts), null uses the "
        "template's default.")})
    prealign_per_class: int = field(default=200, metadata={"help": "Pre-alignment images per seen class."})
    prealign_steps: int = field(default=150, metadata={"help": "Pre-alignment steps (projector only)."})
    train_projector: bool = field(default=True, metadata={"help": "Train the projector during fine-tuning."})
    eval_per_class: int = field(default=50, metadata={"help": "Downstream test images per class (fixed subset)."})
    seen_eval_per_class: int = field(default=30, metadata={"help": "Seen-class test images per class (fixed subset)."})
    unseen_question_eval: bool = field(default=True, metadata={"help": "Also report unseen_question_accuracy."})
    ppl_chunks: int = field(default=16, metadata={"help": "Held-out Jane Austen chunks for ppl_before / ppl_after."})
    ppl_length: int = field(default=64, metadata={"help": "Tokens per held-out chunk."})
    max_new_tokens: int = field(default=10, metadata={"help": (
        "Greedy tokens generated per answer (a seen-class caption such as \"a photo of a t-shirt.\" needs 8).")})
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    caption_fraction: float = field(default=0.0, metadata={"help": (
        "Fraction of the downstream training examples (exactly round(f * n), drawn with the run seed) that use the "
        "caption instruction ('Describe the picture briefly.' -> 'a photo of a {downstream class}.') instead of a "
        "question: instruction data on the new classes only, never a seen-class image or caption.")})
    val_per_class: int = field(default=0, metadata={"help": (
        "Validation images per class (0: no val split): a fixed subset of Fashion-MNIST *training* images, "
        "downstream classes (excluded from the shots) and seen classes (excluded from pre-alignment); split "
        "'val' reports accuracy, seen_classes_accuracy and seen_classes_accuracy_before on it, for choosing "
        "settings without the test images.")})

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.caption_fraction) <= 1.0:
            raise ValueError(f"task_args.caption_fraction must be in [0, 1], got {self.caption_fraction!r}")
        if not isinstance(self.val_per_class, int) or isinstance(self.val_per_class, bool) or self.val_per_class < 0:
            raise ValueError(f"task_args.val_per_class must be a non-negative integer, got {self.val_per_class!r}")
        for name in ("image_size", "num_visual_tokens", "prealign_per_class", "prealign_steps", "eval_per_class",
                     "seen_eval_per_class", "ppl_chunks", "ppl_length", "max_new_tokens", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"task_args.{name} must be a positive integer, got {v!r}")
        if self.eval_per_class > 1000 or self.seen_eval_per_class > 1000:
            raise ValueError("task_args.eval_per_class / seen_eval_per_class must be <= 1000 (Fashion-MNIST test size)")


def validation_split(ytr: np.ndarray, per_class: int, settings: VLMPrealignSettings) -> tuple[np.ndarray, np.ndarray]:
    """Validation images from the Fashion-MNIST *training* set: ``per_class`` per downstream and per seen class
    (fixed seed), none of them among the pre-alignment images of ``settings``. Returns ``(indices, labels for
    drawing the shots)``: the labels with the validation images set to -1, so no shot is a validation image."""
    pre = sample_shots(ytr, settings.per_class, settings.seed, classes=SEEN_CLASSES, key="pre-alignment per_class")
    free = np.asarray(ytr).astype(np.int64)
    free[pre] = -1
    val_idx = np.concatenate([eval_subset(free, DOWNSTREAM_CLASSES, per_class, seed=4321),
                              eval_subset(free, SEEN_CLASSES, per_class, seed=4321)])
    shot_labels = np.asarray(ytr).astype(np.int64)
    shot_labels[val_idx] = -1
    return val_idx, shot_labels


_BEFORE_CACHE: dict[str, dict[str, float]] = {}


@register_task("vlm_instruct")
class VLMInstructTask(Task):
    """Instruction fine-tuning of the pre-aligned EfficientNet-Lite0 -> SmolLM2 small VLM."""

    args_cls = VLMInstructArgs
    metrics = {"accuracy": Metric(), "unseen_question_accuracy": Metric(),
               "seen_classes_accuracy": Metric(before="seen_classes_accuracy_before"),
               "seen_classes_accuracy_before": Metric(), "zero_shot_accuracy": Metric(),
               "ppl_after": Metric(percent=False, before="ppl_before", higher_is_better=False),
               "ppl_before": Metric(percent=False, higher_is_better=False)}

    @staticmethod
    def prealign_settings(cfg, a: VLMInstructArgs) -> VLMPrealignSettings:
        """The pre-alignment of the small VLM that ``cfg`` fine-tunes."""
        return VLMPrealignSettings(language_model=cfg.model, image_size=a.image_size,
                                   num_visual_tokens=a.num_visual_tokens, system_prompt=a.system_prompt,
                                   per_class=a.prealign_per_class, steps=a.prealign_steps)

    @classmethod
    def data_paths(cls, cfg) -> dict[str, Path]:
        """The cached pre-aligned projector (``prealign``: the starting weights of every run; built on first use;
        see :meth:`flatpeft.multimodal.clip_fewshot.ClipFewShotTask.data_paths`)."""
        from flatpeft.experiments.config import parse_dataclass

        path = vlm_prealign_path(cls.prealign_settings(cfg, parse_dataclass(cls.args_cls, cfg.task_args,
                                                                            "task_args.")))
        return {"prealign": path}

    def __init__(self, cfg, seed: int) -> None:
        super().__init__(cfg, seed)
        a: VLMInstructArgs = self.args
        if cfg.data.shots is None:
            raise ValueError("data.shots: vlm_instruct needs a number of training images per class")
        self.settings = self.prealign_settings(cfg, a)
        vlm = pretrained_small_vlm(self.settings).to(self.device)
        tok = vlm.tokenizer
        xtr, ytr, xte, yte = load_fashion_mnist()

        def parts(question: str, answer: str | None = None) -> PromptParts:
            return _system_parts(tok, question, answer, a.system_prompt)

        shot_labels = ytr
        if a.val_per_class:  # validation images: never in the shots, never in pre-alignment
            val_idx, shot_labels = validation_split(ytr, a.val_per_class, self.settings)
            self.val_features = frozen_image_features(vlm, xtr[val_idx], a.image_size)
            self.val_answers = [CLASS_NAMES[int(c)] for c in ytr[val_idx]]
            self.val_is_seen = np.isin(ytr[val_idx], SEEN_CLASSES)
        # downstream training pool: question wording drawn per example with the seed
        idx = sample_shots(shot_labels, cfg.data.shots, self.seed, classes=DOWNSTREAM_CLASSES)
        rng = np.random.default_rng(self.seed + 7919)
        self.train_features = frozen_image_features(vlm, xtr[idx], a.image_size)
        self.train_answers = [CLASS_NAMES[int(c)] for c in ytr[idx]]
        self.train_parts = [parts(QUESTIONS[int(q)], ans)
                            for q, ans in zip(rng.integers(len(QUESTIONS), size=len(idx)), self.train_answers)]
        if a.caption_fraction:  # downstream images with the caption instruction (new classes only: no replay)
            pick = np.random.default_rng(self.seed + 104729).choice(
                len(idx), size=int(round(a.caption_fraction * len(idx))), replace=False)
            for i in pick:
                self.train_parts[int(i)] = parts(CAPTION_INSTRUCTION, caption_answer(int(ytr[idx[int(i)]])))
        te = eval_subset(yte, DOWNSTREAM_CLASSES, a.eval_per_class)
        se = eval_subset(yte, SEEN_CLASSES, a.seen_eval_per_class)
        self.test_features = frozen_image_features(vlm, xte[te], a.image_size)
        self.test_answers = [CLASS_NAMES[int(c)] for c in yte[te]]
        self.seen_features = frozen_image_features(vlm, xte[se], a.image_size)
        self.seen_answers = [CLASS_NAMES[int(c)] for c in yte[se]]
        self.question = parts(QUESTIONS[0])
        self.unseen_question = parts(UNSEEN_QUESTIONS[0])
        self.caption = parts(CAPTION_INSTRUCTION)
        self.ppl_ids = heldout_text_ids(tok, a.ppl_chunks, a.ppl_length)

        self.before = self._before_metrics(vlm)
        if a.val_per_class:
            vlm.eval()
            self.val_before = {"seen_classes_accuracy_before": self._generate_accuracy(
                vlm, self.val_features[self.val_is_seen], self.caption,
                [t for t, s in zip(self.val_answers, self.val_is_seen) if s], "val seen captions")}
        vlm.language_model = self._apply_peft(vlm.language_model)
        for p in vlm.projector.parameters():
            p.requires_grad_(a.train_projector)
        self.model = vlm.to(self.device)

    def _apply_peft(self, lm):
        """peft on the language model: LoRA, prefix or prompt tuning (``task_type=CAUSAL_LM``)."""
        from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

        pc = self.cfg.peft
        check_module_names(lm, pc.modules_to_save or [], "peft.modules_to_save", self.cfg.model)
        if pc.type == "lora":
            conf = LoraConfig(r=pc.r, lora_alpha=pc.alpha, lora_dropout=pc.dropout, target_modules=pc.target_modules,
                              modules_to_save=pc.modules_to_save, task_type="CAUSAL_LM")
        elif pc.type == "prefix":
            conf = PrefixTuningConfig(num_virtual_tokens=pc.num_virtual_tokens, task_type="CAUSAL_LM")
        elif pc.type == "prompt":
            conf = PromptTuningConfig(num_virtual_tokens=pc.num_virtual_tokens, task_type="CAUSAL_LM")
        else:
            raise ValueError(f"peft.type: vlm_instruct supports lora, prefix and prompt, got {pc.type!r}")
        return get_peft_model(lm, conf)

    # ---- training -------------------------------------------------------------------------------
    def train_batches(self) -> Iterator[dict[str, Any]]:
        """Endless seed-fixed batches: ``features`` (B, d_img) and ``parts`` (prompt + answer ids)."""
        for idx in epoch_batches(len(self.train_parts), self.cfg.train.batch_size, self.seed):
            yield {"features": self.train_features[idx], "parts": [self.train_parts[i] for i in idx.tolist()]}

    def loss(self, model, batch) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (labels -100 elsewhere)."""
        return model(batch["features"].to(self.device), batch["parts"]).loss

    # ---- evaluation -----------------------------------------------------------------------------
    def _generate_accuracy(self, model, feats: torch.Tensor, prompt: PromptParts, targets: Sequence[str],
                           desc: str) -> float:
        """Greedy answers to ``prompt`` for each image, scored by normalised string match."""
        bs, preds = self.args.eval_batch_size, []
        for i in tqdm(range(0, len(feats), bs), desc=desc, leave=False):
            f = feats[i:i + bs].to(self.device)
            preds += model.answer(f, [prompt] * len(f), max_new_tokens=self.args.max_new_tokens)
        return answer_accuracy(preds, targets)

    def _before_metrics(self, vlm: SmallVLM) -> dict[str, float]:
        """The pre-trained (pre-aligned) model's metrics, cached in memory and on disk per setting."""
        from flatpeft import assets

        a = self.args
        key = f"{self.settings.key()}_{a.eval_per_class}_{a.seen_eval_per_class}_{a.ppl_chunks}x{a.ppl_length}_{a.max_new_tokens}"
        if key in _BEFORE_CACHE:
            return _BEFORE_CACHE[key]
        path = Path(assets.cache_dir()) / "multimodal" / f"vlm_before_{key}.json"
        if path.is_file():
            _BEFORE_CACHE[key] = json.loads(path.read_text())
            return _BEFORE_CACHE[key]
        vlm.eval()
        out = {"zero_shot_accuracy": self._generate_accuracy(vlm, self.test_features, self.question,
                                                             self.test_answers, "zero-shot"),
               "seen_classes_accuracy_before": self._generate_accuracy(vlm, self.seen_features, self.caption,
                                                                       self.seen_answers, "seen captions"),
               "ppl_before": perplexity(vlm.language_model, self.ppl_ids)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(out))  # another process may read the cache meanwhile
        _BEFORE_CACHE[key] = out
        return out

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        """``test``: accuracy, unseen_question_accuracy, seen_classes_accuracy, ppl_after (+ the pre-trained
        model's zero_shot_accuracy, seen_classes_accuracy_before, ppl_before); ``train``: accuracy on the
        training pool (its own question wordings)."""
        was_training = model.training
        model.eval()
        try:
            if split == "train":
                bs, preds = self.args.eval_batch_size, []
                for i in range(0, len(self.train_parts), bs):
                    p = [PromptParts(x.pre, x.post) for x in self.train_parts[i:i + bs]]
                    preds += model.answer(self.train_features[i:i + bs].to(self.device), p,
                                          max_new_tokens=self.args.max_new_tokens)
                return {"accuracy": answer_accuracy(preds, self.train_answers)}
            if split == "val":
                if not self.args.val_per_class:
                    raise ValueError("vlm_instruct: split 'val' needs task_args.val_per_class > 0")
                seen, down = self.val_is_seen, ~self.val_is_seen
                answers = np.asarray(self.val_answers, dtype=object)
                return {"accuracy": self._generate_accuracy(model, self.val_features[down], self.question,
                                                            list(answers[down]), "val answers"),
                        "seen_classes_accuracy": self._generate_accuracy(model, self.val_features[seen], self.caption,
                                                                         list(answers[seen]), "val seen captions"),
                        **self.val_before}
            if split != "test":
                raise ValueError(f"vlm_instruct: split must be 'test', 'train' or 'val', got {split!r}")
            out = {"accuracy": self._generate_accuracy(model, self.test_features, self.question, self.test_answers,
                                                       "downstream answers")}
            if self.args.unseen_question_eval:
                out["unseen_question_accuracy"] = self._generate_accuracy(
                    model, self.test_features, self.unseen_question, self.test_answers, "unseen question")
            out["seen_classes_accuracy"] = self._generate_accuracy(model, self.seen_features, self.caption,
                                                                   self.seen_answers, "seen captions")
            out["ppl_after"] = perplexity(model.language_model, self.ppl_ids)
            out.update(self.before)
            return out
        finally:
            model.train(was_training)

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """``adapter/``: the LM adapter in peft format; ``adapter/projector.safetensors``: the projector."""
        from safetensors.torch import save_file

        target = Path(out_dir) / "adapter"
        target.mkdir(parents=True, exist_ok=True)
        self.model.language_model.save_pretrained(str(target))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.projector.state_dict().items()},
                  str(target / "projector.safetensors"))

    def load_weights(self, run_dir: str | Path) -> None:
        """Load what :meth:`save` wrote (adapter into the LM, projector)."""
        from peft.utils import set_peft_model_state_dict

        src = Path(run_dir) / "adapter"
        for name in ("adapter_model.safetensors", "projector.safetensors"):
            if not (src / name).is_file():
                raise ValueError(f"run directory {str(run_dir)!r}: missing adapter/{name}")
        set_peft_model_state_dict(self.model.language_model, self._load_tensors(src / "adapter_model.safetensors"))
        self.model.projector.load_state_dict(self._load_tensors(src / "projector.safetensors"))

    def describe(self) -> dict[str, Any]:
        """Settings worth recording next to the metrics."""
        return {"prealign": asdict(self.settings)}
