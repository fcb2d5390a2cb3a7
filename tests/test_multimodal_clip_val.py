"""``clip_fewshot``'s validation split (from the training set, disjoint from every seed's shots and from the
pre-alignment images), its learning-vs-forgetting curve through the runner, and its anchors.

The task runs for real on a tiny dual encoder (a 1-layer BERT text tower, a pooling + linear image tower) and
synthetic 28x28 images; a subclass swaps in those two parts (``pretrained_model``, ``images``). The split
indices are also checked on the real Fashion-MNIST labels when that asset is prepared."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flatpeft.experiments.config import config_from_dict
from flatpeft.multimodal.clip_fewshot import ClipFewShotTask, clip_train_splits
from flatpeft.multimodal.data import (CLASS_NAMES, DOWNSTREAM_CLASSES, SEEN_CLASSES, TRAIN_TEMPLATES,
                                      UNSEEN_TEMPLATES, to_pixels)
from flatpeft.multimodal.dual_encoder import (ClipPrealignSettings, DualEncoder, prealign_dual_encoder,
                                              prealign_indices)

PER_CLASS_TRAIN, PER_CLASS_TEST, SIZE = 120, 20, 8


def synthetic_fashion(seed: int = 0):
    """Fashion-MNIST-shaped ``(Xtr, ytr, Xte, yte)``: a class-dependent bar pattern plus noise; every image is
    unique (its first row holds its index in base 256 and a train/test flag), so image sets can be compared."""
    rng = np.random.default_rng(seed)

    def make(per_class: int, flag: int):
        y = np.repeat(np.arange(10), per_class)
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(len(y), 28, 28))
        for i, c in enumerate(y):
            x[i, 2 + 2 * c:4 + 2 * c, :] += 180
            x[i, 0, :3] = (i // 256, i % 256, flag)
        return x.astype(np.uint8), y.astype(np.int64)

    return (*make(PER_CLASS_TRAIN, 1), *make(PER_CLASS_TEST, 2))


def _words() -> list[str]:
    text = " ".join(TRAIN_TEMPLATES + UNSEEN_TEMPLATES + CLASS_NAMES).lower()
    return sorted(set(re.findall(r"[a-z]+|[^\sa-z]", text)))


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory):
    """A saved 1-layer BertModel + BertTokenizerFast over the prompt and class-name words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_clip_text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _words()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(str(d))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(str(d))
    return d


class TinyClip(ClipFewShotTask):
    """``clip_fewshot`` on a tiny dual encoder and synthetic images (everything else is the real task)."""

    def pretrained_model(self) -> DualEncoder:
        from transformers import AutoModel, AutoTokenizer

        with torch.random.fork_rng():
            torch.manual_seed(0)
            nn = torch.nn
            image = nn.Sequential(nn.AdaptiveAvgPool2d((8, 1)), nn.Flatten(), nn.Linear(24, 24))  # row means
            text = AutoModel.from_pretrained(self.cfg.model, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0)
            model = DualEncoder(image, text, AutoTokenizer.from_pretrained(self.cfg.model), image_dim=24,
                                text_dim=16, embed_dim=self.args.embed_dim, logit_scale=self.args.logit_scale)
        xtr, ytr, _, _ = synthetic_fashion()  # the real pre-alignment, on the synthetic seen-class images
        idx = prealign_indices(ytr, self.settings)
        prealign_dual_encoder(model, xtr[idx], np.searchsorted(SEEN_CLASSES, ytr[idx]),
                              [CLASS_NAMES[c] for c in SEEN_CLASSES], self.settings)
        return model

    def images(self):
        return synthetic_fashion()


@pytest.fixture
def tiny(tiny_text_dir, tmp_path, monkeypatch):
    """``make(seed, **sections)`` -> (TinyClip task, config); the cache goes to tmp_path; registered as clip_tiny."""
    from flatpeft.experiments import tasks

    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tasks.TASKS, "clip_tiny", TinyClip)

    def make(seed: int = 0, **sections):
        raw = {"task": "clip_tiny", "model": str(tiny_text_dir), "data": {"shots": 4},
               "peft": {"type": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]},
               "method": {"name": "base"},
               "train": {"steps": 4, "lr": 5e-2, "batch_size": 8, "device": "cpu", "eval_splits": ["test"]},
               "task_args": {"image_size": SIZE, "embed_dim": 16, "prealign_per_class": 20, "prealign_steps": 60,
                             "image_lora": False,
                             "val_per_class": 8, "seen_val_per_class": 8, "eval_batch_size": 32},
               "output_dir": str(tmp_path / "run")}
        for key, value in sections.items():
            raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
        cfg = config_from_dict(raw)
        torch.manual_seed(seed)
        return TinyClip(cfg, seed), cfg

    return make


def _image_set(images: np.ndarray) -> set[bytes]:
    return {im.tobytes() for im in images}


