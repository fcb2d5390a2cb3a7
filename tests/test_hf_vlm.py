"""hf_vlm: a tiny randomly initialised LLaVA (CLIP vision tower + Llama LM) and processor built locally from
configs (no weights, no downloads), VQA JSONL reading, answer-only labels, and a few steps of flatpo and
eflat-lora through the real engine."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image

from flatpeft.experiments.config import config_from_dict
from flatpeft.multimodal.hf_vlm import (HFVLMTask, collate_vqa, encode_vqa, lm_lora_target_regex,
                                        read_vqa_jsonl)

WORDS = "what is in the image a cat dog red blue green colour photo of shown item user assistant".split()


def build_tiny_llava(directory):
    """Save a tiny LlavaForConditionalGeneration + LlavaProcessor (word-level tokenizer, PIL CLIP image
    processor, a plain chat template) to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>"] + WORDS + ["?", ":"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=template, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


def write_vqa(directory, n: int = 6):
    """Images of solid colours under ``directory/img`` and ``train.jsonl`` / ``test.jsonl`` asking their colour."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    recs = []
    for i in range(n):
        name = list(colours)[i % 3]
        arr = np.zeros((20, 24, 3), np.uint8) + np.array(colours[name], np.uint8)
        Image.fromarray(arr).save(directory / "img" / f"{i}.png")
        recs.append({"image": f"img/{i}.png", "question": "what colour is in the image ?", "answer": name})
    for split in ("train", "test"):
        (directory / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return directory


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return write_vqa(tmp_path_factory.mktemp("vqa"))


def make_cfg(model_dir, data_dir, method: str, steps: int = 3):
    return config_from_dict({
        "task": "hf_vlm", "model": str(model_dir),
        "data": {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl")},
        "peft": {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "method": {"name": method, "rho": 0.05},
        "train": {"steps": steps, "lr": 1e-2, "batch_size": 3, "device": "cpu", "eval_splits": ["test"]},
        "task_args": {"max_new_tokens": 3, "eval_batch_size": 4},
    })


# ---- data errors -------------------------------------------------------------------------------------
def test_malformed_line_names_file_and_line(tmp_path, vqa_dir):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"image": str(vqa_dir / "img" / "0.png"), "question": "q", "answer": "a"})
    bad.write_text(good + "\n\n" + '{"image": "x.png", "question": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        read_vqa_jsonl(bad)


def test_missing_image_names_file_and_line(tmp_path, vqa_dir):
    bad = tmp_path / "missing.jsonl"
    good = json.dumps({"image": str(vqa_dir / "img" / "0.png"), "question": "q", "answer": "a"})
    bad.write_text(good + "\n" + json.dumps({"image": "nope/none.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: image file not found: .*nope/none\.png"):
        read_vqa_jsonl(bad)


def test_missing_key_names_file_and_line(tmp_path, vqa_dir):
    bad = tmp_path / "nokey.jsonl"
    bad.write_text(json.dumps({"image": str(vqa_dir / "img" / "0.png"), "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"nokey\.jsonl:1: missing or non-string 'answer'"):
        read_vqa_jsonl(bad)


def test_relative_image_paths_resolve_against_jsonl(vqa_dir):
    recs = read_vqa_jsonl(vqa_dir / "train.jsonl")
    assert len(recs) == 6 and recs[0].image == vqa_dir / "img" / "0.png" and recs[1].answer == "blue"


# ---- labels and targets --------------------------------------------------------------------------------
def test_answer_only_labels(tiny_llava, vqa_dir):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_llava)
    ex = read_vqa_jsonl(vqa_dir / "train.jsonl")[1]
    enc = encode_vqa(proc, ex, with_answer=True)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    tok = proc.tokenizer
    answer_ids = tok("blue </s>", add_special_tokens=False)["input_ids"]  # the template closes the turn with </s>
    n = len(answer_ids)
    assert labels[-n:].tolist() == answer_ids == ids[-n:].tolist()
    assert (labels[:-n] == -100).all()
    # the image placeholder was expanded by the processor: 4 patches (16 px / 8 px)^2
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 4
    batch = collate_vqa([enc, encode_vqa(proc, read_vqa_jsonl(vqa_dir / "train.jsonl")[0], with_answer=True)],
                        tok.pad_token_id, pad_left=False)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["pixel_values"].shape[0] == 2


def test_lora_targets_only_language_model(tiny_llava):
    import re

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    regex = lm_lora_target_regex(model, "all-linear")
    hit = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(regex, n)]
    assert len(hit) == 2 * 7 and all(".language_model.layers." in n for n in hit)
    with pytest.raises(ValueError, match="not linear layers of the language model"):
        lm_lora_target_regex(model, ["fc1"])


# ---- training through the engine ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flatpo", "eflat-lora"])
def test_tiny_llava_trains(tiny_llava, vqa_dir, method):
    from flatpeft.experiments.runner import build_optimizer

    torch.manual_seed(0)
    cfg = make_cfg(tiny_llava, vqa_dir, method)
    task = HFVLMTask(cfg, 0)
    model = task.model
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in n and "language_model" in n for n in lora)
    opt = build_optimizer(task, cfg, 0)
    batches = task.train_batches()
    model.train()
    for _ in range(3):
        batch = next(batches)

        def closure(batch=batch):
            loss = task.loss(model, batch)
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        loss = opt.step(closure)
        assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    changed = [n for n, v in lora.items() if not torch.equal(params[n].detach(), v)]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())
    metrics = task.evaluate(model)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_train_run_save_and_reload(tiny_llava, vqa_dir, tmp_path):
    from flatpeft.experiments.runner import train_run

    cfg = make_cfg(tiny_llava, vqa_dir, "flatpo", steps=2)
    metrics = train_run(cfg, seed=0, out_dir=tmp_path / "run", progress=False)
    assert np.isfinite(metrics["final_loss"])
    task = HFVLMTask.load(tmp_path / "run", cfg)
    # a fresh LoRA has B == 0; the reloaded one carries the trained (non-zero) B factors
    b = [p for n, p in task.model.named_parameters() if "lora_B" in n]
    assert b and all(float(p.detach().abs().sum()) > 0 for p in b)
    assert task.evaluate(task.model)["accuracy"] == pytest.approx(metrics["accuracy"])


# ---- Qwen2-VL ------------------------------------------------------------------------------------------
def build_tiny_qwen2vl():
    """A tiny Qwen2VLForConditionalGeneration and an image-only Qwen2-VL processor (transformers 5 builds the
    Qwen2-VL video processor only with torchvision, which this environment lacks; images need none of it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = tokenizer.image_token, "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|image_pad|>",
                "<|vision_end|>", "<|video_pad|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["?", ":"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
                                  extra_special_tokens={"image_token": "<|image_pad|>"})
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} "
                "{% endif %}{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    ip = Qwen2VLImageProcessorPil(min_pixels=8 * 8, max_pixels=16 * 16, patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg), proc


