"""LLaVA-style small VLM on a tiny Llama LM built from a config: answer-only labels, generation (deterministic,
batch == one by one, cached == uncached), LoRA / prompt / prefix tuning, perplexity against a float64
reference. The real EfficientNet-Lite0 -> SmolLM2 task is a slow test."""
from __future__ import annotations

import math

import pytest
import torch

import flatpeft
from flatpeft.multimodal.small_vlm import IGNORE_INDEX, PromptParts, SmallVLM, chat_parts
from flatpeft.multimodal.vlm_instruct import answer_accuracy, perplexity

WORDS = "what is in the picture a photo of sandal shirt bag ankle boot describe user assistant system".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"] + WORDS + ["?", "."])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return tok


def tiny_vlm(peft_kind: str | None = None, seed: int = 0) -> SmallVLM:
    """Tiny Llama LM (2 layers, width 32) + identity "image encoder" on 8-d features, 2 visual tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=2))
    for p in lm.parameters():
        p.requires_grad_(False)
    if peft_kind is not None:
        from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

        conf = {"lora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
                "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")}[peft_kind]
        lm = get_peft_model(lm, conf)
    return SmallVLM(torch.nn.Identity(), lm, tok, image_dim=8, num_visual_tokens=2).eval()


def test_chat_parts_split_the_template():
    tok = tiny_tokenizer()
    p = chat_parts(tok, "what is in the picture ?", "ankle boot")
    assert tok.decode(p.pre) == "<|im_start|> user"
    assert tok.decode(p.post) == "what is in the picture ? <|im_end|> <|im_start|> assistant"
    assert tok.decode(p.answer) == "ankle boot <|im_end|>"
    assert chat_parts(tok, "what is in the picture ?").answer == ()


def test_labels_are_minus_100_exactly_outside_answer_tokens():
    vlm = tiny_vlm()
    tok = vlm.tokenizer
    parts = [chat_parts(tok, "what is in the picture ?", "ankle boot"), chat_parts(tok, "describe", "a photo of a bag .")]
    feats = torch.randn(2, 8)
    inputs = vlm.build_inputs(feats, parts, with_answer=True, pad_left=False)
    labels, mask = inputs["labels"], inputs["attention_mask"]
    for i, p in enumerate(parts):
        n_prompt = len(p.pre) + 2 + len(p.post)
        n = n_prompt + len(p.answer)
        expected = [IGNORE_INDEX] * n_prompt + list(p.answer) + [IGNORE_INDEX] * (labels.shape[1] - n)
        assert labels[i].tolist() == expected
        assert mask[i].tolist() == [1] * n + [0] * (labels.shape[1] - n)
    # the visual tokens sit right after the pre-image prompt, the text embeddings elsewhere
    vis = vlm.visual_tokens(feats)
    p = parts[0]
    torch.testing.assert_close(inputs["inputs_embeds"][0, len(p.pre):len(p.pre) + 2], vis[0])
    emb = vlm.language_model.get_input_embeddings()
    torch.testing.assert_close(inputs["inputs_embeds"][0, :len(p.pre)], emb(torch.tensor(p.pre)))
    # the loss is the mean cross-entropy over exactly the answer tokens (float64 reference)
    logits = vlm.language_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    ref = -logp[keep].gather(-1, target[keep].unsqueeze(-1)).mean()
    assert float(vlm(feats, parts).loss.detach()) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("kind", [None, "lora", "prompt", "prefix"])
def test_generate_returns_tokens_deterministic_and_batch_independent(kind):
    vlm = tiny_vlm(kind)
    tok = vlm.tokenizer
    q = chat_parts(tok, "what is in the picture ?")
    prompts = [q, PromptParts(q.pre, q.post[2:]), q]
    feats = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    a = vlm.generate(feats, prompts, max_new_tokens=4)
    b = vlm.generate(feats, prompts, max_new_tokens=4)
    assert a == b and all(isinstance(t, int) for row in a for t in row) and any(a)
    alone = [vlm.generate(feats[i:i + 1], [p], max_new_tokens=4)[0] for i, p in enumerate(prompts)]
    assert a == alone  # padding does not change any row
    stop = set(vlm._stop_ids())
    assert not any(t in stop for row in a for t in row)


def test_cached_generate_equals_uncached_greedy():
    vlm = tiny_vlm("lora")
    q = chat_parts(vlm.tokenizer, "what is in the picture ?")
    feats = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    prompts = [q, PromptParts(q.pre[:1], q.post), q, PromptParts(q.pre, q.post[3:])]
    assert vlm.generate(feats, prompts, 5) == vlm._greedy_uncached(feats, prompts, 5, vlm._stop_ids())


@pytest.mark.parametrize("method", ["flatpo", "eflat-lora"])
def test_small_vlm_trains_adapter_and_projector(method):
    vlm = tiny_vlm("lora")
    tok = vlm.tokenizer
    parts = [chat_parts(tok, "what is in the picture ?", a) for a in ("sandal", "bag", "ankle boot", "shirt")]
    feats = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    opt = flatpeft.create_optimizer(vlm, method, lr=1e-2, rho=0.05)
    vlm.train()
    losses = []
    for _ in range(5):
        def closure():
            loss = vlm(feats, parts).loss
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        losses.append(float(opt.step(closure)))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for n, p in vlm.named_parameters():
        if p.requires_grad and ("lora_B" in n or "projector" in n):
            assert not torch.equal(p.detach(), before[n]), n
        if not p.requires_grad:
            assert torch.equal(p.detach(), before[n]), n


def test_perplexity_matches_float64_reference():
    vlm = tiny_vlm()
    ids = torch.randint(4, len(vlm.tokenizer), (5, 7), generator=torch.Generator().manual_seed(2))
    lm = vlm.language_model
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=ids).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
    assert perplexity(lm, ids, batch=2) == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_answer_accuracy_normalised_match():
    assert answer_accuracy(["A photo of a sandal.", "bag!", "shirt"], ["sandal", "Bag", "t-shirt"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        answer_accuracy(["a"], ["a", "b"])


@pytest.mark.slow
def test_real_vlm_instruct_runs(tmp_path):
    """EfficientNet-Lite0 -> projector -> SmolLM2-135M: a few eflat-lora steps through the runner; every
    trade-off metric is reported and finite."""
    from flatpeft.experiments.config import config_from_dict
    from flatpeft.experiments.runner import train_run

    cfg = config_from_dict({"task": "vlm_instruct", "model": "builtin:smollm2", "data": {"shots": 8},
                            "peft": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                            "method": {"name": "eflat-lora", "rho": 0.05},
                            "train": {"steps": 4, "lr": 1e-3, "batch_size": 8, "device": "cpu", "eval_splits": ["test"]},
                            "task_args": {"eval_per_class": 4, "seen_eval_per_class": 4, "ppl_chunks": 2}})
    m = train_run(cfg, seed=0, out_dir=tmp_path / "run", progress=False)
    for key in ("accuracy", "unseen_question_accuracy", "seen_classes_accuracy", "zero_shot_accuracy",
                "seen_classes_accuracy_before"):
        assert 0.0 <= m[key] <= 1.0
    assert math.isfinite(m["ppl_before"]) and math.isfinite(m["ppl_after"]) and m["ppl_before"] > 1
