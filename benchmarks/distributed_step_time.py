"""Multi-process time per step of every flatpeft method relative to ``base``, under FSDP2 and DDP (CPU, gloo).

Launches ``--nproc`` processes itself (default 2). Model: a Llama-style transformer built from a config (random
weights, no download), hidden 256, 4 layers, 4 heads, MLP 704, vocab 4000, fp32, peft LoRA r=8 on q_proj/v_proj,
AdamW, batch 4 x 64 per rank. FSDP2: ``fully_shard`` on every decoder layer and on the model; DDP: the model in
``DistributedDataParallel``. Methods are timed in interleaved rounds (one step of each method per round, so a
change of the machine's load hits all alike); the median over rounds is reported, as a ratio to ``base`` in the
same launch.

Bytes per step: every collective issued through ``torch.distributed``'s Python API is counted (wrapped functions:
all_reduce, all_gather_into_tensor, reduce_scatter_tensor, all_gather, broadcast), split into flatpeft's own (issued
from ``flatpeft``'s modules) and the rest. FSDP2's all-gathers and reduce-scatters are issued from its internals and
are not seen (they are the same per pass for every method); DDP's gradient all-reduce runs inside its C++ reducer
and is reported as computed, ``passes x trainable bytes`` per step.

    python benchmarks/distributed_step_time.py                 # both modes, all methods, markdown table
    python benchmarks/distributed_step_time.py --modes fsdp2 --methods base,sam --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

KW = {"flat-lora-random": {"per_rank_noise": True}, "spider": {"mask_scope": "all"}}
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "broadcast")


def build(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


class Counter:
    """Bytes passed to ``torch.distributed`` collectives, by caller (flatpeft or other)."""

    def __init__(self) -> None:
        self.bytes = {"flatpeft": 0, "other": 0}
        self.calls = {"flatpeft": 0, "other": 0}
        for name in COLLECTIVES:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(original, name))

    def _wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            tensor = args[1] if name in ("all_gather_into_tensor", "reduce_scatter_tensor") else args[0]
            size = sum(t.numel() * t.element_size() for t in tensor) if isinstance(tensor, (list, tuple)) else \
                tensor.numel() * tensor.element_size()
            frame = sys._getframe(1)
            who = "flatpeft" if "flatpeft" in frame.f_code.co_filename else "other"
            self.bytes[who] += size
            self.calls[who] += 1
            return fn(*args, **kwargs)

        return wrapped

    def snapshot(self):
        return dict(self.bytes), dict(self.calls)


def worker(out: str, modes: list[str], methods: list[str], rounds: int, batch: int, seq: int) -> None:
    import flatpeft
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    counter = Counter()
    result: dict = {}
    try:
        for mode in modes:
            runs = {}
            for method in methods:
                model = build()
                if mode == "fsdp2":
                    for layer in model.base_model.model.model.layers:
                        fully_shard(layer)
                    fully_shard(model)
                    fwd = model
                else:
                    fwd = torch.nn.parallel.DistributedDataParallel(model)
                opt = flatpeft.create_optimizer(model, method, lr=1e-4, total_steps=1000, seed=1, **KW.get(method, {}))
                trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                runs[method] = (fwd, opt, trainable)
            g = torch.Generator().manual_seed(rank)
            ids = torch.randint(0, 4000, (batch, seq), generator=g)
            times = {m: [] for m in methods}
            comm = {m: None for m in methods}
            for r in range(rounds + 1):  # round 0 warms up
                for method in methods:
                    fwd, opt, _ = runs[method]

                    def closure():
                        loss = fwd(input_ids=ids, labels=ids).loss
                        loss.backward()
                        return loss

                    dist.barrier()
                    b0, c0 = counter.snapshot()
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    opt.step(closure)
                    dt = time.perf_counter() - t0
                    b1, c1 = counter.snapshot()
                    if r > 0:
                        times[method].append(dt)
                        comm[method] = ({k: b1[k] - b0[k] for k in b1}, {k: c1[k] - c0[k] for k in c1})
            result[mode] = {
                m: {"median_s": statistics.median(times[m]), "bytes": comm[m][0], "calls": comm[m][1],
                    "passes": runs[m][1].passes, "trainable_bytes": runs[m][2]}
                for m in methods
            }
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(result, fh)
        dist.destroy_process_group()


def table(result: dict, methods: list[str]) -> str:
    lines = ["| mode | method | passes | ms / step | x base | flatpeft bytes / step (calls) | other collectives bytes / step |",
             "|---|---|---|---|---|---|---|"]
    for mode, rows in result.items():
        if mode == "error":
            continue
        base = rows["base"]["median_s"] if "base" in rows else None
        for m in methods:
            r = rows[m]
            if mode == "fsdp2":
                other = f"{r['bytes']['other']:,}" if r["bytes"]["other"] else "not seen (FSDP2 internals)"
            else:
                other = f"{r['passes'] * r['trainable_bytes']:,} (DDP reducer, computed)"
            ratio = f"{r['median_s'] / base:.2f}" if base else "-"
            lines.append(f"| {mode} | `{m}` | {r['passes']} | {1000 * r['median_s']:.0f} | {ratio} | "
                         f"{r['bytes']['flatpeft']:,} ({r['calls']['flatpeft']}) | {other} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--modes", default="fsdp2,ddp")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all built-in methods)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None, help="also write the raw results as JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import flatpeft

    methods = args.methods.split(",") if args.methods else list(flatpeft.METHODS)
    if "base" not in methods:
        methods = ["base"] + methods
    modes = args.modes.split(",")
    if args.worker:
        worker(args.worker, modes, methods, args.rounds, args.batch, args.seq)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    env = {**os.environ, "WORLD_SIZE": str(args.nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", out, "--modes", args.modes, "--methods", ",".join(methods),
           "--rounds", str(args.rounds), "--batch", str(args.batch), "--seq", str(args.seq)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}) for r in range(args.nproc)]
    try:
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    with open(out) as fh:
        result = json.load(fh)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(table(result, methods))


if __name__ == "__main__":
    main()
