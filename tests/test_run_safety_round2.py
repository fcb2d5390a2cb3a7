"""Runs never lie, round two (issue 20): the suite, analyze, assets, output directories and environment faults.

One test (or more) per case; each failed before the fix. Tiny BERT + synthetic reviews (``_fixtures``); the few
runs that train are two steps.
"""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

import _fixtures as F
from flatpeft import cli
from flatpeft.experiments.config import config_to_dict, save_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own directory: run against the old code, a plan without `page:` wrote the
    repository's docs/results.md (the bug these tests catch)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return F.tiny_config(tmp_path_factory.mktemp("tiny"), train={"steps": 2, "log_every": 1})


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return save_config(tiny, tmp_path_factory.mktemp("cfg") / "tiny.yaml")


def run(argv, capsys):
    code = cli.main(["--quiet", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (lock files excluded)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("flatpeft-lock")}


# ---- flatpeft suite ---------------------------------------------------------------------------------------
def _plan(tmp_path: Path, tiny_file: Path, **changes) -> Path:
    plan = {"output_dir": str(tmp_path / "runs"), "seeds": 1, "methods": ["base"], "threads": 1, "jobs": 1,
            "tasks": [{"name": "tiny", "config": str(tiny_file),
                       "ablations": [{"name": "rho", "method": "sam", "set": ["method.rho=0.1"]}]}]}
    for key, value in changes.items():
        if key.startswith("task_"):
            plan["tasks"][0][key[5:]] = value
        else:
            plan[key] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_suite_checks_every_unit_before_training_and_fails_loudly(tmp_path, tiny_file, capsys):
    """Issue 20, wrong result 1: an ablation with an unknown method was retried twice with 30 s sleeps and the
    suite exited 0 (74 s). Now the plan is checked up front: exit 2 at once, nothing trained."""
    plan = _plan(tmp_path, tiny_file, task_ablations=[{"name": "bad", "method": "nosuch"}])
    start = time.time()
    code, out, err = run(["suite", plan], capsys)
    assert code == 2 and time.time() - start < 20
    assert "unknown method 'nosuch'" in err and "tiny__bad" in err
    assert not list(tmp_path.glob("runs/**/eval.json")) and "retrying" not in out + err


def test_suite_unit_error_is_not_retried_and_exits_nonzero(tmp_path, tiny_file, capsys):
    """A unit that fails at run time (here: its directory holds a file flatpeft did not write) is final at
    once (no 30 s retries of a deterministic error), the page is still written, and the suite exits 2."""
    plan = _plan(tmp_path, tiny_file, task_ablations=[])
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "notes.txt").write_text("mine")
    start = time.time()
    code, out, err = run(["suite", plan], capsys)
    assert code == 2 and time.time() - start < 25
    assert "retrying" not in out + err and "notes.txt" in err and "did not finish" in err
    assert (tmp_path / "runs" / "results.md").is_file()
    assert (tmp_path / "runs" / "tiny" / "notes.txt").read_text() == "mine"
    log = json.loads((tmp_path / "runs" / "suite_log.json").read_text())
    assert log["invocations"][-1]["units"][0]["status"] == "error"


@pytest.mark.parametrize("task_name,abl_name", [("../../escaped_task", "a"), ("tiny", "../../escaped"),
                                                ("/tmp/abs", "a"), ("tiny", "x/y"), (".hidden", "a"), ("", "a")])
