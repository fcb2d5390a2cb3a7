"""CLIP-style dual encoder: zero-shot scoring against a float64 hand computation, LoRA targets on both towers,
data helpers; the real EfficientNet-Lite0 + MiniLM few-shot task is a slow test."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from flatpeft.experiments.sampling import epoch_batches, eval_subset, sample_shots
from flatpeft.multimodal.data import normalise_answer, to_pixels
from flatpeft.multimodal.dual_encoder import DualEncoder, image_block_regex, lora_target_regex

WORDS = ["a", "photo", "of", "picture", "an", "image", "sandal", "shirt", "sneaker", "bag", "ankle", "boot", "."]


def tiny_bert(tmp_path):
    """A 2-layer BertModel from a config and a BertTokenizerFast over a local vocabulary file."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval(), tok


def test_zero_shot_prediction_matches_hand_computed_cosines(tmp_path):
    text, tok = tiny_bert(tmp_path)
    # image tower: the identity, so "pixels" are the tower features themselves
    model = DualEncoder(torch.nn.Identity(), text, tok, image_dim=6, text_dim=16, embed_dim=5, logit_scale=20.0).eval()
    g = torch.Generator().manual_seed(1)
    wi, wt = torch.randn(5, 6, generator=g), torch.randn(5, 16, generator=g)
    model.image_proj.weight.data.copy_(wi)
    model.text_proj.weight.data.copy_(wt)
    feats = torch.randn(12, 6, generator=g)
    names = ["sandal", "shirt", "bag", "ankle boot"]
    templates = ["a photo of a {} .", "an image of a {} ."]
    with torch.no_grad():
        scores = model(feats, names, templates)
        t = model.text_features([tp.format(n) for n in names for tp in templates]).double().numpy()

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    img = unit(feats.double().numpy() @ wi.double().numpy().T)
    txt = unit(t @ wt.double().numpy().T).reshape(len(names), len(templates), -1)
    cls = unit(txt.mean(1))
    expected = 20.0 * img @ cls.T
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert scores.argmax(1).tolist() == expected.argmax(1).tolist()
    assert len(set(expected.argmax(1).tolist())) > 1  # the check is not trivially one class


def test_text_features_mean_pool_ignores_padding(tmp_path):
    text, tok = tiny_bert(tmp_path)
    model = DualEncoder(torch.nn.Identity(), text, tok, image_dim=4, text_dim=16, embed_dim=16).eval()
    with torch.no_grad():
        both = model.text_features(["a photo of a sandal .", "bag"])
        alone = model.text_features(["bag"])
    torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-5)


def test_lora_on_both_towers_targets_exactly(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet
    from peft import LoraConfig, get_peft_model

    from flatpeft.assets import plain_pointwise

    text, tok = tiny_bert(tmp_path)
    image = plain_pointwise(EfficientNet.from_name("efficientnet-lite0"))  # random init: structure only
    image._fc = torch.nn.Identity()
    model = DualEncoder(image, text, tok, image_dim=1280, text_dim=16, embed_dim=8)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_regex(
        ["query", "value"], image=True, first_block=10)))
    wrapped = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    text_hits = [n for n in wrapped if ".text_encoder." in n]
    image_hits = [n for n in wrapped if ".image_encoder." in n]
    assert len(text_hits) == 4 and all(n.endswith(("query", "value")) for n in text_hits)
    blocks = sorted({int(re.search(r"_blocks\.(\d+)\.", n).group(1)) for n in image_hits})
    assert blocks == list(range(10, 16)) and len(image_hits) == 12
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the image tower stays in eval mode (frozen BatchNorm statistics) when the model trains
    peft_model.train()
    assert not model.image_encoder.training and model.text_encoder.training


def test_image_block_regex_ranges():
    for first in (0, 1, 7, 10, 13):
        rx = image_block_regex(first)
        hits = [i for i in range(16) if re.fullmatch(rx, f"_blocks.{i}._expand_conv")]
        assert hits == list(range(first, 16))
    with pytest.raises(ValueError):
        image_block_regex(-1)


def test_to_pixels_scaling_and_shape():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0] = 255
    x = to_pixels(img, 64)
    assert x.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(x[0].numpy(), (1.0 - 0.498) / 0.502, rtol=1e-6)
    np.testing.assert_allclose(x[1].numpy(), (0.0 - 0.498) / 0.502, rtol=1e-6)


def test_shots_and_eval_subset_are_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 30)
    a, b = sample_shots(labels, 4, 3, classes=(5, 6, 7)), sample_shots(labels, 4, 3, classes=(5, 6, 7))
    assert a.tolist() == b.tolist() and np.bincount(labels[a], minlength=10)[5:8].tolist() == [4, 4, 4]
    assert sample_shots(labels, 4, 4, classes=(5, 6, 7)).tolist() != a.tolist()
    assert len(eval_subset(labels, (0, 1), None)) == 60
    with pytest.raises(ValueError, match="data.shots=31: class 0 has only 30 example"):
        sample_shots(labels, 31, 0, classes=(0,))


def test_epoch_batches_are_permutations_and_leave_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    it = epoch_batches(10, 4, seed=5)
    flat = torch.cat([next(it) for _ in range(5)])  # 20 indices = two full epochs
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert torch.equal(torch.get_rng_state(), state)
    it2 = epoch_batches(10, 4, seed=5)
    assert torch.equal(next(it2), flat[:4])
    assert next(epoch_batches(3, 16, seed=0)).shape == (3,)  # batch capped at the pool size


def test_normalise_answer():
    assert normalise_answer("A photo of a Sandal.") == "sandal"
    assert normalise_answer("  an   Ankle boot! ") == "ankle boot"
    assert normalise_answer("T-shirt/top") == "t-shirt/top"
    assert normalise_answer("shirt") != normalise_answer("t-shirt")


@pytest.mark.slow
def test_real_clip_fewshot_improves_over_zero_shot(tmp_path):
    """EfficientNet-Lite0 + MiniLM, k=4, 30 SAM steps through the runner: downstream accuracy rises above the
    pre-aligned model's zero-shot accuracy (measured on a 100-per-class subset)."""
    from flatpeft.experiments.config import config_from_dict
    from flatpeft.experiments.runner import train_run

    cfg = config_from_dict({"task": "clip_fewshot", "model": "builtin:minilm", "data": {"shots": 4},
                            "peft": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
                            "method": {"name": "sam", "rho": 0.05},
                            "train": {"steps": 30, "lr": 5e-4, "batch_size": 16, "device": "cpu", "eval_splits": ["test"]},
                            "task_args": {"eval_per_class": 100, "seen_eval_per_class": 50}})
    m = train_run(cfg, seed=0, out_dir=tmp_path / "run", progress=False)
    assert m["accuracy"] > m["zero_shot_accuracy"] + 0.2
    for key in ("unseen_prompt_accuracy", "seen_classes_accuracy", "seen_classes_accuracy_before"):
        assert 0.0 <= m[key] <= 1.0
