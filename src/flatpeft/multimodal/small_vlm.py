"""LLaVA-style small VLM: image features -> projector -> soft visual tokens in front of a causal LM.

Architecture (LLaVA-1.5, scaled down; ``docs/multimodal.md``):

* a frozen image encoder (EfficientNet-Lite0, eval mode; features = spatial mean of ``extract_features``);
* a trainable projector, LLaVA-1.5's two-layer MLP ``Linear(d_img, h) -> GELU -> Linear(h, n * h)``, giving
  ``n`` visual tokens of the LM's width ``h``;
* a causal LM (SmolLM2-135M-Instruct) whose token embeddings are spliced with the visual tokens at the
  image placeholder of the chat template: ``[prompt before <image>] [n visual tokens] [rest of prompt]
  [answer]``. The LM may be a peft model (LoRA, prefix or prompt tuning): only ``language_model`` is wrapped.

Loss on answer tokens only: labels are ``-100`` on every prompt, visual and padding position (LLaVA's
``IGNORE_INDEX``); the LM shifts them internally. Generation is greedy over left-padded
``inputs_embeds`` (so the LM returns only the new tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["SmallVLM", "PromptParts", "chat_parts", "IGNORE_INDEX", "IMAGE_PLACEHOLDER"]

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptParts:
    """Token ids of one example: ``pre`` + visual tokens + ``post`` form the prompt, ``answer`` the target."""

    pre: tuple[int, ...]
    post: tuple[int, ...]
    answer: tuple[int, ...] = ()


def chat_parts(tokenizer, question: str, answer: str | None = None) -> PromptParts:
    """Split the chat-template rendering of ``user: <image>question`` (+ ``assistant: answer``) into token ids.

    The template renders the prompt with the generation prompt; the answer ids are the rendering of the
    full conversation past the prompt, trailing newlines stripped (so the end-of-turn token, e.g.
    ``<|im_end|>``, is a target and generation learns to stop). Without a chat template the format is
    ``"<image>\\n{question}\\nAnswer: "`` + ``answer`` + eos.
    """
    user = {"role": "user", "content": IMAGE_PLACEHOLDER + question}
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        full = None
        if answer is not None:
            full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False)
            if not full.startswith(prompt):
                raise ValueError("chat template: the conversation rendering does not start with the prompt rendering")
            answer_text = full[len(prompt):].rstrip("\n")
    else:
        prompt = f"{IMAGE_PLACEHOLDER}\n{question}\nAnswer: "
        answer_text = None if answer is None else answer + (tokenizer.eos_token or "")
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"prompt must contain exactly one {IMAGE_PLACEHOLDER!r}: {prompt!r}")
    pre, post = prompt.split(IMAGE_PLACEHOLDER)

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    return PromptParts(ids(pre), ids(post), ids(answer_text) if answer is not None else ())


def _cut(row: list[int], stop: list[int]) -> list[int]:
    """``row`` up to (excluding) its first stop id."""
    for j, t in enumerate(row):
        if t in stop:
            return row[:j]
    return row


class SmallVLM(nn.Module):
    """Frozen image encoder + trainable projector + (peft-wrapped) causal LM."""

    def __init__(self, image_encoder: nn.Module, language_model: nn.Module, tokenizer, *, image_dim: int,
                 num_visual_tokens: int = 4, projector_hidden: int | None = None) -> None:
        super().__init__()
        if num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
        self.image_encoder = image_encoder
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        hidden = language_model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(image_dim, projector_hidden or hidden), nn.GELU(),
                                       nn.Linear(projector_hidden or hidden, num_visual_tokens * hidden))
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "SmallVLM":
        """Set train/eval mode; the image encoder always stays in eval mode (frozen)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen features ``(B, image_dim)``: spatial mean of ``extract_features`` (or the module output)."""
        if hasattr(self.image_encoder, "extract_features"):
            return self.image_encoder.extract_features(pixels).mean(dim=(2, 3))
        return self.image_encoder(pixels)

    def visual_tokens(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(B, n, h)`` soft tokens from image features."""
        out = self.projector(image_features.to(self.device))
        return out.view(out.shape[0], self.num_visual_tokens, -1)

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        emb = self.language_model.get_input_embeddings()
        return emb(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    def build_inputs(self, image_features: torch.Tensor, parts: Sequence[PromptParts], *, with_answer: bool,
                     pad_left: bool) -> dict[str, torch.Tensor]:
        """Splice the visual tokens into each example's embedded prompt (+ answer) and pad.

        Returns ``inputs_embeds`` ``(B, L, h)``, ``attention_mask`` and (``with_answer``) ``labels`` with the
        answer ids at the answer positions and ``-100`` everywhere else.
        """
        if len(parts) != image_features.shape[0]:
            raise ValueError(f"{len(parts)} prompts for {image_features.shape[0]} images")
        vis = self.visual_tokens(image_features)
        rows, labels = [], []
        for v, p in zip(vis, parts):
            answer = p.answer if with_answer else ()
            pieces = [self._embed(p.pre) if p.pre else None, v, self._embed(p.post) if p.post else None,
                      self._embed(answer) if answer else None]
            rows.append(torch.cat([x for x in pieces if x is not None]))
            n_prompt = len(p.pre) + self.num_visual_tokens + len(p.post)
            labels.append([IGNORE_INDEX] * n_prompt + list(answer))
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), length, hidden)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for i, (r, l) in enumerate(zip(rows, labels)):
            sl = slice(length - r.shape[0], length) if pad_left else slice(0, r.shape[0])
            embeds[i, sl] = r
            mask[i, sl] = 1
            lab[i, sl] = torch.tensor(l, dtype=torch.long, device=self.device)
        out = {"inputs_embeds": embeds, "attention_mask": mask}
        if with_answer:
            out["labels"] = lab
        return out

    def forward(self, image_features: torch.Tensor, parts: Sequence[PromptParts]):
        """LM output (with ``.loss``: mean cross-entropy over answer tokens) for a batch of examples."""
        return self.language_model(**self.build_inputs(image_features, parts, with_answer=True, pad_left=False))

    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        return [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
                if isinstance(i, int) and i >= 0 and i != tok.unk_token_id]

    def _is_prompt_learning(self) -> bool:
        cfg = getattr(self.language_model, "peft_config", None)
        active = getattr(self.language_model, "active_adapter", None)
        return bool(cfg) and active in cfg and getattr(cfg[active], "is_prompt_learning", False)

    @torch.no_grad()
    def generate(self, image_features: torch.Tensor, parts: Sequence[PromptParts], max_new_tokens: int = 6) -> list[list[int]]:
        """Greedy continuation ids of each prompt, cut at the first eos / end-of-turn token.

        Plain and LoRA LMs: ``generate`` on left-padded ``inputs_embeds`` (KV cache). Prefix / prompt tuning:
        peft's generation does not take ``inputs_embeds``, so a cache-free greedy loop over right-padded rows
        (each row read at its own last position; positions never shifted by padding).
        """
        eos = self._stop_ids()
        if self._is_prompt_learning():
            return self._greedy_uncached(image_features, parts, max_new_tokens, eos)
        inputs = self.build_inputs(image_features, parts, with_answer=False, pad_left=True)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]
        out = self.language_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=eos or None, pad_token_id=pad)
        return [_cut(row, eos) for row in out.tolist()]

    def _greedy_uncached(self, image_features, parts, max_new_tokens: int, eos: list[int]) -> list[list[int]]:
        """Greedy decoding by full re-forwarding (no cache), right padding."""
        inputs = self.build_inputs(image_features, parts, with_answer=False, pad_left=False)
        lengths = inputs["attention_mask"].sum(1).tolist()
        rows = [inputs["inputs_embeds"][i, :n] for i, n in enumerate(lengths)]
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            length = max(r.shape[0] for r in rows)
            embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
            mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
            for i, r in enumerate(rows):
                embeds[i, : r.shape[0]] = r
                mask[i, : r.shape[0]] = 1
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
            offset = logits.shape[1] - length  # prompt tuning prepends its virtual tokens
            for i, r in enumerate(rows):
                if done[i]:
                    continue
                nxt = int(logits[i, offset + r.shape[0] - 1].argmax())
                if nxt in eos:
                    done[i] = True
                    continue
                out[i].append(nxt)
                rows[i] = torch.cat([r, self._embed([nxt])])
            if all(done):
                break
        return out

    def answer(self, image_features: torch.Tensor, parts: Sequence[PromptParts], max_new_tokens: int = 6) -> list[str]:
        """Decoded greedy answers (special tokens skipped)."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in self.generate(image_features, parts, max_new_tokens)]
