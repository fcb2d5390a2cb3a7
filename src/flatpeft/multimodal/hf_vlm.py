"""``hf_vlm``: any Hugging Face image-text-to-text model (LLaVA family, Qwen2-VL, Qwen2.5-VL, ...) on VQA JSONL.

The model and its processor come from ``AutoModelForImageTextToText`` / ``AutoProcessor`` (a hub name or a
local directory); prompts use the processor's chat template, so each family gets its own format and image
tokens. Data: one JSON object per line, ``{"image": "relative/or/absolute.png", "question": ..., "answer":
...}``, the image path relative to the JSONL file. Bad data fails early with ``ValueError`` naming the file and
the line.

Training: LoRA on the linear layers of the language model only (the vision tower and the multimodal
projector stay frozen; FlatPO's VLM setting is LoRA r=8 on all linear layers of the LM), loss on the answer
tokens only: the prompt (system, user turn, image tokens, generation prompt) is processed on its own, checked
to be a prefix of the full conversation, and its positions get label ``-100``. Evaluation: greedy answers
(left-padded batches), normalised string match (:func:`~flatpeft.multimodal.data.normalise_answer`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from flatpeft.experiments.tasks import Task, check_module_names, register_task

from flatpeft.experiments.sampling import epoch_batches
from .small_vlm import IGNORE_INDEX
from .vlm_instruct import answer_accuracy

__all__ = ["VQAExample", "read_vqa_jsonl", "language_model_prefix", "lm_lora_target_regex", "encode_vqa",
           "collate_vqa", "HFVLMArgs", "HFVLMTask", "load_image"]

#: keys whose tensors run along the token sequence (padded, not concatenated)
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class VQAExample:
    """One VQA record; ``where`` is ``"file:line"`` for error messages."""

    image: Path
    question: str
    answer: str
    where: str


def read_vqa_jsonl(path: str | Path) -> list[VQAExample]:
    """Read a VQA JSONL file (keys ``image``, ``question``, ``answer``; blank lines skipped).

    Raises ``ValueError`` naming the file and the 1-based line number for a malformed JSON line, a missing or
    non-string key, or an image file that does not exist (paths are relative to the JSONL file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"VQA data file {str(path)!r} does not exist")
    from flatpeft.experiments.config import read_utf8

    out = []
    for lineno, line in enumerate(read_utf8(path).splitlines(), start=1):  # UTF-8 or an error naming the line
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON line ({err.msg} at column {err.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in ("image", "question", "answer"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise ValueError(f"{where}: missing or non-string {key!r} (keys: {sorted(rec)})")
        image = Path(rec["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{where}: image file not found: {str(image)!r}")
        out.append(VQAExample(image, rec["question"], rec["answer"], where))
    if not out:
        raise ValueError(f"VQA data file {str(path)!r} has no records")
    return out


def load_image(ex: VQAExample, max_side: int | None = None):
    """The example's image as RGB ``PIL.Image`` (downscaled so the longer side is <= ``max_side``)."""
    from PIL import Image

    try:
        with Image.open(ex.image) as im:
            img = im.convert("RGB")
    except OSError as err:
        raise ValueError(f"{ex.where}: cannot read image {str(ex.image)!r}: {err}") from None
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return img


def language_model_prefix(model: torch.nn.Module) -> str:
    """Qualified name of the language-model decoder inside an image-text-to-text model (``get_decoder()``,
    else the first module named ``language_model``)."""
    names = {id(m): n for n, m in model.named_modules()}
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            dec = getter()
        except (AttributeError, NotImplementedError):
            dec = None
        if dec is not None and id(dec) in names and names[id(dec)]:
            return names[id(dec)]
    for n, _ in model.named_modules():
        if n.split(".")[-1] == "language_model":
            return n
    raise ValueError(f"{type(model).__name__}: cannot find the language model (no get_decoder / language_model)")


def lm_lora_target_regex(model: torch.nn.Module, modules: Sequence[str] | str | None = "all-linear") -> str:
    """peft target regex (full match) of the language model's ``nn.Linear`` layers whose last name is in
    ``modules`` (``"all-linear"`` or None: every linear layer of the LM; the vision tower, the projector and
    ``lm_head`` are never included)."""
    prefix = language_model_prefix(model)
    leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                     if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)})
    if modules not in (None, "all-linear"):
        wanted = [modules] if isinstance(modules, str) else list(modules)
        missing = [m for m in wanted if m not in leaves]
        if missing:
            raise ValueError(f"peft.target_modules: {missing} are not linear layers of the language model "
                             f"(available: {leaves})")
        leaves = wanted
    if not leaves:
        raise ValueError(f"{type(model).__name__}: the language model has no linear layers")
    return re.escape(prefix) + r"\..*\.(?:" + "|".join(map(re.escape, leaves)) + ")"


def _messages(question: str, answer: str | None) -> list[dict[str, Any]]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def encode_vqa(processor, ex: VQAExample, *, with_answer: bool, max_side: int | None = None) -> dict[str, torch.Tensor]:
    """Processor outputs of one example (batch dimension 1) and, ``with_answer``, ``labels``: the token ids on
    the answer positions (everything after the processed prompt) and ``-100`` elsewhere."""
    img = load_image(ex, max_side)
    prompt = processor.apply_chat_template(_messages(ex.question, None), tokenize=False, add_generation_prompt=True)
    p_enc = processor(text=[prompt], images=[img], return_tensors="pt")
    if not with_answer:
        return dict(p_enc)
    full = processor.apply_chat_template(_messages(ex.question, ex.answer), tokenize=False)
    enc = dict(processor(text=[full], images=[img], return_tensors="pt"))
    ids, n_prompt = enc["input_ids"][0], p_enc["input_ids"].shape[1]
    if n_prompt >= len(ids) or not torch.equal(ids[:n_prompt], p_enc["input_ids"][0]):
        raise ValueError(f"{ex.where}: the tokenised prompt is not a prefix of the tokenised conversation "
                         "(chat template / tokenizer boundary); cannot mask the prompt")
    labels = ids.clone()
    labels[:n_prompt] = IGNORE_INDEX
    if "attention_mask" in enc:
        labels[enc["attention_mask"][0] == 0] = IGNORE_INDEX
    enc["labels"] = labels.unsqueeze(0)
    return enc


def collate_vqa(items: Sequence[dict[str, torch.Tensor]], pad_id: int, *, pad_left: bool) -> dict[str, torch.Tensor]:
    """Pad the sequence tensors (ids with ``pad_id``, masks with 0, labels with -100) and concatenate the rest
    (pixel values, image grids) along dimension 0."""
    length = max(it["input_ids"].shape[1] for it in items)
    out: dict[str, torch.Tensor] = {}
    for key in items[0]:
        tensors = [it[key] for it in items]
        if key in _SEQUENCE_KEYS:
            fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            rows = []
            for t in tensors:
                pad = t.new_full((1, length - t.shape[1]), fill)
                rows.append(torch.cat([pad, t] if pad_left else [t, pad], dim=1))
            out[key] = torch.cat(rows)
        else:
            out[key] = torch.cat(tensors)
    return out


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFVLMArgs:
    """``task_args`` of ``hf_vlm``."""

    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16 (GPU recipe) or float16."})
    image_max_side: int | None = field(default=None, metadata={"help": (
        "Downscale images so the longer side is <= this (fewer image tokens for dynamic-resolution models).")})
    max_new_tokens: int = field(default=16, metadata={"help": "Greedy tokens generated per answer in evaluation."})
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test records only."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Enable gradient checkpointing (large models)."})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"task_args.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("max_new_tokens", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"task_args.{name} must be a positive integer, got {v!r}")
        for name in ("image_max_side", "max_eval_examples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"task_args.{name} must be a positive integer or null, got {v!r}")


@register_task("hf_vlm")
class HFVLMTask(Task):
    """LoRA fine-tuning of a Hugging Face image-text-to-text model on VQA JSONL (``data.train`` / ``data.test``;
    ``data.shots`` is not used: every training record is used)."""

    args_cls = HFVLMArgs

    def __init__(self, cfg, seed: int) -> None:
        super().__init__(cfg, seed)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from flatpeft.experiments.config import resolve_model_path

        a: HFVLMArgs = self.args
        if cfg.peft.type != "lora":
            raise ValueError(f"peft.type: hf_vlm supports lora, got {cfg.peft.type!r}")
        self.train_examples = read_vqa_jsonl(cfg.data.train)
        if cfg.data.test is None:
            raise ValueError("data.test: hf_vlm needs a VQA JSONL test file (data.test is not set)")
        self.test_examples = read_vqa_jsonl(cfg.data.test)
        if a.max_eval_examples is not None:
            self.test_examples = self.test_examples[: a.max_eval_examples]
        path = resolve_model_path(cfg.model)
        self.processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=_DTYPES[a.dtype])
        for p in model.parameters():
            p.requires_grad_(False)
        if a.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        targets = lm_lora_target_regex(model, cfg.peft.target_modules)
        check_module_names(model, cfg.peft.modules_to_save or [], "peft.modules_to_save", cfg.model)
        lcfg = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                          target_modules=targets, modules_to_save=cfg.peft.modules_to_save)
        self.model = get_peft_model(model, lcfg).to(self.device)
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.tokenizer = tok

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless seed-fixed batches of processed, right-padded examples with answer-only labels."""
        for idx in epoch_batches(len(self.train_examples), self.cfg.train.batch_size, self.seed):
            items = [encode_vqa(self.processor, self.train_examples[i], with_answer=True,
                                max_side=self.args.image_max_side) for i in idx.tolist()]
            yield collate_vqa(items, self.pad_id, pad_left=False)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = _DTYPES[self.args.dtype]
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}

    def loss(self, model, batch) -> torch.Tensor:
        """The model's causal-LM loss (mean over answer tokens; labels -100 elsewhere)."""
        return model(**self._to_device(batch)).loss

    @torch.no_grad()
    def answers(self, model, examples: Sequence[VQAExample]) -> list[str]:
        """Greedy answers (left-padded batches of ``eval_batch_size``), special tokens skipped."""
        out: list[str] = []
        bs = self.args.eval_batch_size
        for i in tqdm(range(0, len(examples), bs), desc="VQA answers", leave=False):
            items = [encode_vqa(self.processor, ex, with_answer=False, max_side=self.args.image_max_side)
                     for ex in examples[i:i + bs]]
            batch = self._to_device(collate_vqa(items, self.pad_id, pad_left=True))
            gen = model.generate(**batch, max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                 pad_token_id=self.pad_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            out += [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out

    def evaluate(self, model, split: str = "test") -> dict[str, float]:
        """``accuracy``: normalised exact match of greedy answers on ``split`` (test or train)."""
        if split not in ("test", "train"):
            raise ValueError(f"hf_vlm: split must be 'test' or 'train', got {split!r}")
        examples = self.test_examples if split == "test" else self.train_examples
        was_training = model.training
        model.eval()
        try:
            preds = self.answers(model, examples)
        finally:
            model.train(was_training)
        return {"accuracy": answer_accuracy(preds, [ex.answer for ex in examples])}
