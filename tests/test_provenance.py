"""Every run names the code that trained it, and resume never mixes code, data or settings silently.

Compare, preference and the suite reuse a finished run only when its resolved settings, the sha256 of its data
files and its code are the current ones: a run of other code is retrained (or, with ``--keep-other-code``,
kept and named in the tables), changed data are refused. Older code is faked by editing the recorded hash.
Tiny BERT + synthetic reviews (``_fixtures``); every run is two steps.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import _fixtures as F
from flatpeft.experiments.runner import compare, train_run

pytestmark = pytest.mark.usefixtures("single_thread")

OLD = "0" * 64  # the source hash of a faked older flatpeft


class _Provenance:
    """``flatpeft.experiments.provenance``, imported when first used (so that on code without it the tests fail
    at their assertions, not at collection)."""

    def __getattr__(self, name):
        import importlib

        return getattr(importlib.import_module("flatpeft.experiments.provenance"), name)


provenance = _Provenance()


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture
def tiny(tmp_path):
    """A tiny config whose data files belong to this test (they are changed in place below)."""
    return F.tiny_config(tmp_path / "fx", train={"steps": 2, "log_every": 1})


def fake_old_code(run: Path, source: str | None = OLD) -> None:
    """Make ``run`` look trained by another flatpeft: its recorded source hash becomes ``source`` (``None``:
    no code recorded at all, as runs trained before flatpeft recorded it)."""
    for name in (".flatpeft-run.json", "eval.json"):
        path = run / name
        data = json.loads(path.read_text())
        if source is None:
            data.pop("code")
        else:
            data["code"] = {**data["code"], "source_sha256": source, "git_commit": "1" * 40}
        path.write_text(json.dumps(data))


# ------------------------------------------------------------------ a run names its code
def test_run_directory_names_its_code(tiny, tmp_path):
    import peft
    import transformers

    import flatpeft

    metrics = train_run(tiny, out_dir=tmp_path / "r", progress=False)
    manifest = json.loads((tmp_path / "r" / ".flatpeft-run.json").read_text())
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())
    code = manifest["code"]
    assert saved["code"] == code == metrics["code"]
    assert code["flatpeft"] == flatpeft.__version__
    assert (code["torch"], code["transformers"], code["peft"]) == (torch.__version__, transformers.__version__,
                                                                    peft.__version__)
    assert len(code["source_sha256"]) == 64 and code["source_sha256"] == provenance.source_sha256()
    package = Path(flatpeft.__file__).parent
    git = shutil.which("git")
    head = (subprocess.run([git, "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
            if git else None)
    if head is not None and head.returncode == 0:   # run from a checkout: the commit and whether it is dirty
        assert code["git_commit"] == head.stdout.strip() and isinstance(code["git_dirty"], bool)
    else:
        assert code["git_commit"] is None


def test_source_hash_follows_the_sources_and_needs_no_git(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "m.py").write_text("y = 2\n")
    import flatpeft.experiments.provenance as prov

    monkeypatch.setattr(prov, "_PACKAGE", pkg)
    first = provenance.source_sha256.__wrapped__()
    assert provenance.git_state.__wrapped__() == {"git_commit": None, "git_dirty": None}   # not in a repository
    monkeypatch.setattr(prov.shutil, "which", lambda name: None)                          # no git at all
    assert provenance.git_state.__wrapped__() == {"git_commit": None, "git_dirty": None}
    assert provenance.source_sha256.__wrapped__() == first
    (pkg / "sub" / "m.py").write_text("y = 3\n")
    assert provenance.source_sha256.__wrapped__() != first


# ------------------------------------------------------------------ compare --resume and other code
def test_resumed_compare_retrains_runs_of_other_code(tiny, tmp_path, capfd):
    out = tmp_path / "cmp"
    compare(tiny, ["base", "sam"], 1, out_dir=out, progress=False)
    sam_before = (out / "sam" / "seed0" / "eval.json").read_bytes()
    fake_old_code(out / "base" / "seed0")
    res = compare(tiny, ["base", "sam"], 1, out_dir=out, resume=True, progress=False)
    assert "base/seed0 was trained by other code (flatpeft" in capfd.readouterr().err
    for name in (".flatpeft-run.json", "eval.json"):   # retrained by the current code
        assert json.loads((out / "base" / "seed0" / name).read_text())["code"] == provenance.code_record()
    assert (out / "sam" / "seed0" / "eval.json").read_bytes() == sam_before   # the current code's run is kept
    assert list(res.runs["method"].astype(str)) == ["base", "sam"]
    label = provenance.code_label(provenance.code_record())
    assert f"Code: every run trained by {label} (the current code)." in res.markdown
    # a run that recorded no code at all counts as other code too
    fake_old_code(out / "sam" / "seed0", None)
    compare(tiny, ["base", "sam"], 1, out_dir=out, resume=True, progress=False)
    assert json.loads((out / "sam" / "seed0" / "eval.json").read_text())["code"] == provenance.code_record()


def test_keep_other_code_keeps_them_and_the_table_names_every_version(tiny, tmp_path):
    out = tmp_path / "cmp"
    compare(tiny, ["base", "sam"], 2, out_dir=out, progress=False)
    fake_old_code(out / "base" / "seed1")
    fake_old_code(out / "sam" / "seed1", None)
    before = {r: (out / r / "eval.json").read_bytes() for r in ("base/seed1", "sam/seed1")}
    res = compare(tiny, ["base", "sam"], 2, out_dir=out, resume=True, keep_other_code=True, progress=False)
    assert {r: (out / r / "eval.json").read_bytes() for r in before} == before          # kept, not retrained
    assert len(res.runs) == 4
    md = (out / "results.md").read_text()
    assert "**Code: runs of 3 code versions in this table** (kept with --keep-other-code" in md
    assert f"* {provenance.code_label(provenance.code_record())} (the current code): base seed 0, sam seed 0" in md
    assert "git 1111111" in md and "source 000000000000" in md and md.count(": base seed 1") == 1
    assert f"* {provenance.NOT_RECORDED}: sam seed 1" in md
    with pytest.raises(ValueError, match="--keep-other-code .* with --resume"):
        compare(tiny, ["base"], 1, out_dir=tmp_path / "other", keep_other_code=True, progress=False)


# ------------------------------------------------------------------ issue 20 item 3: data changed in place
def test_resumed_compare_refuses_runs_trained_on_other_data(tiny, tmp_path):
    out = tmp_path / "cmp"
    compare(tiny, ["base"], 1, out_dir=out, progress=False)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
              and not p.name.endswith("flatpeft-lock")}
    train = Path(tiny.data.train)
    df = pd.read_csv(train)
    df["label"] = df["label"].map({"great": "other", "other": "great"})   # flip every label, in place
    df.to_csv(train, index=False)
    with pytest.raises(ValueError) as err:
        compare(tiny, ["base"], 2, out_dir=out, resume=True, progress=False)
    msg = str(err.value)
    assert "data differ" in msg and f"data.train ({train}" in msg and "base/seed0" in msg and "--overwrite" in msg
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
            and not p.name.endswith("flatpeft-lock")} == before                       # nothing trained or rewritten
    with pytest.raises(ValueError, match="data differ"):                              # keeping other code: still no
        compare(tiny, ["base"], 2, out_dir=out, resume=True, keep_other_code=True, progress=False)
    res = compare(tiny, ["base"], 2, out_dir=out, overwrite=True, progress=False)     # asked for: redone on the new file
    new = json.loads((out / "base" / "seed0" / "eval.json").read_text())["data_sha256"]["train"]
    assert len(res.runs) == 2 and new == __import__("hashlib").sha256(train.read_bytes()).hexdigest()


# ------------------------------------------------------------------ issue 20 item 4: preference --resume
def test_preference_resume_refuses_other_task_args_and_data_and_retrains_other_code(tiny, tmp_path):
    from flatpeft.analysis.preference import run_preference

    out = tmp_path / "pref"
    kw = dict(fractions=(1.0,), seeds=1, out_dir=out, eig_ncv=4, progress=False)
    run_preference(tiny, **kw)
    runs = ("base/base/seed0", "flatpo-top-1/flatpo/seed0")
    before = {r: (out / r / "eval.json").read_bytes() for r in runs}
    noisy = copy.deepcopy(tiny)
    noisy.task_args = {"label_noise": 0.3}
    with pytest.raises(ValueError, match=r"task_args.label_noise \('<unset>' -> 0.3\)"):
        run_preference(noisy, resume=True, **kw)
    train = Path(tiny.data.train)
    train.write_text(train.read_text().replace(",great\n", ",other\n", 1))   # one label changed in place
    with pytest.raises(ValueError, match="data.train"):
        run_preference(tiny, resume=True, **kw)
    with pytest.raises(ValueError, match="data.train"):
        run_preference(tiny, resume=True, keep_other_code=True, **kw)
    assert {r: (out / r / "eval.json").read_bytes() for r in runs} == before
    F.make_sentiment_files(tmp_path / "fx" / "data")                            # the original file again
    fake_old_code(out / "base" / "base" / "seed0")
    res = run_preference(tiny, resume=True, keep_other_code=True, **kw)        # kept, and named
    assert (out / "base" / "base" / "seed0" / "eval.json").read_bytes() != before["base/base/seed0"]  # (faked)
    assert json.loads((out / "base" / "base" / "seed0" / "eval.json").read_text())["code"]["source_sha256"] == OLD
    md = (out / "preference.md").read_text()
    assert "runs of 2 code versions" in md and "source 000000000000" in md
    res = run_preference(tiny, resume=True, **kw)                              # default: retrained
    assert json.loads((out / "base" / "base" / "seed0" / "eval.json").read_text())["code"] == provenance.code_record()
    assert (out / "flatpo-top-1" / "flatpo" / "seed0" / "eval.json").read_bytes() == before["flatpo-top-1/flatpo/seed0"]
    assert [r["label"] for r in res.runs] == ["base", "flatpo-top-1"]
    assert "Code: every run trained by" in (out / "preference.md").read_text()


# ------------------------------------------------------------------ the suite: the page names its code; --reproduce
def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("flatpeft-lock")}


def test_suite_page_names_the_code_and_keep_other_code(tmp_path, capsys):
    from test_suite import _plan

    from flatpeft.cli import main

    plan = _plan(tmp_path, seeds=1)
    assert main(["--quiet", "suite", str(plan)]) == 0
    label = provenance.code_label(provenance.code_record())
    page = (tmp_path / "results.md").read_text()
    assert f"**Code.** This page was written by {label}. Every run behind its tables (4) was trained by that code." in page
    assert f"Code: every run of this table was trained by {label} (the code that wrote this page)." in page
    assert "Reproducibility (text_classification): bit for bit on the same machine with the same torch thread count" in page
    runs = tmp_path / "runs"
    fake_old_code(runs / "tiny_noisy" / "sam" / "seed0")
    kept = (runs / "tiny_noisy" / "sam" / "seed0" / "eval.json").read_bytes()
    assert main(["--quiet", "suite", str(plan), "--keep-other-code"]) == 0
    assert (runs / "tiny_noisy" / "sam" / "seed0" / "eval.json").read_bytes() == kept
    page = (tmp_path / "results.md").read_text()
    assert "**Its runs were trained by 2 code version(s)**" in page and f"{label}: 3 run(s)" in page
    assert "Code: **the runs of this table were trained by 2 code versions** (kept with `--keep-other-code`):" in page
    assert "source 000000000000; " in page and ": sam seeds 0" in page
    assert "sam seed 0" in (runs / "tiny_noisy" / "results.md").read_text()          # the compare table says so too
    assert main(["--quiet", "suite", str(plan)]) == 0                                  # default: retrained
    assert json.loads((runs / "tiny_noisy" / "sam" / "seed0" / "eval.json").read_text())["code"] == \
        provenance.code_record()
    assert "Every run behind its tables (4) was trained by that code." in (tmp_path / "results.md").read_text()


def test_suite_reproduce_passes_and_fails_on_a_tampered_metric(tmp_path, capsys):
    from test_suite import _plan

    from flatpeft.cli import main

    plan = _plan(tmp_path, seeds=2)
    assert main(["--quiet", "suite", str(plan)]) == 0
    runs = tmp_path / "runs"
    before = _tree(runs)
    capsys.readouterr()
    scratch = tmp_path / "scratch"
    assert main(["--quiet", "suite", str(plan), "--reproduce", "--scratch", str(scratch)]) == 0
    out = capsys.readouterr().out
    assert "reproduce: 4 run(s) of 2 compare directories" in out and "(1 seed(s) per method)" in out
    assert "| accuracy | 0 | " in out and "| final_loss | 0 | " in out and "time_per_step" not in out
    assert "reproduce: passed: every metric of 4 run(s) within 1e-06" in out
    assert _tree(runs) == before                                                  # nothing written under the runs
    reproduced = json.loads((scratch / "tiny_noisy" / "sam" / "seed0" / "eval.json").read_text())
    assert reproduced["accuracy"] == json.loads((runs / "tiny_noisy" / "sam" / "seed0" / "eval.json").read_text())[
        "accuracy"]
    assert main(["--quiet", "suite", str(plan), "--reproduce", "--scratch", str(scratch)]) == 2   # not empty: refused
    assert "--scratch" in capsys.readouterr().err

    path = runs / "tiny_noisy" / "sam" / "seed0" / "eval.json"
    data = json.loads(path.read_text())
    data["accuracy"] += 0.05                                                       # a tampered recorded metric
    path.write_text(json.dumps(data))
    assert main(["--quiet", "suite", str(plan), "--reproduce"]) == 1
    out = capsys.readouterr().out
    assert "reproduce: FAILED: 1 difference(s)" in out and "tiny_noisy/sam/seed0: accuracy recorded" in out
    assert "| accuracy | 0.05 | tiny_noisy/sam/seed0 |" in out
    # --sample 2 retrains both seeds of every method (8 runs); a seed 1 metric is tampered too
    path = runs / "tiny_noisy" / "base" / "seed1" / "eval.json"
    data = json.loads(path.read_text())
    data["final_loss"] *= 1.001
    path.write_text(json.dumps(data))
    assert main(["--quiet", "suite", str(plan), "--reproduce", "--sample", "2", "--tasks", "tiny_noisy"]) == 1
    out = capsys.readouterr().out
    assert "reproduce: 8 run(s)" in out and "tiny_noisy/base/seed1: final_loss recorded" in out


# ------------------------------------------------------------------ multimodal: the cached pre-alignment is data
@pytest.mark.parametrize("config,prefix", [("clip_fewshot.yaml", "clip_prealign_"), ("vlm_instruct.yaml", "vlm_prealign_")])
def test_cached_prealignment_is_hashed_like_a_data_file(config, prefix, tmp_path, monkeypatch):
    """The pre-aligned projections every multimodal run starts from are cached once, keyed by their settings
    only: their sha256 is recorded and compared like a data file's, so a rebuilt cache is never mixed."""
    import hashlib

    from flatpeft.experiments.config import load_config
    from flatpeft.experiments.runner import data_hashes
    from flatpeft.experiments.tasks import get_task

    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / config)
    task_cls = get_task(cfg.task)
    from flatpeft.experiments.config import parse_dataclass

    settings = task_cls.prealign_settings(cfg, parse_dataclass(task_cls.args_cls, cfg.task_args, "task_args."))
    path = tmp_path / "cache" / "multimodal" / f"{prefix}{settings.key()}.safetensors"
    assert task_cls.data_paths(cfg) == {"prealign": path} and data_hashes(cfg) == {}   # not built yet: no hash
    path.parent.mkdir(parents=True)
    path.write_bytes(b"projections")
    assert task_cls.data_paths(cfg) == {"prealign": path}
    assert data_hashes(cfg) == {"prealign": hashlib.sha256(b"projections").hexdigest()}
    cfg.task_args = {**cfg.task_args, "prealign_steps": 7}                            # another pre-alignment
    assert data_hashes(cfg) == {}