@pytest.mark.parametrize("method", ["flatpo", "eflat-lora"])
def test_tiny_qwen2vl_path(vqa_dir, tmp_path, method):
    """The hf_vlm building blocks on Qwen2-VL: dynamic-resolution images (different token counts, padded),
    LM-only LoRA, a few engine steps, and left-padded batch generation equal to one-by-one generation."""
    import flatpeft
    from peft import LoraConfig, get_peft_model

    from flatpeft.multimodal.hf_vlm import VQAExample

    model, proc = build_tiny_qwen2vl()
    big = tmp_path / "big.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(big)  # 16 px: 4 merged image tokens (8 px: 1)
    small = read_vqa_jsonl(vqa_dir / "train.jsonl")
    examples = [small[0], VQAExample(big, "what colour is in the image ?", "blue", "test:1"), small[2]]
    items = [encode_vqa(proc, ex, with_answer=True) for ex in examples]
    assert len({it["input_ids"].shape[1] for it in items}) == 2
    batch = collate_vqa(items, proc.tokenizer.pad_token_id, pad_left=False)
    assert batch["image_grid_thw"].shape == (3, 3) and batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert ((batch["labels"] != -100).sum(1) == 2).all()  # answer word + <|im_end|>

    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=lm_lora_target_regex(model, "all-linear"))
    model = get_peft_model(model, lcfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("language_model" in n for n in lora)
    opt = flatpeft.create_optimizer(model, method, lr=1e-2, rho=0.05)
    model.train()
    for _ in range(3):
        def closure():
            loss = model(**batch).loss
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(opt.step(closure))
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in lora.items() if "lora_B" in n)
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())

    model.eval()
    prompts = [encode_vqa(proc, ex, with_answer=False) for ex in examples]
    left = collate_vqa(prompts, proc.tokenizer.pad_token_id, pad_left=True)
    with torch.no_grad():
        together = model.generate(**left, max_new_tokens=3, do_sample=False)[:, left["input_ids"].shape[1]:]
        for i, p in enumerate(prompts):
            alone = model.generate(**p, max_new_tokens=3, do_sample=False)[:, p["input_ids"].shape[1]:]
            assert together[i].tolist() == alone[0].tolist()
