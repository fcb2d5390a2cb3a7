"""The ``flatpeft`` command: every sub-command (including --help), errors, plug-in registration."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from flatpeft import cli
import _fixtures as F
from flatpeft.experiments.config import load_config, save_config

SUBCOMMANDS = [["train"], ["eval"], ["compare"], ["data"], ["data", "prepare"], ["data", "verify"], ["config"], ["methods"],
               ["tasks"]]


pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = F.tiny_config(d, train={"steps": 4, "log_every": 2})
    return save_config(cfg, d / "tiny.yaml")


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("sub", [[]] + SUBCOMMANDS, ids=lambda s: " ".join(s) or "top")
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flatpeft") and ("options:" in out or "optional arguments:" in out)


def test_help_lists_all_builtin_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("train", "eval", "compare", "data", "config", "methods", "tasks"):
        assert name in out


def test_python_dash_m_and_console_script():
    res = subprocess.run([sys.executable, "-m", "flatpeft", "methods"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "base" and "flatpo" in res.stdout
    import shutil

    exe = shutil.which("flatpeft", path=str(Path(sys.executable).parent))
    if exe is not None:  # installed (pip install -e .): the console script is flatpeft.cli:main
        res = subprocess.run([exe, "compare", "--help"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.startswith("usage: flatpeft compare")


def test_train_eval_and_overwrite_protection(config_file, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(["--quiet", "train", config_file, "--output-dir", out_dir, "--set", "method.name=sam",
                        "--set", "method.rho=0.02"], capsys)
    assert code == 0
    metrics = json.loads(out)
    assert metrics["method"] == "sam" and json.loads((out_dir / "eval.json").read_text()) == metrics
    resolved = load_config(out_dir / "config.yaml")
    assert resolved.method == {"name": "sam", "rho": 0.02} and resolved.train.steps == 4

    code, out, _ = run(["eval", out_dir, "--splits", "test,train"], capsys)
    assert code == 0
    again = json.loads(out)
    assert again["accuracy"] == metrics["accuracy"] and again["train_accuracy"] == metrics["train_accuracy"]

    small = tmp_path / "small.csv"
    pd.read_csv(resolved.data.test).iloc[:6].to_csv(small, index=False)
    code, out, _ = run(["eval", out_dir, "--data", small], capsys)
    assert code == 0 and 0 <= json.loads(out)["accuracy"] <= 1

    code, _, err = run(["--quiet", "train", config_file, "--output-dir", out_dir], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    code, _, _ = run(["--quiet", "train", config_file, "--output-dir", out_dir, "--overwrite"], capsys)
    assert code == 0 and json.loads((out_dir / "eval.json").read_text())["method"] == "base"


def test_compare_command_writes_tables(config_file, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, out, err = run(["--quiet", "compare", config_file, "--methods", "base,sam", "--seeds", "2",
                          "--output-dir", out_dir, "--set", "train.steps=2"], capsys)
    assert code == 0, err
    assert "| method |" in out and "| sam |" in out
    csv = pd.read_csv(out_dir / "results.csv")
    assert list(csv["method"]) == ["base", "sam"] and set(csv["n_seeds"]) == {2}
    assert (out_dir / "results.png").stat().st_size > 1000
    code, _, err = run(["--quiet", "compare", config_file, "--methods", "base,sam", "--seeds", "2",
                        "--output-dir", out_dir], capsys)
    assert code == 2 and "--overwrite" in err
    # case 1: resuming with a setting that changes the runs is refused, naming the key; nothing is rewritten
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file() and "lock" not in p.name}
    code, _, err = run(["--quiet", "compare", config_file, "--methods", "base", "--seeds", "0,1", "--resume",
                        "--output-dir", out_dir], capsys)
    assert code == 2 and "train.steps (2 -> 4)" in err and "base/seed0" in err
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file() and "lock" not in p.name} == before
    code, _, err = run(["--quiet", "compare", config_file, "--methods", "base", "--seeds", "0,1", "--resume",
                        "--output-dir", out_dir, "--set", "train.steps=2"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("argv, needles", [
    (["train", "{cfg}", "--set", "train.stepz=3"], ["train.stepz", "steps"]),
    (["train", "{dir}/absent.yaml"], ["absent.yaml", "does not exist"]),
    (["train", "{cfg}", "--set", "data.train={dir}/gone.csv"], ["data.train", "gone.csv"]),
    (["train", "{cfg}", "--set", "data.label_column=stars"], ["'stars'", "columns: text, label"]),
    (["train", "{cfg}", "--set", "method.name=adamw"], ["method.name", "'adamw'"]),
    (["compare", "{cfg}", "--seeds", "x"], ["--seeds"]),
    (["eval", "{dir}"], ["config.yaml"]),
])
def test_user_errors_exit_2_with_a_named_cause(argv, needles, config_file, tmp_path, capsys):
    argv = [a.format(cfg=config_file, dir=tmp_path) for a in argv]
    code, _, err = run(["--quiet", *argv, "--output-dir", tmp_path / "o"] if argv[0] != "eval" else argv, capsys)
    assert code == 2
    assert err.startswith("flatpeft: error:")
    for needle in needles:
        assert needle in err


def test_config_command_prints_resolved_yaml(config_file, capsys):
    code, out, _ = run(["config", config_file, "--set", "train.lr=2e-3"], capsys)
    assert code == 0
    import yaml

    assert yaml.safe_load(out)["train"]["lr"] == 2e-3


def test_data_prepare_calls_assets(monkeypatch, capsys):
    import flatpeft.assets as assets

    calls = []
    monkeypatch.setattr(assets, "prepare", lambda names=None, force=False: calls.append((names, force)) or
                        {n: Path("/cache") / n for n in (names or ["all"])})
    code, out, _ = run(["data", "prepare", "--only", "finefoods,minilm", "--force"], capsys)
    assert code == 0 and calls == [(["finefoods", "minilm"], True)]
    assert "finefoods: /cache/finefoods" in out
    run(["data", "prepare"], capsys)
    assert calls[-1] == (None, False)


def test_plugins_register_subcommands(monkeypatch, capsys):
    mod = types.ModuleType("_flatpeft_test_plugin")

    def register_cli(sub):
        p = sub.add_parser("hello", help="test plug-in")
        p.add_argument("--name", default="x")
        p.set_defaults(func=lambda args: print(f"hi {args.name}") or 0)

    mod.register_cli = register_cli
    monkeypatch.setitem(sys.modules, "_flatpeft_test_plugin", mod)
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ["_flatpeft_test_plugin", "_flatpeft_not_installed_plugin"])
    code, out, err = run(["hello", "--name", "bob"], capsys)
    assert code == 0 and out.strip() == "hi bob" and "warning" not in err


def test_output_into_a_closed_pipe_exits_quietly():
    """`flatpeft methods --markdown | head`: the reader closes the pipe; flatpeft exits 141 (SIGPIPE's
    shell status) with nothing on stderr instead of a BrokenPipeError traceback."""

    r, w = os.pipe()
    os.close(r)  # the reader has gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "flatpeft", "methods", "--markdown"], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