def test_resume_refuses_a_rebuilt_or_missing_cache_of_starting_weights(tiny, tmp_path):
    """A task whose runs start from a cached file (as the multimodal pre-alignment): resume compares the file's
    sha256; a file the runs recorded that is absent now (to be rebuilt) is refused in compare, not on the page."""
    from flatpeft.experiments.runner import _run_config, _valid_runs, _with_method, run_dir_for
    from flatpeft.experiments.tasks import TASKS, register_task
    from flatpeft.experiments.text_classification import TextClassificationTask

    cache = tmp_path / "cache.bin"

    @register_task("tiny_cached_start")
    class CachedStart(TextClassificationTask):
        @classmethod
        def data_paths(cls, cfg):
            return {**super().data_paths(cfg), "prealign": cache}

    try:
        cfg = copy.deepcopy(tiny)
        cfg.task = "tiny_cached_start"
        cache.write_bytes(b"weights A")
        out = tmp_path / "cmp"
        compare(cfg, ["base"], 1, out_dir=out, progress=False)
        recorded = json.loads((out / "base" / "seed0" / "eval.json").read_text())["data_sha256"]
        assert set(recorded) == {"train", "test", "prealign"}
        cache.unlink()
        with pytest.raises(ValueError, match=r"data.prealign \(.*cache.bin: .* the file does not exist now"):
            compare(cfg, ["base"], 2, out_dir=out, resume=True, progress=False)
        plan = {("base", 0): _run_config(_with_method(cfg, "base"), 0, run_dir_for(out, "base", 0))}
        assert len(_valid_runs(plan, out, keep_other_code=True, strict_data=False)) == 1   # the page still shows it
        cache.write_bytes(b"weights B")                                                   # rebuilt: other bytes
        with pytest.raises(ValueError, match=r"data differ .* data.prealign"):
            compare(cfg, ["base"], 2, out_dir=out, resume=True, progress=False)
        assert _valid_runs(plan, out, keep_other_code=True, strict_data=False) == []
        cache.write_bytes(b"weights A")
        assert len(compare(cfg, ["base"], 2, out_dir=out, resume=True, progress=False).runs) == 2
    finally:
        TASKS.pop("tiny_cached_start", None)