def test_suite_names_cannot_leave_the_output_dir(tmp_path, tiny_file, capsys, monkeypatch, task_name, abl_name):
    """Issue 20, wrong result 2: `name: ../../escaped_task` wrote runs outside output_dir (an ablation's landed
    in the working directory). Names must be plain identifiers; the error names the plan file and the key."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    plan = _plan(tmp_path, tiny_file, task_name=task_name,
                 task_ablations=[{"name": abl_name, "method": "sam"}])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run(["suite", plan, "--list"], capsys)
    assert code == 2 and str(plan) in err and ".name" in err and "plain name" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("change,key", [({"seeds": "abc"}, "seeds"), ({"jobs": "x"}, "jobs"),
                                        ({"methods": "base"}, "methods"), ({"task_set": "train.lr=0.1"}, "set"),
                                        ({"task_seeds": [0, "a"]}, "seeds"), ({"task_metrics": "accuracy"}, "metrics"),
                                        ({"task_enabled": "no"}, "enabled"), ({"threads": -1}, "threads"),
                                        ({"seeds": 0}, "seeds")])
def test_suite_plan_values_of_the_wrong_type_are_named(tmp_path, tiny_file, capsys, change, key):
    """Issue 20, tracebacks: `seeds: abc`, `jobs: x` gave tracebacks and a string where a list belongs was split
    into characters (methods 'b', 'a', 's', 'e'). Each is an error naming the plan file and the key."""
    plan = _plan(tmp_path, tiny_file, **change)
    code, out, err = run(["suite", plan, "--list"], capsys)
    assert code == 2 and str(plan) in err and f"{key}:" in err and "Traceback" not in err


def test_suite_corrupt_log_is_named_and_kept(tmp_path, tiny_file, capsys):
    plan = _plan(tmp_path, tiny_file)
    (tmp_path / "runs").mkdir()
    log = tmp_path / "runs" / "suite_log.json"
    log.write_text('{"invocations": [')
    code, out, err = run(["suite", plan, "--page-only"], capsys)
    assert code == 2 and str(log) in err and log.read_text() == '{"invocations": ['
    log.write_text('[1, 2]')
    code, out, err = run(["suite", plan, "--page-only"], capsys)
    assert code == 2 and str(log) in err and "not a suite log" in err


def test_suite_page_defaults_inside_output_dir_and_never_replaces_foreign_files(tmp_path, tiny_file, capsys,
                                                                                monkeypatch):
    """Issue 20, files lost 1: a plan without `page:` run in a project with its own docs/results.md overwrote it
    and its images. The default page is <output_dir>/results.md, and a page or plot flatpeft did not write is
    never replaced."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    own = {"docs/results.md": b"# My results\n", "docs/results/tiny.png": b"my plot"}
    for name, data in own.items():
        (tmp_path / name).write_bytes(data)
    plan = _plan(tmp_path, tiny_file)
    code, out, err = run(["suite", plan, "--page-only"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "results.md").read_text().startswith("# Results: every built-in task")
    assert all((tmp_path / name).read_bytes() == data for name, data in own.items())
    # an explicit page that is someone else's file is refused, nothing written
    code, out, err = run(["suite", plan, "--page-only", "--page", "docs/results.md"], capsys)
    assert code == 2 and "docs/results.md" in err and "not written by flatpeft" in err
    (tmp_path / "docs" / "results.md").unlink()
    code, out, err = run(["suite", plan, "--page-only", "--page", "docs/results.md"], capsys)
    assert code == 2 and "tiny.png" in err
    assert not (tmp_path / "docs" / "results.md").exists() and (tmp_path / "docs/results/tiny.png").read_bytes() == b"my plot"
    # a results.json beside the page that flatpeft did not write is refused too; a page flatpeft wrote is rewritten
    (tmp_path / "docs/results/tiny.png").unlink()
    (tmp_path / "docs" / "results.json").write_text('{"mine": 1}')
    code, out, err = run(["suite", plan, "--page-only", "--page", "docs/results.md"], capsys)
    assert code == 2 and "results.json" in err and not (tmp_path / "docs" / "results.md").exists()
    assert (tmp_path / "docs" / "results.json").read_text() == '{"mine": 1}'
    code, out, err = run(["suite", plan, "--page-only"], capsys)
    assert code == 0 and json.loads((tmp_path / "runs" / "results.json").read_text())["version"] == 1


# ---- flatpeft analyze ---------------------------------------------------------------------------------------
ANALYZE = ["--points-1d", "0", "--points-2d", "0", "--ascent-steps", "1", "--no-progress"]


def test_analyze_reads_the_run_config_as_strictly_as_eval(tmp_path, tiny_file, capsys):
    """Issue 20, wrong result 7: analyze filled defaults into a cut config.yaml that eval refuses."""
    out = tmp_path / "run"
    assert run(["train", tiny_file, "--output-dir", out], capsys)[0] == 0
    raw = yaml.safe_load((out / "config.yaml").read_text())
    del raw["peft"]["alpha"]
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    before = tree(out)
    code_eval, _, err_eval = run(["eval", out], capsys)
    code, _, err = run(["analyze", out, *ANALYZE], capsys)
    assert code_eval == code == 2 and "peft.alpha" in err_eval and "peft.alpha" in err and "incomplete" in err
    assert tree(out) == before


def test_analysis_files_belong_to_the_run(tmp_path, tiny_file, capsys):
    """Issue 20, wrong result 8: `train --overwrite` carried the old run's analysis files into the new run; and
    (issue 19) `compare --resume` refused a compare directory after `flatpeft analyze` of one of its runs."""
    out = tmp_path / "run"
    assert run(["train", tiny_file, "--output-dir", out], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run(["analyze", out, *ANALYZE], capsys)
    assert code == 0, err
    assert (out / "sharpness.json").is_file() and (out / "sharpness_elements.npz").is_file()
    manifest = json.loads((out / ".flatpeft-run.json").read_text())
    assert {"sharpness.json", "sharpness_elements.npz"} <= set(manifest["entries"])
    assert run(["train", tiny_file, "--output-dir", out, "--overwrite"], capsys)[0] == 0
    assert not (out / "sharpness.json").exists() and not (out / "sharpness_elements.npz").exists()
    assert (out / "notes.txt").read_text() == "mine"                # the user's file is kept

    cmp_dir = tmp_path / "cmp"
    argv = ["compare", tiny_file, "--methods", "base", "--seeds", "1", "--output-dir", cmp_dir]
    assert run(argv, capsys)[0] == 0
    seed0 = cmp_dir / "base" / "seed0"
    assert run(["analyze", seed0, *ANALYZE], capsys)[0] == 0
    before = tree(seed0)
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert tree(seed0) == before                                   # finished run kept, with its analysis
    assert run([*argv, "--overwrite"], capsys)[0] == 0
    assert not (seed0 / "sharpness.json").exists()


# ---- the asset cache ----------------------------------------------------------------------------------------
@pytest.fixture
def fake_finefoods(tmp_path, monkeypatch):
    """``prepare`` of Fine Foods, run for real, from an R data set stood in for by two small data frames (the
    Debian package needs the registry); the cache is ``tmp_path/cache``."""
    import pandas as pd

    import flatpeft.assets as assets

    def frames(root, names):
        make = lambda n: pd.DataFrame({"review": [f"review {i} good" for i in range(n)],
                                       "score": ["great" if i % 2 else "other" for i in range(n)],
                                       "product": [f"p{i % 7}" for i in range(n)]})
        return {"training_data": make(400), "testing_data": make(100)}

    monkeypatch.setattr(assets, "_r_package_dir", lambda *a: tmp_path)
    monkeypatch.setattr(assets, "read_r_lazyload", frames)
    monkeypatch.setattr(assets, "_HASHED", {}, raising=False)
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    assets.prepare(["finefoods"], progress=False)
    return tmp_path / "cache"


def _cut(path: Path, rows: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: rows + 1]))


