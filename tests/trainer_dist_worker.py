"""One rank of the multi-process Trainer checks (tests/test_distributed.py): ``SharpnessAwareTrainer`` on a tiny
peft-LoRA Llama under accelerate's FSDP2 (``fsdp_version: 2``) or DDP, gradient accumulation 2, bf16 autocast.

Usage: ``python tests/trainer_dist_worker.py OUT_DIR MODE METHOD[,METHOD...]`` (MODE ``fsdp2`` or ``ddp``) with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set (torchrun sets them). Per method:
4 optimizer steps with a checkpoint after step 2, then a new Trainer resumed from that checkpoint; writes whether
the final weights are bit-identical to ``OUT_DIR/<mode>-rank{RANK}.json``.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

from transformers import TrainingArguments

from dist_worker import METHODS, VOCAB, tiny_llama
from flatpeft.integrations import SharpnessAwareTrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seq: int = 8) -> None:
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args_for(out: str, mode: str, **kw) -> TrainingArguments:
    extra = {}
    if mode == "fsdp2":
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                                        "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}}
    else:
        extra = {"ddp_backend": "gloo"}
    return TrainingArguments(out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                             learning_rate=1e-2, bf16=True, use_cpu=True, save_steps=2, save_strategy="steps",
                             logging_steps=1, report_to=[], seed=3, data_seed=3, dataloader_num_workers=0,
                             save_only_model=False, disable_tqdm=True, **extra, **kw)


def allow_fsdp_on_cpu() -> None:
    """accelerate enables its FSDP plugin only for GPU-like backends; FSDP2 itself runs on CPU with gloo. For the
    test, let a CPU state with an FSDP plugin be an FSDP state (what it is on GPUs)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.model
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n.removeprefix("module.")] = t.detach().float().clone()
    return out


def main() -> None:
    out_dir, mode, methods = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    rank = int(os.environ.get("RANK", "0"))
    if mode == "fsdp2":
        allow_fsdp_on_cpu()
    result = {}
    for method in methods:
        kw = {k: v for k, v in METHODS[method].items() if k != "total_steps"}
        run_dir = os.path.join(out_dir, f"{mode}-{method}")
        t1 = SharpnessAwareTrainer(model=tiny_llama(), args=args_for(run_dir, mode), train_dataset=Tokens(),
                                   flatpeft_method=method, flatpeft_kwargs=kw)
        t1.train()
        full = weights(t1)
        logs = [h for h in t1.state.log_history if "loss" in h]
        t2 = SharpnessAwareTrainer(model=tiny_llama(), args=args_for(run_dir, mode), train_dataset=Tokens(),
                                   flatpeft_method=method, flatpeft_kwargs=kw)
        t2.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2"))
        resumed = weights(t2)
        result[method] = {
            "equal": all(torch.equal(full[n], resumed[n]) for n in full),
            "max_diff": max(float((full[n] - resumed[n]).abs().max()) for n in full),
            "losses": [h["loss"] for h in logs],
            "fsdp": bool(t1.is_fsdp_enabled),
            "step": t2.flatpeft_optimizer.step_count,
        }
    with open(os.path.join(out_dir, f"{mode}-rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    # Tear the process group down before the interpreter exits: left to the atexit order, gloo's threads were seen
    # to abort the process ("terminate called without an active exception", exit -6) after all work was done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip C++ static destructors (see tests/dist_worker.py)


if __name__ == "__main__":
    main()
