"""Multi-process checks of the engine: 2 CPU processes (gloo), a tiny peft-LoRA Llama (tests/dist_worker.py).

* FSDP2 (``fully_shard`` on each decoder layer and the model) and DDP: for every method, 3 optimizer steps with each
  rank on half of the batch equal one process on the whole batch to float32 tolerance, and the ranks hold the
  same full weights.
* flat-lora-random's per-rank noise: ranks draw different noise with ``per_rank_noise=True`` and the same with
  False (the equivalence runs use False: one process on the whole batch has one noise draw).
* Distributed checkpoints (``torch.distributed.checkpoint``, get/set_optimizer_state_dict, sharded save): resuming
  equals the uninterrupted run bit for bit, under FSDP2 with 2 processes and in one process.

One launch of 2 processes runs all multi-process checks (about 40 s of work on 2 idle cores); it has a hard
timeout after which both processes are killed, and they are killed whatever happens to the test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flatpeft

from conftest import loss_of, make_lora_mlp

pytest.importorskip("transformers")
pytest.importorskip("peft")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 240
TOL = 2e-6  # float32: the sharded sums are added in another order than one process's
METHODS = list(flatpeft.METHODS)
EXTRA = ["flatpo-random", "sam-every2", "flat-lora-layer"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, tasks: str, world: int = 2, timeout: float = TIMEOUT_S, worker: Path = WORKER) -> list[dict]:
    """Run ``world`` worker processes (arguments ``out`` and the words of ``tasks``); kill them all on timeout or
    error; return each rank's JSON (``rank{r}.json``) when ``worker`` is the engine worker."""
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    procs = []
    logs = []
    try:
        for rank in range(world):
            log = open(out / f"log{rank}.txt", "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(worker), str(out), *tasks.split()],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-process check exceeded {timeout} s (logs in {out})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for log in logs:
            log.close()
    results = []
    for rank in range(world):
        text = (out / f"log{rank}.txt").read_text()[-4000:]
        assert procs[rank].returncode == 0, f"rank {rank} failed (exit {procs[rank].returncode}):\n{text}"
        path = out / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("dist"), "fsdp2,ddp,noise,dcp")


@pytest.mark.parametrize("label", METHODS + EXTRA)
def test_fsdp2_equals_one_process_on_the_global_batch(runs, label):
    r0, r1 = (r["fsdp2"][label] for r in runs)
    assert r0["max_diff"] < TOL and r1["max_diff"] < TOL, (r0, r1)
    assert r0["digest"] == r1["digest"]  # the ranks' full weights agree
    if label != "base":  # the method does something the test can see
        assert r0["ref_vs_base"] > 100 * TOL, r0


@pytest.mark.parametrize("method", METHODS)
def test_ddp_equals_one_process_on_the_global_batch(runs, method):
    r0, r1 = (r["ddp"][method] for r in runs)
    assert r0["max_diff"] < TOL and r1["max_diff"] < TOL, (r0, r1)
    assert r0["digest"] == r1["digest"]


def test_per_rank_noise_differs_between_ranks_under_fsdp2(runs):
    n0, n1 = (r["noise"] for r in runs)
    assert n0["True"] != n1["True"]
    assert n0["False"] == n1["False"]


def test_element_granularity_is_refused_under_fsdp2(runs):
    for r in runs:
        assert "granularity='element'" in r["noise"]["element_error"] and "FSDP2" in r["noise"]["element_error"]
        assert r["noise"]["element_restored"] == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_dcp_resume_under_fsdp2_is_exact(runs, method):
    for r in runs:
        assert r["dcp"][method]["equal"], r["dcp"][method]
        assert r["dcp"][method]["step_after_load"] == 2


# ----------------------------------------------------------------------------------------- one process
KW = {"eflat-lora": {"total_steps": 6}, "flat-lora": {"total_steps": 6}, "flat-lora-random": {"total_steps": 6},
      "spider": {"mask_scope": "all"}, "flatpo-lagged": {"refresh_every": 2}, "nbar": {"total_steps": 6},
      "obar": {"total_steps": 6}}


def _batches(n):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        opt.step(lambda x=x, y=y: (lambda l: (l.backward(), l)[1])(loss_of(model, x, y)))


@pytest.mark.parametrize("method", METHODS)
def test_dcp_resume_in_one_process_is_exact(tmp_path, method):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    warnings.simplefilter("ignore")
    data = _batches(4)
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, method, lr=0.05, seed=3, **KW.get(method, {}))
    _train(model, opt, data[:2])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=str(tmp_path / "ckpt"))
    _train(model, opt, data[2:])

    fresh = make_lora_mlp(seed=9)
    opt2 = flatpeft.create_optimizer(fresh, method, lr=0.05, seed=3, **KW.get(method, {}))
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    assert opt2.step_count == 2
    _train(fresh, opt2, data[2:])
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(fresh.named_parameters())[n]), n


def test_state_dict_keys_map_to_parameter_names():
    """The optimizer state of ``get_optimizer_state_dict`` is keyed by parameter names only (no extra entry), with
    flatpeft's buffers inside the parameter entries, the step counter in the groups, and buffer dtypes kept."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "eflat-lora", lr=0.05, total_steps=4)
    _train(model, opt, _batches(1))
    osd = get_optimizer_state_dict(model, opt)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(osd["state"]) <= names
    b_entries = [v for k, v in osd["state"].items() if "lora_B" in k]
    assert b_entries and all({"flatpeft.ema", "exp_avg"} <= set(v) and "flatpeft.lagged" not in v for v in b_entries)
    assert all(g["flatpeft_step"] == 1 for g in osd["param_groups"])


def test_fresh_optimizer_state_dict_is_a_complete_template():
    """A fresh optimizer's state dict already holds every buffer the method will save (what DCP loads into), and
    taking it does not step the method (DCP's zero-lr initialisation step only runs the base optimizer)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_lora_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = flatpeft.create_optimizer(model, "spider", mask_scope="all", lr=0.05)
    osd = get_optimizer_state_dict(model, opt)
    assert opt.step_count == 0
    assert all({"flatpeft.theta0", "flatpeft.importance_pre", "flatpeft.grad_sum"} <= set(v) for v in osd["state"].values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="must perturb"):
        flatpeft.create_optimizer(make_lora_mlp(), "sam", lr=0.05).step()  # a real closure-less misuse still errors


# ------------------------------------------------------------------------------------- Trainer, 2 ranks
TRAINER_WORKER = Path(__file__).with_name("trainer_dist_worker.py")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for mode, methods in (("fsdp2", "sam,eflat-lora,flat-lora-random"), ("ddp", "sam,eflat-lora")):
        directory = tmp_path_factory.mktemp(f"trainer-{mode}")
        launch(directory, f"{mode} {methods}", worker=TRAINER_WORKER)
        out[mode] = [json.loads((directory / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
    return out


@pytest.mark.parametrize("mode,method", [("fsdp2", "sam"), ("fsdp2", "eflat-lora"), ("fsdp2", "flat-lora-random"),
                                         ("ddp", "sam"), ("ddp", "eflat-lora")])
def test_trainer_resume_is_exact_under_fsdp2_and_ddp(trainer_runs, mode, method):
    """SharpnessAwareTrainer, accelerate FSDP2 (fsdp_version 2) or DDP, gradient accumulation 2, bf16: resuming from
    the step-2 checkpoint gives the uninterrupted run's weights bit for bit, on both ranks."""
    for r in trainer_runs[mode]:
        assert r[method]["fsdp"] == (mode == "fsdp2")
        assert r[method]["equal"], r[method]
        assert r[method]["step"] == 4
