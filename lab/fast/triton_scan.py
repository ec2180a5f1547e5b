"""A Triton kernel for diagonal linear recurrences h_t = a_t * h_{t-1} + x_t on a GPU.

One program owns a block of channels of one sequence and walks time in tiles: each tile is scanned
with `tl.associative_scan` and joined to the carried state, so every input is read once and every
state written once (the doubling scan reads and writes the whole sequence log2(T) times).
Accumulates in float32, as transformers' reference loop does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lab.fast.state import on_its_gpu


@triton.jit
def combine(a_left, x_left, a_right, x_right):
    """(a, x) o (a', x') = (a a', a' x + x'): two steps of h = a h + x as one."""
    return a_left * a_right, a_right * x_left + x_right


@triton.jit(do_not_specialize=["steps", "width"])  # one compiled kernel for every prompt length
def _scan_kernel(a_ptr, x_ptr, h0_ptr, out_ptr, last_ptr, steps, width,
                 HAS_H0: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_width = cols < width
    if HAS_H0:
        h = tl.load(h0_ptr + row * width + cols, mask=in_width, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    times = tl.arange(0, BLOCK_T)
    base = row.to(tl.int64) * steps * width
    for start in tl.range(0, steps, BLOCK_T):
        offsets = base + (start + times)[:, None].to(tl.int64) * width + cols[None, :]
        inside = ((start + times)[:, None] < steps) & in_width[None, :]
        a = tl.load(a_ptr + offsets, mask=inside, other=1.0).to(tl.float32)  # padding keeps the state
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        a_run, x_run = tl.associative_scan((a, x), axis=0, combine_fn=combine)
        states = x_run + a_run * h[None, :]
        tl.store(out_ptr + offsets, states.to(out_ptr.dtype.element_ty), mask=inside)
        h = tl.sum(tl.where(times[:, None] == BLOCK_T - 1, states, 0.0), axis=0)
    tl.store(last_ptr + row * width + cols, h, mask=in_width)


@on_its_gpu
def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All states for (B, T, D) inputs as out_dtype, and the float32 last state (B, D)."""
    a, x = a.contiguous(), x.contiguous()
    batch, steps, width = x.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    last = torch.empty((batch, width), dtype=torch.float32, device=x.device)
    h0 = h0.contiguous() if h0 is not None else last
    block_d = 64
    grid = (batch, triton.cdiv(width, block_d))
    _scan_kernel[grid](a, x, h0, out, last, steps, width, HAS_H0=h0 is not last, BLOCK_T=64, BLOCK_D=block_d)
    return out, last
