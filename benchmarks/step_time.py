"""Time per step and peak memory of every flatpeft method, as a ratio to ``base``, side by side in one process.

The model is a Llama-style transformer built from a config (random weights, no download) with peft LoRA on
``q_proj`` and ``v_proj`` and AdamW. Methods are timed in interleaved rounds (round-robin over methods, so a
slow-down of the machine hits every method alike) and the median step time per method is reported.

Settings:
  --setting cpu   (default) hidden 256, 4 layers, 4 heads, MLP 704, vocab 4000, fp32, batch 4 x 128.
  --setting gpu   hidden 1024, 24 layers, 16 heads, MLP 2816, vocab 32000,
                  bf16, batch 8 x 512, LoRA r=8 on q_proj,v_proj (needs CUDA).

Extra memory: the bytes each method holds beyond the model and the base optimizer (``opt.memory_report()``:
persistent buffers saved with the optimizer state, plus the largest copy held during a step), also as a percentage
of the model's parameter bytes. Peak memory (``--memory``): on CUDA ``torch.cuda.max_memory_allocated`` per method
(reset before each); on CPU the peak resident set of a fresh subprocess per method (slower, off by default).

    python benchmarks/step_time.py                      # CPU table
    python benchmarks/step_time.py --setting gpu        # on a GPU machine
    python benchmarks/step_time.py --memory --out bench.json
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

import flatpeft

SETTINGS = {
    "cpu": dict(hidden=256, layers=4, heads=4, mlp=704, vocab=4000, batch=4, seq=128, dtype="float32", device="cpu"),
    "gpu": dict(hidden=1024, layers=24, heads=16, mlp=2816, vocab=32000, batch=8, seq=512, dtype="bfloat16", device="cuda"),
}
DEFAULT_METHODS = flatpeft.METHODS + ("flat-lora-random[keep_noise=True]",)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name[key=value,...]"`` (values are Python literals) -> ``(name, keywords)``."""
    import ast

    name, _, rest = spec.partition("[")
    kwargs = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    return name, kwargs


def build(setting: dict, seed: int = 0):
    """A Llama-style causal LM from a config with LoRA r=8 on q_proj, v_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=setting["vocab"], hidden_size=setting["hidden"], intermediate_size=setting["mlp"],
        num_hidden_layers=setting["layers"], num_attention_heads=setting["heads"], num_key_value_heads=setting["heads"],
        max_position_embeddings=max(2048, setting["seq"]),
    )
    dtype = getattr(torch, setting["dtype"])
    model = LlamaForCausalLM(cfg).to(device=setting["device"], dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # non-zero B, as after some training, so every method does its full work
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model


def make_step(model, method: str, setting: dict):
    name, kwargs = parse_spec(method)
    opt = flatpeft.create_optimizer(model, name, base_optimizer="adamw", lr=1e-4, total_steps=1000, **kwargs)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, setting["vocab"], (setting["batch"], setting["seq"]), generator=g).to(setting["device"])

    def closure():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss

    def step():
        opt.zero_grad(set_to_none=True)
        opt.step(closure)

    step.passes = opt.passes  # type: ignore[attr-defined]
    step.opt = opt  # type: ignore[attr-defined]
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def extra_bytes(step) -> int:
    """Bytes the method holds beyond the model and the base optimizer (persistent + largest transient copy)."""
    rep = step.opt.memory_report()
    return rep["persistent"] + rep["transient"]


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def time_methods(methods, setting: dict, warmup: int, rounds: int, steps_per_round: int) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    models = {m: build(setting) for m in methods}
    steps = {m: make_step(models[m], m, setting) for m in methods}
    for m in methods:
        for _ in range(warmup):
            steps[m]()
    sync(setting["device"])
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            sync(setting["device"])
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                steps[m]()
            sync(setting["device"])
            samples[m].append((time.perf_counter() - t0) / steps_per_round)
    extra = {m: 100.0 * extra_bytes(steps[m]) / model_bytes(models[m]) for m in methods}
    return {m: statistics.median(v) for m, v in samples.items()}, {m: steps[m].passes for m in methods}, extra


def peak_memory(method: str, setting_name: str, steps: int = 3) -> float:
    """Peak memory in MiB of ``steps`` steps of ``method`` (CUDA allocator, or the RSS of a subprocess on CPU)."""
    setting = SETTINGS[setting_name]
    if setting["device"] == "cuda":
        model = build(setting)
        step = make_step(model, method, setting)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        del model, step
        torch.cuda.empty_cache()
        return peak
    out = subprocess.run(
        [sys.executable, __file__, "--_memory-child", method, "--setting", setting_name], check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated method names, each optionally with keywords: flat-lora-random[keep_noise=True]")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory per method")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setting = SETTINGS[args.setting]
    if args.memory_child:
        model = build(setting)
        step = make_step(model, args.memory_child, setting)
        for _ in range(3):
            step()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return 0
    if setting["device"] == "cuda" and not torch.cuda.is_available():
        ap.error("--setting gpu needs CUDA")
    torch.set_num_threads(torch.get_num_threads())
    methods = [m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.methods) if m.strip()]
    if "base" not in methods:
        methods.insert(0, "base")
    times, passes_of, extra = time_methods(methods, setting, args.warmup, args.rounds, args.steps_per_round)
    mem = {m: peak_memory(m, args.setting) for m in methods} if args.memory else {}
    rows = []
    print(f"setting={args.setting} {setting} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'method':18s} {'passes':>6s} {'ms/step':>9s} {'time/base':>9s} {'extra % model':>13s}"
          + (f" {'peak MiB':>9s} {'mem/base':>8s}" if mem else ""))
    for m in methods:
        passes = passes_of[m]
        row = {"method": m, "passes": passes, "ms_per_step": 1e3 * times[m], "time_ratio": times[m] / times["base"],
               "extra_memory_percent_of_model": extra[m]}
        line = f"{m:18s} {passes:6d} {row['ms_per_step']:9.1f} {row['time_ratio']:9.2f} {extra[m]:13.3f}"
        if mem:
            row.update(peak_mib=mem[m], memory_ratio=mem[m] / mem["base"])
            line += f" {mem[m]:9.0f} {row['memory_ratio']:8.3f}"
        rows.append(row)
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setting": args.setting, "config": setting, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
