"""The ``austen`` built-in dataset (6-way Jane Austen authorship): the split recipe of :mod:`flatpeft.austen` on a
small synthetic ``novels.json``, its preparation into the cache (manifest, loader, ``builtin:austen/...``), and
(``-m slow``) the real prepared asset."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import flatpeft.assets as assets
from flatpeft.austen import AUSTEN_TITLES, build_austen_splits, novel_body, passages
from flatpeft.experiments.config import load_config, resolve_data_path


def _novel(key: str, n_lines: int) -> list[str]:
    """A fake novel: title page, a chapter heading every 40 lines, 10-word lines that name the novel and the
    line (so every line is unique), blank lines, an end marker and an editorial note after it."""
    lines = [key.upper(), "", "By Jane Austen", "", "VOLUME I", ""]
    for i in range(n_lines):
        if i % 40 == 0:
            lines += ["", f"CHAPTER {i // 40 + 1}", ""]
        lines.append(f"{key} l{i} " + " ".join(["word"] * 8))
        if i % 5 == 4:
            lines.append("")
    return lines + ["", "THE END", "", "A NOTE ON THE TEXT", "editorial words that are not the novel at all"]


@pytest.fixture
def novels() -> dict[str, list[str]]:
    """The six real keys with synthetic text of unequal lengths (emma longest)."""
    sizes = {"emma": 900, "mansfieldpark": 800, "northangerabbey": 500, "persuasion": 520, "prideprejudice": 700,
             "sensesensibility": 650}
    return {key: _novel(key, n) for key, n in sizes.items()}


def test_body_drops_front_matter_headings_blank_lines_and_end_notes(novels):
    body = novel_body(novels["persuasion"])
    texts = [t for _, t in body]
    assert len(texts) == 520 and texts[0].startswith("persuasion l0 ") and texts[-1].startswith("persuasion l519 ")
    assert not any("CHAPTER" in t or "VOLUME" in t or "Austen" in t or "editorial" in t or not t for t in texts)
    # the line indices point into the asset's list
    assert all(novels["persuasion"][i] == t for i, t in body)


def test_passages_are_consecutive_lines_of_at_least_min_words():
    body = [(i, " ".join(["w"] * 10)) for i in range(25)]
    got = passages(body, 48)
    assert [(s, e) for s, e, _ in got] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25)]
    assert all(len(t.split()) == 50 for _, _, t in got)
    assert passages(body[:4], 48) == []  # an incomplete remainder is dropped


def test_split_is_disjoint_gapped_balanced_and_labelled_by_title(novels):
    train, test = build_austen_splits(novels, test_per_novel=15)
    assert list(train.columns) == ["text", "label", "novel", "start_line", "end_line"]
    assert set(train["label"]) == set(test["label"]) == set(AUSTEN_TITLES.values())
    assert (test["label"].value_counts() == 15).all()
    # the train pool is balanced to the shortest novel: northangerabbey's 500 lines -> 400 train lines, 80 passages
    assert (train["label"].value_counts() == 80).all()
    assert not set(train["text"]) & set(test["text"])
    assert (train["label"] == train["novel"].map(AUSTEN_TITLES)).all()
    for key in novels:
        tr, te = train[train["novel"] == key], test[test["novel"] == key]
        body = dict(novel_body(novels[key]))
        assert tr["end_line"].max() <= te["start_line"].min()  # train text comes first: no overlap
        between = [body[i] for i in range(tr["end_line"].max(), te["start_line"].min()) if i in body]
        assert sum(len(t.split()) for t in between) >= 48  # at least a whole passage between them: no neighbours
        for row in pd.concat([tr, te]).itertuples():  # each passage is exactly its lines, joined
            assert row.text == " ".join(body[i] for i in range(row.start_line, row.end_line) if i in body)
            assert len(row.text.split()) >= 48 and row.text.startswith(f"{key} l")


def test_split_is_deterministic_and_does_not_depend_on_key_order(novels):
    a_train, a_test = build_austen_splits(novels, test_per_novel=15)
    b_train, b_test = build_austen_splits(dict(reversed(list(novels.items()))), test_per_novel=15)
    pd.testing.assert_frame_equal(a_train, b_train)
    pd.testing.assert_frame_equal(a_test, b_test)


def test_split_refuses_a_novel_too_short_for_the_test_size(novels):
    with pytest.raises(ValueError, match=r"novel 'northangerabbey': 80 train / 19 test passages .* 20 test passages"):
        build_austen_splits(novels, test_per_novel=20)
    with pytest.raises(ValueError, match="train_fraction"):
        build_austen_splits(novels, train_fraction=1.0)


def test_prepare_builds_records_and_resolves_builtin_austen(tmp_path, monkeypatch):
    """`prepare(["austen"])` prepares janeausten first (here from synthetic lines instead of the Debian package),
    writes the CSVs, records their sha256, and `builtin:austen/...` resolves to them; a changed file is refused."""
    novels = {key: _novel(key, 2600 + 100 * i) for i, key in enumerate(AUSTEN_TITLES)}  # >= 100 test passages each
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(assets.AssetMissingError, match=r"asset 'austen' is not prepared.*--only austen"):
        assets.austen_splits()

    def fake_janeausten(force: bool):
        out = assets.cache_dir() / "janeausten"
        out.mkdir(parents=True, exist_ok=True)
        assets.janeausten_path().write_text(json.dumps(novels))
        assets._mark_done(out)
        return out

    monkeypatch.setitem(assets._ASSETS, "janeausten", assets._Asset(fake_janeausten))
    root = assets.prepare(["austen"], progress=False)["austen"]
    assert root == tmp_path / "cache" / "austen"
    splits = assets.austen_splits()
    assert resolve_data_path("builtin:austen/train") == splits["train"] == root / "train.csv"
    assert resolve_data_path("builtin:austen/test") == splits["test"]
    test = pd.read_csv(splits["test"])
    assert len(test) == 600 and (test["label"].value_counts() == 100).all()
    pd.testing.assert_frame_equal(test, build_austen_splits(novels)[1])
    manifest = json.loads((tmp_path / "cache" / "manifests" / "austen.json").read_text())
    assert set(manifest["files"]) == {"train.csv", "test.csv"}
    assert assets.verify(["austen", "janeausten"])["austen"].startswith("ok (2 file(s)")
    splits["test"].write_text(splits["test"].read_text().replace("persuasion l", "persuasion L"))
    with pytest.raises(assets.AssetCorruptError, match="test.csv has a different sha256"):
        assets.austen_splits()


def test_unknown_builtin_data_lists_austen():
    with pytest.raises(ValueError, match=r"data.train: unknown built-in data .*builtin:austen/train, "
                                         r"builtin:austen/test"):
        resolve_data_path("builtin:nosuch/train", "data.train")


def test_austen_config_uses_the_builtin_dataset_and_its_validation_split():
    cfg = load_config("austen_authorship")
    assert (cfg.data.train, cfg.data.test) == ("builtin:austen/train", "builtin:austen/test")
    assert cfg.model == "builtin:minilm" and cfg.peft.type == "lora" and cfg.data.val_size > 0


@pytest.mark.slow
def test_real_austen_asset():
    """The prepared asset (`flatpeft data prepare --only austen`): 1152 train and 100 test passages per novel."""
    try:
        splits = assets.austen_splits()
    except assets.AssetMissingError as err:
        pytest.skip(str(err))
    train, test = pd.read_csv(splits["train"]), pd.read_csv(splits["test"])
    assert set(test["label"]) == set(AUSTEN_TITLES.values())
    assert (train["label"].value_counts() == 1152).all() and (test["label"].value_counts() == 100).all()
    assert not set(train["text"]) & set(test["text"])
    rebuilt = build_austen_splits(assets.load_janeausten())
    pd.testing.assert_frame_equal(test, rebuilt[1])
    assert test["text"].str.split().str.len().between(48, 80).all()