def test_damaged_cache_file_is_never_recorded(fake_finefoods, tmp_path, monkeypatch, capsys):
    """Issue 20, wrong result 5: with test.csv cut and FLATPEFT_CACHE spelled through `..`, a load recorded the
    damaged file into the manifest (train reported the cut test set) and `data verify` then said ok."""
    import flatpeft.assets as assets

    manifest = (fake_finefoods / "manifests" / "finefoods.json").read_bytes()
    test_csv = fake_finefoods / "finefoods" / "test.csv"
    _cut(test_csv, 30)
    (tmp_path / "x").mkdir()
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "x" / ".." / "cache"))
    with pytest.raises(assets.AssetCorruptError, match="test.csv has .* bytes"):
        assets.finefoods_splits()
    code, out, err = run(["data", "verify", "--only", "finefoods"], capsys)
    assert code == 2 and "test.csv" in err
    assert (fake_finefoods / "manifests" / "finefoods.json").read_bytes() == manifest
    # without a manifest the cut copy is not recorded either: loads refuse, `data prepare` redoes it
    (fake_finefoods / "manifests" / "finefoods.json").unlink()
    with pytest.raises(assets.AssetCorruptError, match="no manifest"):
        assets.finefoods_splits()
    code, out, err = run(["data", "verify", "--only", "finefoods"], capsys)
    assert code == 2 and "no manifest" in err
    assets.prepare(["finefoods"], progress=False)
    assert len(test_csv.read_text().splitlines()) == 101
    files = lambda data: json.loads(data)["files"]
    assert files((fake_finefoods / "manifests" / "finefoods.json").read_bytes()) == files(manifest)
    assert run(["data", "verify", "--only", "finefoods"], capsys)[0] == 0