# ---- the split indices --------------------------------------------------------------------------
def _check_splits(labels: np.ndarray, prealign: np.ndarray, val_pc: int, seen_pc: int, shots: int = 16) -> None:
    first = None
    for seed in range(5):
        s = clip_train_splits(labels, shots=shots, seed=seed, val_per_class=val_pc, seen_val_per_class=seen_pc,
                              val_seed=1234, prealign=prealign)
        assert not set(s.val) & set(s.shots) and not set(s.seen_val) & set(s.shots)
        assert not set(s.seen_val) & set(prealign) and not set(s.val) & set(prealign)
        assert np.bincount(labels[s.val], minlength=10)[list(DOWNSTREAM_CLASSES)].tolist() == [val_pc] * 5
        assert np.bincount(labels[s.seen_val], minlength=10)[list(SEEN_CLASSES)].tolist() == [seen_pc] * 5
        assert np.bincount(labels[s.shots], minlength=10)[list(DOWNSTREAM_CLASSES)].tolist() == [shots] * 5
        if first is None:
            first = s
        else:  # the validation images do not depend on the run seed; the shots do
            assert np.array_equal(s.val, first.val) and np.array_equal(s.seen_val, first.seen_val)
            assert not np.array_equal(s.shots, first.shots)
    other_k = clip_train_splits(labels, shots=1, seed=0, val_per_class=val_pc, seen_val_per_class=seen_pc,
                                val_seed=1234, prealign=prealign)
    assert np.array_equal(other_k.val, first.val) and np.array_equal(other_k.seen_val, first.seen_val)


def test_val_split_is_disjoint_from_every_seeds_shots_and_the_prealignment():
    _, ytr, _, _ = synthetic_fashion()
    prealign = prealign_indices(ytr, ClipPrealignSettings(per_class=40))
    _check_splits(ytr, prealign, val_pc=10, seen_pc=6)


def test_val_split_on_real_fashion_mnist_labels():
    from flatpeft import assets

    try:
        _, ytr, _, _ = assets.load_fashion_mnist()
    except Exception as err:  # noqa: BLE001 - the asset is not prepared on this machine
        pytest.skip(f"Fashion-MNIST not prepared: {err}")
    prealign = prealign_indices(ytr, ClipPrealignSettings())  # the default pre-alignment (400 per seen class)
    assert len(prealign) == 2000
    _check_splits(ytr, prealign, val_pc=100, seen_pc=100)


def test_val_sizes_beyond_the_reserve_are_refused_by_name():
    _, ytr, _, _ = synthetic_fashion()
    prealign = prealign_indices(ytr, ClipPrealignSettings(per_class=60))
    with pytest.raises(ValueError, match=r"task_args\.val_per_class=90: class 'sandal'.*validation reserve"):
        clip_train_splits(ytr, shots=4, seed=0, val_per_class=90, seen_val_per_class=5, val_seed=1234,
                          prealign=prealign)
    with pytest.raises(ValueError, match=r"task_args\.seen_val_per_class=30: .*pre-alignment"):
        clip_train_splits(ytr, shots=4, seed=0, val_per_class=5, seen_val_per_class=30, val_seed=1234,
                          prealign=prealign)
    from flatpeft.multimodal.clip_fewshot import ClipFewShotArgs

    with pytest.raises(ValueError, match="task_args.val_per_class"):
        ClipFewShotArgs(val_per_class=0)


# ---- the task -----------------------------------------------------------------------------------
def test_val_images_come_from_train_and_avoid_shots_prealign_and_test(tiny):
    task, _ = tiny(0)
    xtr, ytr, xte, _ = synthetic_fashion()
    val = _image_set(task.val_images) | _image_set(task.seen_val_images)
    assert len(val) == len(task.val_images) + len(task.seen_val_images) == 80
    assert val <= _image_set(xtr) and not val & _image_set(xte)
    shots = _image_set(xtr[task.splits.shots])
    assert not val & shots
    assert not val & _image_set(xtr[prealign_indices(ytr, task.settings)])
    assert np.array_equal(task.val_labels, np.searchsorted(DOWNSTREAM_CLASSES, ytr[task.splits.val]))
    assert np.array_equal(to_pixels(xtr[task.splits.shots], SIZE), task.train_pixels)


def test_val_metrics_of_the_untrained_model_pair_across_seeds_and_methods(tiny):
    """Before training the adapted model is the pre-aligned one (LoRA B = 0): every seed and method gets the same
    validation numbers, equal to the pre-aligned model's (the curve's step 0)."""
    results = []
    for seed, method in ((0, "base"), (1, "sam"), (2, "flatpo")):
        task, _ = tiny(seed, method={"name": method})
        results.append(task.evaluate(task.model, "val"))
    assert results[0] == results[1] == results[2]
    r = results[0]
    assert set(r) == {"accuracy", "unseen_prompt_accuracy", "seen_classes_accuracy", "zero_shot_accuracy",
                      "seen_classes_accuracy_before"}
    assert r["accuracy"] == r["zero_shot_accuracy"]
    assert r["seen_classes_accuracy"] == r["seen_classes_accuracy_before"]


