"""Fault injection: ``flatpeft compare`` killed with SIGKILL at several points, then resumed.

A child process runs the real CLI with one fault armed: SIGKILL itself in the middle of a run (at the N-th
loss evaluation), half-way through writing a table, or right after a finished run was swapped into place.
After every kill and at the end the test checks that every run that had finished is byte-identical, that the
tables are whole (never truncated) and list only finished runs, and that nothing outside the compare
directory changed. Each child has a hard timeout and is killed with its process group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import _fixtures as F
from flatpeft.experiments.config import save_config

CHILD = textwrap.dedent('''
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from flatpeft import cli
    from flatpeft.experiments import rundir
    from flatpeft.experiments.text_classification import TextClassificationTask

    fault, at = sys.argv[1].split(":")
    at = int(at)
    count = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hit():
        count[0] += 1
        return count[0] == at

    if fault == "train":  # in the middle of a run
        loss = TextClassificationTask.loss
        TextClassificationTask.loss = lambda self, model, batch: die() if hit() else loss(self, model, batch)
    elif fault == "table":  # half-way through writing results.md
        write = rundir.write_atomic
        def torn(path, data):
            if str(path).endswith("results.md") and hit():
                with open(str(path) + ".flatpeft-tmp", "w") as fh:
                    fh.write(data[: len(data) // 2])
                die()
            return write(path, data)
        rundir.write_atomic = torn
    elif fault == "swap":  # a run just swapped into place, tables not yet rewritten
        swap = rundir._swap
        def swapped(new, run_dir):
            swap(new, run_dir)
            if hit():
                die()
        rundir._swap = swapped
    sys.exit(cli.main(["--quiet", "compare", *sys.argv[2:]]))
''')

METHODS = ["base", "sam"]


def _child(root: Path, fault: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run the child with a hard timeout; its whole process group is killed if it outlives it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(root / "child.py"), fault, *argv], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"compare child with fault {fault} timed out")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _finished_runs(out: Path) -> dict[str, dict[str, bytes]]:
    """Every finished run (manifest says finished, eval.json present) with the bytes of all its files."""
    from flatpeft.experiments.rundir import is_finished

    return {str(d.relative_to(out)): _snapshot(d) for d in sorted(out.glob("*/seed*")) if is_finished(d)}


def _check_tables(out: Path, finished: dict[str, dict[str, bytes]]) -> None:
    """results.md / results.csv are whole and count exactly the finished runs (no temporary file is read)."""
    if not (out / "results.md").exists():
        assert not finished or len(finished) == 1  # killed before the first table write
        return
    md = (out / "results.md").read_text()
    assert md.endswith("\n") and md.startswith("# flatpeft compare")
    csv = pd.read_csv(out / "results.csv")
    counted = dict(zip(csv["method"], csv["n_seeds"]))
    on_disk = {m: sum(1 for k in finished if k.startswith(f"{m}/")) for m in METHODS}
    for method, n in counted.items():
        assert n <= on_disk[method]  # a table never shows a run that is not on disk
        assert f"| {method} | {n} |" in md
    assert sum(counted.values()) >= len(finished) - 1  # at most the run finished just before the kill is missing


def test_compare_survives_sigkill_anywhere(tmp_path):
    root = tmp_path
    cfg = F.tiny_config(root / "setup", train={"steps": 3, "log_every": 1})
    save_config(cfg, root / "cfg.yaml")
    (root / "child.py").write_text(CHILD)
    out = root / "cmp"
    argv = [str(root / "cfg.yaml"), "--methods", ",".join(METHODS), "--seeds", "2", "--output-dir", str(out)]
    outside = {k: v for k, v in _snapshot(root).items() if not k.startswith("cmp")}

    # base: 3 loss calls a run, sam: 6 (two passes). Runs in order: base0, sam0, base1, sam1. A resumed compare
    # writes the tables once at its start, then after every run.
    faults = [("train:11", []),  # during base seed 1 (two runs finished)
              ("table:2", ["--resume"]),  # tearing results.md after base seed 1 finished
              ("swap:1", ["--resume"])]  # sam seed 1 swapped in, tables not yet rewritten
    seen: dict[str, dict[str, bytes]] = {}
    for fault, extra in faults:
        res = _child(root, fault, argv + extra)
        assert res.returncode == -signal.SIGKILL, (fault, res.returncode, res.stderr[-3000:])
        finished = _finished_runs(out)
        for name, files in seen.items():
            assert finished[name] == files, f"{name} changed after the kill at {fault}"
        seen.update(finished)
        _check_tables(out, finished)
        if fault.startswith("table"):  # the kill did tear the temporary file; results.md itself is whole
            assert (out / "results.md.flatpeft-tmp").read_text() != (out / "results.md").read_text()
    assert len(seen) == 4, sorted(seen)

    res = _child(root, "none:0", argv + ["--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    finished = _finished_runs(out)
    assert finished == seen  # every finished run byte-identical, none redone
    csv = pd.read_csv(out / "results.csv")
    assert list(csv["method"]) == METHODS and list(csv["n_seeds"]) == [2, 2]
    _check_tables(out, finished)
    leftovers = [p.name for p in out.rglob("*") if "flatpeft-new" in p.name or "flatpeft-old" in p.name
                 or p.name.endswith("flatpeft-tmp")]
    assert not leftovers
    assert {k: v for k, v in _snapshot(root).items() if not k.startswith("cmp")} == outside