def test_corrupt_manifest_is_named(fake_finefoods, capsys):
    """Issue 20, wrong result 5: a corrupt manifest made `verify` print `not prepared` with exit 0."""
    import flatpeft.assets as assets

    path = fake_finefoods / "manifests" / "finefoods.json"
    path.write_text('{"asset": "finefoods", "root"')
    code, out, err = run(["data", "verify"], capsys)
    assert code == 2 and str(path) in err and "damaged" in err
    with pytest.raises(assets.AssetCorruptError, match="manifest"):
        assets.finefoods_splits()
    assets.prepare(["finefoods"], progress=False)                  # prepare redoes the asset and its manifest
    assert run(["data", "verify", "--only", "finefoods"], capsys)[0] == 0


def test_loads_hash_the_files_like_verify(fake_finefoods, monkeypatch):
    """Issue 20, wrong result 6: bytes changed in place (same size) were used by loads, which checked sizes
    only. A load now compares sha256 as verify does (once per process and file: an unchanged file is not
    hashed again)."""
    import flatpeft.assets as assets

    calls = []
    sha = assets._sha256
    monkeypatch.setattr(assets, "_sha256", lambda p: calls.append(Path(p).name) or sha(p))
    assets.finefoods_splits()
    assets.finefoods_splits()
    assert sorted(calls) == ["test.csv", "train.csv"]               # hashed once in this process
    test_csv = fake_finefoods / "finefoods" / "test.csv"
    data = bytearray(test_csv.read_bytes())
    data[-40:-20] = b"\0" * 20
    test_csv.write_bytes(bytes(data))
    with pytest.raises(assets.AssetCorruptError, match="test.csv has a different sha256"):
        assets.finefoods_splits()
    with pytest.raises(assets.AssetCorruptError, match="test.csv"):
        assets.verify(["finefoods"])


