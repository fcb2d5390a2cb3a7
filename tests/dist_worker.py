"""One rank of the multi-process engine checks (launched by tests/test_distributed.py, 2 CPU processes, gloo).

Usage: ``python tests/dist_worker.py OUT_DIR TASK[,TASK...]`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Tasks:

* ``fsdp2`` / ``ddp``: for every method, 3 optimizer steps of a tiny peft-LoRA Llama wrapped with ``fully_shard``
  (each decoder layer and the model) or ``DistributedDataParallel``, each rank on its half of the batch, against
  one process on the whole batch (computed on every rank without collectives). Records the largest difference of
  every weight (full tensors) and a digest of the weights to compare across ranks.
* ``noise``: flat-lora-random under FSDP2 with ``per_rank_noise`` True and False: the norm of each rank's noise;
  FlatPO's ``granularity="element"`` under FSDP2: the error and whether the weights were restored.
* ``dcp``: for every method under FSDP2, 2 steps, ``torch.distributed.checkpoint`` save of the model and optimizer
  (get_*_state_dict), 2 more steps; then a fresh model and optimizer loaded from the checkpoint (set_*_state_dict)
  run the same 2 steps; records whether the weights are bit-identical.

Writes ``OUT_DIR/rank{RANK}.json``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

import flatpeft

METHODS = {
    "base": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "flat-lora": {"rho": 0.05, "total_steps": 4},
    "eflat-lora": {"rho": 0.05, "total_steps": 4},
    "flat-lora-random": {"rho": 0.05, "per_rank_noise": False},
    "flatpo": {"rho": 0.05, "fraction": 0.5},
    "flatpo-lagged": {"rho": 0.05, "fraction": 0.5, "refresh_every": 2},
    "spider": {"mask_scope": "all"},
    "nbar": {"alpha": 20.0, "total_steps": 4},
    "obar": {"alpha": 0.2, "total_steps": 4},
}
EXTRA = {  # further settings that take other code paths
    "flatpo-random": ("flatpo", {"rho": 0.05, "fraction": 0.5, "selection": "random", "normalize_over": "selected"}),
    "sam-every2": ("sam", {"rho": 0.05, "ascent_every": 2}),
    "flat-lora-layer": ("flat-lora", {"rho": 0.05, "norm_scope": "layer"}),
}
GLOBAL_BATCH, SEQ, VOCAB = 4, 8, 64


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def layers_of(model):
    return model.base_model.model.model.layers


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def local_batch(step: int, rank: int, world: int) -> torch.Tensor:
    ids = batch(step)
    per = GLOBAL_BATCH // world
    return ids[rank * per: (rank + 1) * per]


def closure_for(model, ids):
    def closure():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    return closure


def run(model, opt, steps, ids_of):
    for t in steps:
        opt.zero_grad(set_to_none=True)
        opt.step(closure_for(model, ids_of(t)))


def make_opt(model, method, kw):
    return flatpeft.create_optimizer(model, method, base_optimizer="adamw", lr=1e-2, weight_decay=0.01, seed=7, **kw)


def full_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.replace("module.", "", 1) if n.startswith("module.") else n] = t.detach().clone()
    return out


def compare(got: dict, ref: dict) -> float:
    return max(float((got[n] - ref[n]).abs().max()) for n in ref)


def digest(weights: dict) -> float:
    return float(sum(float(v.double().square().sum()) for v in weights.values()))


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in layers_of(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def reference(method, kw, steps=3):
    model = tiny_llama()
    opt = make_opt(model, method, kw)
    run(model, opt, range(steps), batch)
    return full_weights(model)


def task_equivalence(kind: str, rank: int, world: int) -> dict:
    results = {}
    cases = {m: (m, kw) for m, kw in METHODS.items()}
    if kind == "fsdp2":
        cases.update(EXTRA)
    base = reference("base", {})
    for label, (method, kw) in cases.items():
        t0 = time.perf_counter()
        ref = reference(method, kw)
        model = tiny_llama()
        if kind == "fsdp2":
            model = fsdp2(model)
            opt = make_opt(model, method, kw)
            run(model, opt, range(3), lambda t: local_batch(t, rank, world))
        else:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = make_opt(model, method, kw)
            run(ddp, opt, range(3), lambda t: local_batch(t, rank, world))
        got = full_weights(model)
        moved = compare(got, full_weights(tiny_llama()))
        results[label] = {"max_diff": compare(got, ref), "digest": digest(got), "moved": moved,
                          "ref_vs_base": compare(ref, base), "seconds": time.perf_counter() - t0}
    return results


def task_noise(rank: int, world: int) -> dict:
    out = {}
    for flag in (True, False):
        model = fsdp2(tiny_llama())
        opt = make_opt(model, "flat-lora-random", {"rho": 0.05, "per_rank_noise": flag})
        run(model, opt, range(1), lambda t: local_batch(t, rank, world))
        out[str(flag)] = float(opt.metrics["perturbation_norm"])
    model = fsdp2(tiny_llama())
    opt = make_opt(model, "flatpo", {"granularity": "element"})
    try:
        run(model, opt, range(1), lambda t: local_batch(t, rank, world))
        out["element_error"] = ""
    except NotImplementedError as err:
        out["element_error"] = str(err)
    out["element_restored"] = compare(full_weights(model), full_weights(tiny_llama()))
    return out


def task_dcp(rank: int, world: int, directory: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results = {}
    ids_of = lambda t: local_batch(t, rank, world)
    for method, kw in METHODS.items():
        path = os.path.join(directory, f"ckpt-{method}")
        model = fsdp2(tiny_llama())
        opt = make_opt(model, method, kw)
        run(model, opt, range(2), ids_of)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        run(model, opt, range(2, 4), ids_of)
        uninterrupted = full_weights(model)

        fresh = fsdp2(tiny_llama(seed=5))
        opt2 = make_opt(fresh, method, kw)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, opt2, state["optim"])
        step_after_load = opt2.step_count
        run(fresh, opt2, range(2, 4), ids_of)
        resumed = full_weights(fresh)
        results[method] = {
            "equal": all(torch.equal(uninterrupted[n], resumed[n]) for n in uninterrupted),
            "max_diff": compare(resumed, uninterrupted),
            "step_after_load": step_after_load,
        }
    return results


def main() -> None:
    out_dir, tasks = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {}
    try:
        for task in tasks:
            t0 = time.perf_counter()
            if task in ("fsdp2", "ddp"):
                result[task] = task_equivalence(task, rank, world)
            elif task == "noise":
                result[task] = task_noise(rank, world)
            elif task == "dcp":
                result[task] = task_dcp(rank, world, out_dir)
            result.setdefault("seconds", {})[task] = time.perf_counter() - t0
    except BaseException as err:  # report it to the test, then fail this rank
        import traceback

        result["error"] = "".join(traceback.format_exception(err))
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        dist.destroy_process_group()
    # Leave without running C++ static destructors: at interpreter teardown a gloo thread was seen to abort the
    # process now and then ("terminate called without an active exception", exit -6) after all work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