def test_run_records_the_validation_curve(tiny):
    """train.val_eval_steps writes (step, val_accuracy, val_seen_classes_accuracy, ...) lines to metrics.jsonl;
    the last one is the trained model's, as in eval.json."""
    from flatpeft.experiments.runner import train_run

    _, cfg = tiny(0, train={"steps": 12, "val_eval_steps": [4, 8, 12], "eval_splits": ["test", "val"],
                            "log_every": 4})
    m = train_run(cfg, seed=0, out_dir=cfg.output_dir, progress=False)
    lines = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    curve = [rec for rec in lines if "val_accuracy" in rec]
    assert [rec["step"] for rec in curve] == [4, 8, 12]
    for rec in curve:
        assert 0.0 <= rec["val_accuracy"] <= 1.0 and 0.0 <= rec["val_seen_classes_accuracy"] <= 1.0
        assert rec["val_zero_shot_accuracy"] == m["val_zero_shot_accuracy"]
    assert curve[-1]["val_accuracy"] == m["val_accuracy"]
    assert curve[-1]["val_seen_classes_accuracy"] == m["val_seen_classes_accuracy"]
    assert m["val_seen_classes_accuracy_before"] > 0 and "seen_classes_accuracy" in m
    assert len({rec["val_accuracy"] for rec in curve} | {m["val_zero_shot_accuracy"]}) > 1  # the curve moves


# ---- anchors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["test", "val"])
def test_anchors_majority_probe_zero_shot(tiny, split):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    task, _ = tiny(3)
    images, labels = task._eval_sets(split)[:2]
    a = task.anchors(split)
    assert set(a) == {"majority", "probe", "zero_shot"}
    # balanced shots: ties go to class 0, the share of class 0 in the (balanced) split
    assert a["majority"]["accuracy"] == pytest.approx(float(np.mean(labels == 0))) == pytest.approx(0.2)
    assert a["zero_shot"]["accuracy"] == task.evaluate(task.model, split)["zero_shot_accuracy"]
    # the probe: scikit-learn's multinomial logistic regression on the same standardised frozen features
    model = task.model.eval()
    with model.disable_adapter(), torch.no_grad():
        tr = model.encode_image(task.train_pixels).double().numpy()
        te = model.encode_image(to_pixels(images, SIZE)).double().numpy()
    scaler = StandardScaler().fit(tr)
    clf = LogisticRegression(C=1.0 / (1e-2 * len(tr)), tol=1e-10, max_iter=10_000)
    clf.fit(scaler.transform(tr), task.train_labels.numpy())
    expected = float(np.mean(clf.predict(scaler.transform(te)) == labels))
    assert a["probe"]["accuracy"] == pytest.approx(expected, abs=1.5 / len(labels))
    assert a["probe"]["accuracy"] > a["majority"]["accuracy"]


def test_anchors_leave_weights_adapter_and_mode_as_they_were(tiny):
    task, _ = tiny(0)
    model = task.model
    with torch.no_grad():  # a non-zero adapter, so that an adapter left disabled would change the metrics
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def class_scores():
        model.eval()
        return model(task.train_pixels, task.class_names)

    enabled = class_scores()
    with model.disable_adapter():
        assert not torch.allclose(class_scores(), enabled)  # the adapter matters
    model.train()
    task.anchors("val")
    task.anchors("test")
    assert model.training
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(class_scores(), enabled)  # the adapter is enabled again


def test_evaluate_refuses_an_unknown_split(tiny):
    task, _ = tiny(0)
    with pytest.raises(ValueError, match="split must be 'test', 'val' or 'train'"):
        task.evaluate(task.model, "dev")
    with pytest.raises(ValueError, match="split must be"):
        task.anchors("train")


@pytest.mark.slow
def test_real_clip_validation_and_anchors():
    """EfficientNet-Lite0 + MiniLM, k=4: the untrained model's val numbers are the pre-aligned model's, the seen
    classes are recognised far above chance on validation images, and the probe anchor beats the majority class
    and the zero-shot prompts (which put the new classes mostly on "shirt")."""
    from flatpeft.experiments.tasks import get_task

    cfg = config_from_dict({"task": "clip_fewshot", "model": "builtin:minilm", "data": {"shots": 4},
                            "peft": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
                            "train": {"device": "cpu", "eval_splits": ["test", "val"]},
                            "task_args": {"eval_per_class": 50, "seen_eval_per_class": 50, "val_per_class": 50,
                                          "seen_val_per_class": 50}})
    task = get_task("clip_fewshot")(cfg, 0)
    val = task.evaluate(task.model, "val")
    assert val["accuracy"] == val["zero_shot_accuracy"]
    assert val["seen_classes_accuracy"] == val["seen_classes_accuracy_before"]
    assert val["seen_classes_accuracy"] > 0.6
    a = task.anchors("val")
    assert a["majority"]["accuracy"] == pytest.approx(0.2)
    assert a["probe"]["accuracy"] > max(a["majority"]["accuracy"], a["zero_shot"]["accuracy"]) + 0.2