def test_package_asset_is_checked_against_its_pip_record(tmp_path, monkeypatch):
    """A pip package's model file changed in place before flatpeft first saw it is not recorded as good: the
    first manifest is written only after the files match the package's own RECORD hashes."""
    import base64
    import hashlib
    import importlib

    import flatpeft.assets as assets

    site = tmp_path / "site"
    pkg = site / "fakeminilm"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "config.json").write_text('{"model_type": "bert"}')
    (pkg / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    info = site / "fakeminilm-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeminilm\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("fakeminilm\n")
    rows = []
    for f in sorted(pkg.rglob("*")):
        if f.is_file():
            digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode()
            rows.append(f"{f.relative_to(site)},sha256={digest},{f.stat().st_size}")
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(assets, "MINILM_MODULE", "fakeminilm")
    monkeypatch.setattr(assets, "_HASHED", {}, raising=False)
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    weights = pkg / "model" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\0" * 4096 + good[4096:])                # zeroed in place, same size
    with pytest.raises(assets.AssetCorruptError, match="model.safetensors differs from the sha256 its pip package"):
        assets.minilm_path()
    assert not (tmp_path / "cache" / "manifests" / "minilm.json").exists()
    weights.write_bytes(good)
    assert assets.minilm_path() == pkg / "model"
    assert (tmp_path / "cache" / "manifests" / "minilm.json").is_file()


def test_cache_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cachefile"))
    code, out, err = run(["data", "verify"], capsys)
    assert code == 2 and "cachefile" in err and "is a file" in err
    code, out, err = run(["data", "prepare", "--only", "finefoods"], capsys)
    assert code == 2 and "cachefile" in err and "is a file" in err


# ---- output directories -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished run (trained once per module) and its files, copied fresh by :func:`_fresh_run`."""
    from flatpeft.experiments.runner import train_run

    out = tmp_path_factory.mktemp("finished") / "run"
    train_run(tiny, out_dir=out, progress=False)
    return out


def _fresh_run(finished_run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(finished_run, dest)
    return dest


def test_symlinked_run_dir_is_refused_and_left_whole(tmp_path, tiny_file, finished_run, capsys):
    """Issue 20, files lost 2: `train --overwrite --output-dir link_old` (a symlink to a run) renamed the link
    aside, put a real directory in its place, and every later run failed. A symlinked run dir is refused."""
    real = _fresh_run(finished_run, tmp_path / "real")
    link = tmp_path / "link_old"
    link.symlink_to(real)
    before = tree(real)
    for _ in range(2):
        code, out, err = run(["train", tiny_file, "--overwrite", "--output-dir", link], capsys)
        assert code == 2 and "symbolic link" in err and "link_old" in err
    assert link.is_symlink() and tree(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link_old", "real"]
    assert run(["train", tiny_file, "--overwrite", "--output-dir", real], capsys)[0] == 0    # the target works


@pytest.mark.parametrize("where", ["cache", "cache/sub", "cwd", "root", "home"])
def test_output_dir_that_flatpeft_must_not_own_is_refused(tmp_path, tiny_file, monkeypatch, capsys, where):
    """Issue 20, files lost 3 (an --output-dir inside the asset cache, later deleted by `data prepare --force`)
    and `--output-dir .` or `/`: refused before anything is written."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FLATPEFT_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cache": cache, "cache/sub": cache / "sub", "cwd": Path("."), "root": Path("/"),
              "home": Path("~")}[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for cmd in (["train", tiny_file], ["compare", tiny_file, "--methods", "base", "--seeds", "1"]):
        code, out, err = run([*cmd, "--output-dir", target], capsys)
        assert code == 2 and ("asset cache" in err or "itself" in err), err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ---- environment faults -------------------------------------------------------------------------------------
def test_disk_full_while_saving_is_one_named_line_and_keeps_the_old_run(tmp_path, tiny_file, finished_run,
                                                                        monkeypatch, capsys):
    """Issue 20: disk full printed a `SafetensorError ... os error 28` traceback. Injected here at the write
    function (the task's save, which writes through safetensors) as the exact error safetensors raises; a
    tmpfs would need root. The old run stays byte-identical and nothing half-written is left."""
    from safetensors import SafetensorError

    from flatpeft.experiments.text_classification import TextClassificationTask

    out = _fresh_run(finished_run, tmp_path / "run")
    before = tree(out)

    def full(self, directory):
        (Path(directory) / "adapter").mkdir(exist_ok=True)
        (Path(directory) / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 100)   # half a file
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(TextClassificationTask, "save", full)
    code, _, err = run(["train", tiny_file, "--overwrite", "--output-dir", out], capsys)
    assert code == 2 and "No space left on device" in err and str(out) in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("flatpeft: error")]) == 1
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == [".run.flatpeft-lock", "run"]


def test_atomic_write_failure_leaves_the_old_file(tmp_path, monkeypatch):
    from flatpeft.experiments import rundir

    path = tmp_path / "eval.json"
    rundir.write_json(path, {"a": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "fsync", no_space)
    with pytest.raises(OSError):
        rundir.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_real_file_system_faults_are_named(tmp_path, tiny_file, capsys):
    """A folder that cannot be written (/sys refuses even root), a name too long, a file where a folder is
    expected: each a one-line error naming the path, exit 2, no traceback."""
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path / ("n" * 300), "File name too long"), (tmp_path / "afile" / "run", "a file is where a directory")]
    try:  # /sys refuses new folders even to root: a real permission fault without chmod
        Path("/sys/flatpeft-probe").mkdir()
        Path("/sys/flatpeft-probe").rmdir()
    except OSError:
        cases.append((Path("/sys/flatpeft-test-run"), "choose a place you can write to"))
    for out, words in cases:
        code, _, err = run(["train", tiny_file, "--output-dir", out], capsys)
        assert code == 2 and words in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("flatpeft: error")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ---- leftovers of a kill ----------------------------------------------------------------------------------
def test_staging_with_only_a_temp_manifest_is_recovered(tmp_path, tiny_file, capsys):
    """Issue 20: a process killed while writing the first manifest left `.run.flatpeft-new` holding only the
    temporary manifest, and every later run failed until it was removed by hand."""
    staging = tmp_path / ".run.flatpeft-new"
    staging.mkdir()
    (staging / ".flatpeft-run.json.flatpeft-tmp").write_text('{"flatpeft": 1, "ent')
    code, _, err = run(["train", tiny_file, "--output-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    assert not staging.exists() and (tmp_path / "run" / "eval.json").is_file()


def test_old_run_half_removed_is_recovered(tmp_path, tiny_file, finished_run, capsys):
    """Issue 20: a process killed while removing a replaced run left `.run.flatpeft-old` (its manifest already
    gone), and every later `--overwrite` failed. Flatpeft's own leftovers are removed; a foreign file is kept."""
    import shutil

    out = _fresh_run(finished_run, tmp_path / "run")
    old = tmp_path / ".run.flatpeft-old"
    shutil.copytree(finished_run / "adapter", old / "adapter")
    (old / "metrics.jsonl").write_text("{}\n")                    # what rmtree had not reached yet
    code, _, err = run(["train", tiny_file, "--overwrite", "--output-dir", out], capsys)
    assert code == 0, err
    assert not old.exists() and (out / "eval.json").is_file()
    # a half-removed old run that holds a file flatpeft did not write is kept (and named when in the way)
    old.mkdir()
    (old / "mine.txt").write_text("mine")
    code, _, err = run(["train", tiny_file, "--overwrite", "--output-dir", out], capsys)
    assert (old / "mine.txt").read_text() == "mine"
    assert code == 2 and ".run.flatpeft-old" in err and "Traceback" not in err


def test_old_run_is_removed_manifest_last(tmp_path, finished_run, monkeypatch):
    """The removal of a replaced run deletes its manifest last, so a kill part-way leaves a leftover that is
    provably flatpeft's (fault injected: the removal stops after its first entry)."""
    from flatpeft.experiments import rundir

    old = _fresh_run(finished_run, tmp_path / ".run.flatpeft-old")
    run_dir = _fresh_run(finished_run, tmp_path / "run")
    calls = []
    rmtree = rundir.shutil.rmtree

    def killed(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            rmtree(path)
            raise KeyboardInterrupt("killed")
        return rmtree(path, *a, **k)

    monkeypatch.setattr(rundir.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.recover(run_dir)
    assert (old / ".flatpeft-run.json").is_file()
    rundir.recover(run_dir)
    assert not old.exists() and (run_dir / "eval.json").is_file()


def test_corrupt_compare_plan_is_named(tmp_path, tiny_file, capsys):
    plan = _plan(tmp_path, tiny_file, task_ablations=[])
    bad = tmp_path / "runs" / "tiny" / "compare_plan.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"failed": ')
    code, out, err = run(["suite", plan, "--page-only"], capsys)
    assert code == 2 and str(bad) in err and "damaged" in err


# ---- eval and preference ------------------------------------------------------------------------------------
def test_eval_after_the_run_config_or_data_changed_is_named(tmp_path, finished_run, capsys):
    """Issue 20: `eval` after the run's peft.r was edited, or after its train file gained a label, ended in a
    size-mismatch traceback."""
    import pandas as pd

    out = _fresh_run(finished_run, tmp_path / "run")
    cfg_path = out / "config.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    edited = {**raw, "peft": {**raw["peft"], "r": 8}}
    cfg_path.write_text(yaml.safe_dump(edited))
    code, _, err = run(["eval", out], capsys)
    assert code == 2 and "do not fit" in err and "peft.r" in err and "Traceback" not in err
    train = tmp_path / "train.csv"
    df = pd.read_csv(raw["data"]["train"])
    pd.concat([df, pd.DataFrame({"text": ["the box was odd"] * 12, "label": ["zzz"] * 12})]).to_csv(train, index=False)
    cfg_path.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "train": str(train)}}))
    code, _, err = run(["eval", out], capsys)
    assert code == 2 and "do not fit" in err and "gain a label" in err


def test_eval_of_a_run_without_a_test_set_names_evals_own_flags(tmp_path, tiny, capsys):

    cfg = config_to_dict(tiny)
    cfg["data"]["test"] = None
    cfg["train"]["eval_splits"] = ["val"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert run(["train", path, "--output-dir", out], capsys)[0] == 0
    code, _, err = run(["eval", out], capsys)
    assert code == 2 and "--data FILE" in err and "--splits val" in err and "train.eval_splits" not in err
    code, stdout, err = run(["eval", out, "--splits", "val"], capsys)
    assert code == 0 and "val_accuracy" in stdout


@pytest.mark.parametrize("change,words", [({"train": {"eval_splits": ["train"]}}, "train.eval_splits"),
                                          ({"data": {"test": None}, "train": {"eval_splits": ["val"]}},
                                           "train.eval_splits"),
                                          ({"data": {"test": None}}, "data.test")])
def test_preference_refuses_what_would_fail_after_training(tmp_path, tiny, capsys, change, words):
    """Issue 20: `preference` with eval_splits=[train] or without a test set trained every run and then failed
    with KeyError: 'accuracy'. Refused before anything trains."""
    cfg = config_to_dict(tiny)
    for section, values in change.items():
        cfg[section] = {**cfg[section], **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.time()
    code, _, err = run(["preference", path, "--fractions", "0.5", "--seeds", "1", "--output-dir",
                        tmp_path / "pref"], capsys)
    assert code == 2 and words in err and "Traceback" not in err and time.time() - start < 20
    assert not (tmp_path / "pref").exists()


KILL_CHILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from flatpeft import cli
from flatpeft.experiments import rundir

fault = sys.argv[1]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if fault == "first-manifest":  # killed while the first manifest of the staging folder is written
    write = rundir.write_atomic
    def torn(path, data):
        if str(path).endswith(rundir.RUN_MANIFEST):
            with open(str(path) + ".flatpeft-tmp", "w") as fh:
                fh.write(data[: len(data) // 2])
            die()
        return write(path, data)
    rundir.write_atomic = torn
elif fault == "remove-old":  # killed while the replaced run is removed, right after its manifest went
    old = os.path.join(os.path.dirname(sys.argv[-1]), ".run.flatpeft-old")
    unlink = os.unlink
    def killed(path, *a, **k):
        unlink(path, *a, **k)
        if os.path.basename(str(path)) == rundir.RUN_MANIFEST and os.path.isdir(old):
            die()
    os.unlink = killed
sys.exit(cli.main(["--quiet", "train", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("fault", ["first-manifest", "remove-old"])
def test_a_kill_never_blocks_the_next_run(tmp_path, tiny_file, finished_run, capsys, fault):
    """Fault injection (SIGKILL in a child running the real CLI): killed while writing the first manifest of
    the staging folder, or while removing the replaced run. The next run recovers what the kill left (issue 20:
    both used to block every later run until removed by hand) and no leftover remains."""
    import signal
    import subprocess
    import sys

    out = _fresh_run(finished_run, tmp_path / "run")
    (tmp_path / "child.py").write_text(KILL_CHILD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), fault, str(tiny_file), "--overwrite",
                           "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = {".run.flatpeft-new", ".run.flatpeft-old"} & {p.name for p in tmp_path.iterdir()}
    assert left, "the fault left nothing to recover"
    code, _, err = run(["train", tiny_file, "--overwrite", "--output-dir", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.flatpeft-lock", "child.py", "run"]
    assert (out / "eval.json").is_file() and json.loads((out / ".flatpeft-run.json").read_text())["state"] == "finished"


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    """Writers that take a file name (safetensors caches of the multimodal tasks, the compare plot) go through
    ``atomic_path``: a failing writer leaves the old file and no temporary file; a finished one replaces it."""
    from safetensors.torch import load_file, save_file

    from flatpeft.experiments.rundir import atomic_path

    path = tmp_path / "cache.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
    assert torch.equal(load_file(str(path))["x"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]
    with atomic_path(path) as tmp:
        save_file({"x": torch.ones(3)}, str(tmp))
    assert torch.equal(load_file(str(path))["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]
