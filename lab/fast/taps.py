"""States a forward keeps at chosen positions (lab.fast.fork's trunk), for the Mamba mixers and RecurrentGemma
blocks lab.fast acts on.

Inside `recording(taps)`, a batch-1 prompt forward keeps, per layer and position, the recurrent state there:
Jamba's selective scans run in segments that end at the tapped positions (lab.fast.mamba), RecurrentGemma's
RG-LRU kernel stores them in one pass (lab.fast.griffin); the convolution's inputs before each position are
kept too (keep_inputs). Imports nothing from lab.fast but lab.fast.host.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from lab.fast.host import on_device


class Taps:
    def __init__(self, positions: tuple[int, ...]):
        self.positions = positions  # ascending, > 0
        self.states: dict = {}  # (layer key, what) -> {position: tensor}

    def keep(self, layer, what: str, position: int, value: torch.Tensor) -> None:
        self.states.setdefault((layer, what), {})[position] = value

    def keep_all(self, layer, what: str, positions: list[int], values: torch.Tensor) -> None:
        """values (len(positions), ...): the state at each position, kept as views of it."""
        self.states.setdefault((layer, what), {}).update(zip(positions, values.unbind(0)))

    def get(self, layer, what: str) -> dict[int, torch.Tensor]:
        return self.states.get((layer, what), {})

    def segments(self, steps: int) -> list[tuple[int, int]]:
        """[start, end) pieces of 0..steps that end at every tapped position inside."""
        ends = [p for p in self.positions if p < steps] + [steps]
        return list(zip([0] + ends[:-1], ends))

    def keep_inputs(self, layer, inputs: torch.Tensor, width: int) -> None:
        """The `width` inputs (B, C, T) before each tapped position (zeros before the first token): a conv state.
        One gather for every position (a copy per position kept the GPU waiting on the host in a trunk)."""
        positions = [p for p in self.positions if p <= inputs.shape[-1]]
        if not positions:
            return
        at = on_device(positions, inputs.device)[:, None] + torch.arange(width, device=inputs.device)
        self.keep_all(layer, "conv", positions, F.pad(inputs, (width, 0))[..., at].movedim(-2, 0).contiguous())


_active: ContextVar[Taps | None] = ContextVar("lab_fast_taps", default=None)


@contextmanager
def recording(taps: Taps):
    token = _active.set(taps)
    try:
        yield taps
    finally:
        _active.reset(token)


def active(steps: int, batch: int) -> Taps | None:
    """The taps a prompt forward of (batch, steps) records, if any: only a batch-1 one."""
    taps = _active.get()
    return taps if taps is not None and batch == 1 and steps > 1 else None
