"""Random-state capture and replay, so the two passes of a sharpness-aware step share dropout masks.

A two-pass method (SAM, FlatPO, Flat-LoRA) runs the model twice per step. Left alone, the second pass
draws fresh dropout masks, so (a) the ascent gradient and the update gradient see different networks and
(b) a two-pass method consumes twice the random stream of a one-pass baseline, which makes paired
comparisons unfair (with dropout on, even a near-zero random perturbation "won" every seed of a paired
comparison). :class:`RNGState` snapshots the CPU generator and every initialised
CUDA generator; the engine captures it before pass 1, replays it before pass 2, and finally moves the
generators to where pass 1 left them, so a two-pass step consumes exactly the stream of one pass.

Capturing is a host-side copy of generator state; it never synchronises with the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RNGState"]


@dataclass(frozen=True)
class RNGState:
    """Snapshot of the global CPU generator and all initialised CUDA generators."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls) -> "RNGState":
        """Take a snapshot of the current global random state (CPU and CUDA)."""
        cuda: tuple[torch.Tensor, ...] = ()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self) -> None:
        """Set the global generators back to this snapshot."""
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(list(self.cuda))
