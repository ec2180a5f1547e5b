"""Triton kernels for RecurrentGemma's prefill on a GPU: the elementwise work around the matrix products.

transformers runs the Griffin block as a chain of small elementwise ops, each a full pass over memory
(Gemma's RMSNorm in float32, the convolution on transposed copies, a dozen gate ops, the scan, the
gelu branch, the rotary embedding). Here each is one pass: an RMSNorm kernel, a causal depthwise
convolution in the (batch, time, channel) layout, one kernel for the RG-LRU gates, the scan and the output
gate (few rows: time in chunks side by side), one for the rotary embedding, one for the MLP's
gelu(gate) * up, and flash attention over each query's window only. Arithmetic in float32,
as the reference's norms and scan are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lab.fast.host import on_device
from lab.fast.state import on_its_gpu
from lab.fast.triton_scan import combine


@triton.jit
def _gelu_tanh(y):
    """gelu with the tanh approximation: 0.5 y (1 + tanh(u)) = y * sigmoid(2u)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # sqrt(2 / pi)
    return y * tl.sigmoid(2.0 * u)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    tl.store(out_ptr + row * width + cols, (x * scale * (1.0 + w)).to(out_ptr.dtype.element_ty), mask=inside)


@on_its_gpu
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), in float32, returned in x's dtype."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    out = torch.empty_like(rows)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, width, eps, BLOCK=triton.next_power_of_2(width),
                                       num_warps=8)
    return out.view(x.shape)


@triton.jit(do_not_specialize=["steps"])  # the width keeps its alignment hint: vector loads and stores
def _causal_conv_kernel(x_ptr, w_ptr, b_ptr, prior_ptr, out_ptr, steps, width, sx_b, sx_t, sp_b, sp_w, sp_k,
                        TAPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SILU: tl.constexpr,
                        PRIOR: tl.constexpr):
    """PRIOR: the TAPS - 1 inputs before time 0 come from prior (B, D, TAPS - 1) (any strides), else zeros."""
    row = tl.program_id(0).to(tl.int64)
    times = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_width = cols < width
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32) + tl.load(b_ptr + cols, mask=in_width, other=0.0)[None, :]
    for tap in tl.static_range(TAPS):
        source = times - (TAPS - 1) + tap
        ok = ((source >= 0) & (source < steps))[:, None] & in_width[None, :]
        x = tl.load(x_ptr + row * sx_b + source[:, None].to(tl.int64) * sx_t + cols[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + cols * TAPS + tap, mask=in_width, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if PRIOR:
        if tl.program_id(1) * BLOCK_T < TAPS - 1:  # the tiles of times reading inputs before time 0
            for tap in tl.static_range(TAPS - 1):
                source = times - (TAPS - 1) + tap
                before = (source < 0)[:, None] & in_width[None, :]
                x = tl.load(prior_ptr + row * sp_b + cols[None, :] * sp_w + (source + TAPS - 1)[:, None] * sp_k,
                            mask=before, other=0.0)
                w = tl.load(w_ptr + cols * TAPS + tap, mask=in_width, other=0.0)
                acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    inside = (times < steps)[:, None] & in_width[None, :]
    tl.store(out_ptr + row * steps * width + times[:, None].to(tl.int64) * width + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=inside)


@on_its_gpu
def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu: bool = False,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution over time of (B, T, D) x (channels contiguous, rows of any stride) with a
    Conv1d's (D, 1, taps) or (D, taps) weight, then silu if asked; the taps - 1 inputs before x are `prior`
    (B, D, taps - 1), as a cache keeps them, or zeros. Returns a contiguous (B, T, D)."""
    batch, steps, width = x.shape
    taps = weight.shape[-1]
    prior = prior if taps > 1 else None  # a width-1 convolution keeps no inputs
    out = torch.empty((batch, steps, width), dtype=x.dtype, device=x.device)
    grid = (batch, triton.cdiv(steps, 64), triton.cdiv(width, 64))
    prior_strides = prior.stride() if prior is not None else (0, 0, 0)
    _causal_conv_kernel[grid](x, weight, bias, x if prior is None else prior, out, steps, width, x.stride(0),
                              x.stride(1), *prior_strides, TAPS=taps, BLOCK_T=64, BLOCK_D=64, SILU=silu,
                              PRIOR=prior is not None)
    return out


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, new_state_ptr, width, ss_b, ss_w, ss_k,
                      TAPS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One time step of each row (program 0): the convolution over its kept inputs (state (B, D, TAPS - 1), any
    strides) and this one (x (B, D)), and its new kept inputs (new_state, contiguous), the oldest dropped."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=inside, other=0.0)
    w = tl.load(w_ptr + cols * TAPS + TAPS - 1, mask=inside, other=0.0).to(tl.float32)
    acc = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32) + x.to(tl.float32) * w
    kept = new_state_ptr + (row * width + cols) * (TAPS - 1)
    for tap in tl.static_range(TAPS - 1):
        before = tl.load(state_ptr + row * ss_b + cols * ss_w + tap * ss_k, mask=inside, other=0.0)
        w = tl.load(w_ptr + cols * TAPS + tap, mask=inside, other=0.0).to(tl.float32)
        acc += before.to(tl.float32) * w
        if tap > 0:
            tl.store(kept + tap - 1, before, mask=inside)
    if TAPS > 1:
        tl.store(kept + TAPS - 2, x.to(new_state_ptr.dtype.element_ty), mask=inside)
    tl.store(out_ptr + row * width + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


@on_its_gpu
def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoding step of the depthwise causal convolution: (B, 1, D) x after the inputs `state` (B, D, taps - 1)
    keeps; returns the (B, 1, D) output and the new (B, D, taps - 1) state, as transformers' step computes them."""
    batch, _, width = x.shape
    taps = weight.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    new_state = torch.empty((batch, width, taps - 1), dtype=state.dtype, device=x.device)
    kept, keeps = (out, out) if taps == 1 else (state, new_state)  # a width-1 convolution keeps no inputs
    _conv_step_kernel[(batch, triton.cdiv(width, 256))](x, kept, weight, bias, out, keeps, width, *state.stride(),
                                                        TAPS=taps, BLOCK_D=256, num_warps=4)
    return out, new_state


@triton.jit
def _rglru_load(x_ptr, gates_ptr, reset_ptr, row, t, cols, gate_cols, steps, width, block_width):
    """One tile's raw inputs (times t (BLOCK_T, 1), channels cols): conv output, the two gates' pre-activations
    (gates: (heads, batch * steps, 2 * block_width), input gate first) and the reset flags."""
    inside = (t < steps) & (cols < width)[None, :]
    x = tl.load(x_ptr + row * steps * width + t * width + cols[None, :], mask=inside, other=0.0)
    gate_offsets = gate_cols[None, :] + (row * steps + t) * (2 * block_width)
    gate_x = tl.load(gates_ptr + gate_offsets, mask=inside, other=0.0)
    gate_a = tl.load(gates_ptr + gate_offsets + block_width, mask=inside, other=0.0)
    reset = tl.load(reset_ptr + row * steps + t, mask=t < steps, other=0)
    return x, gate_x, gate_a, reset


@triton.jit
def _rglru_terms(x, gate_x, gate_a, reset, t, cols, steps, width, bias_x, bias_a, softplus):
    """A loaded tile as h = a h + x: (a, x, inside); padding keeps the state (a = 1, x = 0), a reset forgets it
    (a = 0)."""
    inside = (t < steps) & (cols < width)[None, :]
    gate_x = tl.sigmoid(gate_x.to(tl.float32) + bias_x[None, :])
    log_a = -8.0 * tl.sigmoid(gate_a.to(tl.float32) + bias_a[None, :]) * softplus[None, :]
    reset = reset != 0
    scale = tl.where(reset, 1.0, tl.sqrt(1.0 - tl.exp(2.0 * log_a)))
    a = tl.where(inside, tl.where(reset, 0.0, tl.exp(log_a)), 1.0)
    return a, tl.where(inside, x.to(tl.float32) * gate_x * scale, 0.0), inside


@triton.jit
def _rglru_params(gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, cols, width, block_width, head_stride):
    """Per channel: (the input gate's bias, the recurrence gate's, softplus of the recurrent parameter, the
    channel's column in the gates (heads, batch * steps, 2 * block_width), head_stride apart)."""
    in_width = cols < width
    param = tl.load(param_ptr + cols, mask=in_width, other=0.0).to(tl.float32)
    softplus = tl.where(param > 20.0, param, tl.log(1.0 + tl.exp(param)))
    bias_x = tl.load(gate_x_bias_ptr + cols, mask=in_width, other=0.0).to(tl.float32)
    bias_a = tl.load(gate_a_bias_ptr + cols, mask=in_width, other=0.0).to(tl.float32)
    return bias_x, bias_a, softplus, (cols // block_width).to(tl.int64) * head_stride + cols % block_width


@triton.jit(do_not_specialize=["steps", "chunk"])  # widths and strides keep their alignment hints
def _rglru_chunk_kernel(x_ptr, gates_ptr, gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, reset_ptr, summary_ptr,
                        steps, width, block_width, head_stride, chunk,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each chunk of `chunk` times as one step h = A h + X (summary (2, B, chunks, width) float32: A, then X).
    The next tile's loads are issued before this tile's arithmetic."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    part, parts = tl.program_id(2), tl.num_programs(2)
    bias_x, bias_a, softplus, gate_cols = _rglru_params(gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, cols, width,
                                                        block_width, head_stride)
    total_a = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    total_x = tl.zeros([BLOCK_D], dtype=tl.float32)
    times = tl.arange(0, BLOCK_T)
    t = (part * chunk + times)[:, None].to(tl.int64)
    x, gate_x, gate_a, reset = _rglru_load(x_ptr, gates_ptr, reset_ptr, row, t, cols, gate_cols, steps, width,
                                           block_width)
    for start in tl.range(part * chunk, part * chunk + chunk, BLOCK_T):
        t = (start + times)[:, None].to(tl.int64)
        x_next, gate_x_next, gate_a_next, reset_next = _rglru_load(x_ptr, gates_ptr, reset_ptr, row, t + BLOCK_T,
                                                                   cols, gate_cols, steps, width, block_width)
        a, x, _ = _rglru_terms(x, gate_x, gate_a, reset, t, cols, steps, width, bias_x, bias_a, softplus)
        a_run, x_run = tl.associative_scan((a, x), axis=0, combine_fn=combine)
        last = times[:, None] == BLOCK_T - 1
        tile_a = tl.sum(tl.where(last, a_run, 0.0), axis=0)
        total_x = tl.sum(tl.where(last, x_run, 0.0), axis=0) + tile_a * total_x
        total_a = total_a * tile_a
        x, gate_x, gate_a, reset = x_next, gate_x_next, gate_a_next, reset_next
    at = (row * parts + part) * width + cols
    tl.store(summary_ptr + at, total_a, mask=cols < width)
    tl.store(summary_ptr + tl.num_programs(0) * parts * width + at, total_x, mask=cols < width)


@triton.jit(do_not_specialize=["steps", "chunk"])  # widths and strides keep their alignment hints
def _rglru_kernel(x_ptr, gates_ptr, gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, reset_ptr, y_ptr, h0_ptr,
                  out_ptr, last_ptr, slot_ptr, kept_ptr, summary_ptr, steps, width, block_width, head_stride, chunk,
                  HAS_H0: tl.constexpr, KEEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The scan of one chunk of `chunk` times (program 2), from the state the chunks before it leave (their
    summaries, _rglru_chunk_kernel's); the next tile's loads are issued before this tile's arithmetic. KEEP: the
    state after each time t whose slot (slot_ptr, per time of row 0) is >= 0 goes to that row of kept
    (slots, width) float32: a batch-1 trunk's states at its taps (lab.fast.fork)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    part, parts = tl.program_id(2), tl.num_programs(2)
    in_width = cols < width
    bias_x, bias_a, softplus, gate_cols = _rglru_params(gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, cols, width,
                                                        block_width, head_stride)
    if HAS_H0:
        h = tl.load(h0_ptr + row * width + cols, mask=in_width, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    summaries = tl.num_programs(0) * parts * width
    for before in tl.range(0, part):
        at = (row * parts + before) * width + cols
        h = tl.load(summary_ptr + summaries + at, mask=in_width, other=0.0) + \
            tl.load(summary_ptr + at, mask=in_width, other=1.0) * h
    times = tl.arange(0, BLOCK_T)
    t = (part * chunk + times)[:, None].to(tl.int64)
    x, gate_x, gate_a, reset = _rglru_load(x_ptr, gates_ptr, reset_ptr, row, t, cols, gate_cols, steps, width,
                                           block_width)
    y = tl.load(y_ptr + row * steps * width + t * width + cols[None, :], mask=(t < steps) & in_width[None, :],
                other=0.0)
    for start in tl.range(part * chunk, part * chunk + chunk, BLOCK_T):
        t = (start + times)[:, None].to(tl.int64)
        x_next, gate_x_next, gate_a_next, reset_next = _rglru_load(x_ptr, gates_ptr, reset_ptr, row, t + BLOCK_T,
                                                                   cols, gate_cols, steps, width, block_width)
        offsets = row * steps * width + t * width + cols[None, :]
        y_next = tl.load(y_ptr + offsets + BLOCK_T * width, mask=(t + BLOCK_T < steps) & in_width[None, :],
                         other=0.0)
        a, x, inside = _rglru_terms(x, gate_x, gate_a, reset, t, cols, steps, width, bias_x, bias_a, softplus)
        a_run, x_run = tl.associative_scan((a, x), axis=0, combine_fn=combine)
        states = x_run + a_run * h[None, :]
        tl.store(out_ptr + offsets, (states * _gelu_tanh(y.to(tl.float32))).to(out_ptr.dtype.element_ty),
                 mask=inside)
        if KEEP:
            slot = tl.load(slot_ptr + t, mask=t < steps, other=-1)
            tl.store(kept_ptr + slot * width + cols[None, :], states, mask=(slot >= 0) & in_width[None, :])
        h = tl.sum(tl.where(times[:, None] == BLOCK_T - 1, states, 0.0), axis=0)
        x, gate_x, gate_a, reset, y = x_next, gate_x_next, gate_a_next, reset_next, y_next
    if part == parts - 1:
        tl.store(last_ptr + row * width + cols, h, mask=in_width)


@triton.jit
def _rglru_step_kernel(x_ptr, gates_ptr, gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, reset_ptr, y_ptr, h0_ptr,
                       out_ptr, last_ptr, width, block_width, head_stride, BLOCK_D: tl.constexpr):
    """One time step of each row (program 0) from its state h0 (a decoding step): _rglru_kernel's arithmetic."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_width = cols < width
    bias_x, bias_a, softplus, gate_cols = _rglru_params(gate_x_bias_ptr, gate_a_bias_ptr, param_ptr, cols, width,
                                                        block_width, head_stride)
    t = tl.zeros([1, 1], dtype=tl.int64)
    x, gate_x, gate_a, reset = _rglru_load(x_ptr, gates_ptr, reset_ptr, row, t, cols, gate_cols, 1, width,
                                           block_width)
    a, x, inside = _rglru_terms(x, gate_x, gate_a, reset, t, cols, 1, width, bias_x, bias_a, softplus)
    h = tl.load(h0_ptr + row * width + cols, mask=in_width, other=0.0).to(tl.float32)
    state = x + a * h[None, :]
    y = tl.load(y_ptr + row * width + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols[None, :], (state * _gelu_tanh(y)).to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(last_ptr + row * width + cols, tl.sum(state, axis=0), mask=in_width)


RGLRU_CONFIG = dict(BLOCK_T=16, BLOCK_D=16, num_warps=4)  # fastest of 27 on an H100 (2B shapes): many programs
RGLRU_PROGRAMS = 512  # (rows, channel blocks) under this split time into chunks scanned side by side (H200: 512 of
# 0 / 256 / 512 / 1024 over the 2B needle grid's shapes; more chunks cost their summaries' extra pass)
RGLRU_MIN_CHUNK = 256  # times a chunk holds at least


def rglru_chunk(batch: int, steps: int, width: int) -> int:
    """Times per chunk: all of them where rows x channel blocks fill the GPU, else chunks of at least
    RGLRU_MIN_CHUNK times (a multiple of the tile) until they do."""
    programs = batch * triton.cdiv(width, RGLRU_CONFIG["BLOCK_D"])
    parts = max(1, min(triton.cdiv(RGLRU_PROGRAMS, programs), steps // RGLRU_MIN_CHUNK))
    tile = RGLRU_CONFIG["BLOCK_T"]
    return triton.cdiv(triton.cdiv(steps, parts), tile) * tile


@on_its_gpu
def rglru(x: torch.Tensor, gates: torch.Tensor, gate_x_bias: torch.Tensor, gate_a_bias: torch.Tensor,
          recurrent_param: torch.Tensor, reset: torch.Tensor, y: torch.Tensor, h0: torch.Tensor | None,
          keep: tuple[int, ...] = (), chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
    """The RG-LRU on (B, T, D) conv output x, times gelu(y): returns that product, the float32 last state and,
    for positions `keep` (batch 1, each in 1..T), the (len(keep), D) float32 states before each of them.

    gates: (heads, B*T, 2*block_width) pre-activations from x (input gate, then recurrence gate);
    reset: (B, T) true where a document starts (position 0). Few rows scan time in chunks side by side
    (chunk: times per chunk, a multiple of the tile; None: rglru_chunk's)."""
    batch, steps, width = x.shape
    block_width = gates.shape[-1] // 2
    gates = gates.contiguous()
    out = torch.empty_like(x)
    last = torch.empty((batch, width), dtype=torch.float32, device=x.device)
    kept = slots = None
    if keep:
        kept = torch.empty((len(keep), width), dtype=torch.float32, device=x.device)
        slots = torch.full((steps,), -1, dtype=torch.int32)
        slots[[p - 1 for p in keep]] = torch.arange(len(keep), dtype=torch.int32)  # the state after time p - 1
        slots = on_device(slots, x.device)
    reset = reset.to(torch.int8).contiguous()
    if steps == 1 and h0 is not None and not keep:  # a decoding step
        grid = (batch, triton.cdiv(width, 256))
        _rglru_step_kernel[grid](x, gates, gate_x_bias, gate_a_bias, recurrent_param, reset, y, h0.contiguous(), out,
                                 last, width, block_width, gates.stride(0), BLOCK_D=256, num_warps=4)
        return out, last, None
    chunk = chunk or rglru_chunk(batch, steps, width)
    if chunk % RGLRU_CONFIG["BLOCK_T"]:
        raise ValueError(f"rglru: chunks of {chunk} times; give a multiple of {RGLRU_CONFIG['BLOCK_T']}")
    grid = (batch, triton.cdiv(width, RGLRU_CONFIG["BLOCK_D"]), triton.cdiv(steps, chunk))
    params = (gate_x_bias, gate_a_bias, recurrent_param, reset)
    summary = last
    if grid[2] > 1:
        summary = torch.empty((2, batch, grid[2], width), dtype=torch.float32, device=x.device)
        _rglru_chunk_kernel[grid](x, gates, *params, summary, steps, width, block_width, gates.stride(0), chunk,
                                  **RGLRU_CONFIG)
    _rglru_kernel[grid](x, gates, *params, y, h0.contiguous() if h0 is not None else last, out, last,
                        last if slots is None else slots, last if kept is None else kept, summary, steps, width,
                        block_width, gates.stride(0), chunk, HAS_H0=h0 is not None, KEEP=bool(keep), **RGLRU_CONFIG)
    return out, last, kept


@triton.jit
def _gelu_mul_kernel(gate_ptr, up_ptr, out_ptr, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (_gelu_tanh(gate) * up).to(out_ptr.dtype.element_ty), mask=inside)


@on_its_gpu
def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up in one pass."""
    out = torch.empty_like(gate)
    _gelu_mul_kernel[(triton.cdiv(gate.numel(), 4096),)](gate, up, out, gate.numel(), BLOCK=4096)
    return out


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, sx_t, sx_h, sc_t, so_t,
                   ROTATED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token's heads (B*T programs): the first ROTATED dims of each rotated by the token's angles (x cos +
    rotate_half(x) sin), the rest passed through."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    inside = (head < heads) & (dims < HEAD_DIM)
    half = ROTATED // 2
    turned = dims < ROTATED
    partner = tl.where(dims < half, dims + half, dims - half)
    row = x_ptr + token * sx_t + head * sx_h
    x = tl.load(row + dims, mask=inside, other=0.0).to(tl.float32)
    other = tl.load(row + partner, mask=inside & turned, other=0.0).to(tl.float32)
    angle = tl.where(turned, dims, 0)
    cos = tl.load(cos_ptr + token * sc_t + angle, mask=turned, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * sc_t + angle, mask=turned, other=0.0).to(tl.float32)
    rotated = x * cos + tl.where(dims < half, -other, other) * sin
    tl.store(out_ptr + token * so_t + head * HEAD_DIM + dims, tl.where(turned, rotated, x).to(out_ptr.dtype.element_ty),
             mask=inside)


@on_its_gpu
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of (B, T, H, D) x (head dims contiguous) by (B, T, R) cos and sin on its
    first R dims (RecurrentGemma's partial rotary: R = D / 2), the rest unchanged: a (B, T, H, D) tensor."""
    batch, steps, heads, dim = x.shape
    if x.stride(3) != 1 or x.stride(1) != heads * x.stride(2) or x.stride(0) != steps * x.stride(1):
        x = x.contiguous()
    cos, sin = cos.expand(batch, -1, -1).contiguous(), sin.expand(batch, -1, -1).contiguous()
    out = torch.empty((batch, steps, heads, dim), dtype=x.dtype, device=x.device)
    _rotary_kernel[(batch * steps,)](x, cos, sin, out, heads, x.stride(1), x.stride(2), cos.stride(1),
                                     out.stride(1), ROTATED=cos.shape[-1], HEAD_DIM=dim,
                                     BLOCK_H=triton.next_power_of_2(heads), num_warps=4)
    return out


# strides keep their alignment hints (unhinted: 4.6x slower)
@triton.jit(do_not_specialize=["steps", "keys", "past", "window"])
def _window_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, first_ptr, out_ptr, steps, keys, past, window, scale,
                             heads, groups, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_t,
                             so_b, so_h, so_t, needle_ptr, sn_b, lse_ptr, score_ptr,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             NEEDLE: tl.constexpr, METRIC: tl.constexpr, CONTINUED: tl.constexpr):
    """Flash attention over the keys of a causal window (j <= i < j + window) and inside the boolean mask.
    Query i is key i + past's position (past: 0 for a whole prompt). CONTINUED: no mask; each row's keys before its
    first (first_ptr, per row) are left out instead (a prompt continuing a trunk's keys, lab.fast.fork).

    NEEDLE: the output is what the non-needle keys give, weighted as in the whole softmax (no renormalisation),
    and lse holds each query's log-sum-exp, from which the needle's few keys are weighted outside. METRIC 1 / 2:
    each head's sum of p ln p / L2 norm of its weights per query (score), from the running max and sums,
    without the weights themselves."""
    block = tl.program_id(0)
    batch, head = tl.program_id(1) // heads, tl.program_id(1) % heads
    kv_head = head // groups
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * sq_b + head * sq_h + rows[:, None].to(tl.int64) * sq_t + dims[None, :],
                mask=rows[:, None] < steps, other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    moment = tl.zeros([BLOCK_M], dtype=tl.float32)  # entropy: sum e^(s - best) (s - best); L2: sum e^(2 (s - best))
    first = 0
    if CONTINUED:
        first = tl.load(first_ptr + batch)
    at = rows + past  # each query's position among the keys
    low = tl.maximum(block * BLOCK_M + past - window + 1, first) // BLOCK_N * BLOCK_N
    high = tl.minimum((block + 1) * BLOCK_M + past, keys)
    for start in tl.range(low, high, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + batch * sk_b + kv_head * sk_h + cols[None, :].to(tl.int64) * sk_t + dims[:, None],
                    mask=cols[None, :] < keys, other=0.0)
        scores = tl.dot(q, k) * scale
        allowed = (cols[None, :] <= at[:, None]) & (cols[None, :] > at[:, None] - window) & (cols[None, :] < keys)
        if CONTINUED:
            allowed &= cols[None, :] >= first
        else:
            allowed &= tl.load(mask_ptr + batch * sm_b + rows[:, None].to(tl.int64) * sm_t + cols[None, :],
                               mask=(rows[:, None] < steps) & (cols[None, :] < keys), other=0) != 0
        scores = tl.where(allowed, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # rows with nothing allowed yet
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        if METRIC == 1:
            moved = tl.where(total > 0, (best - shift) * total, 0.0)
            moment = (moment + moved) * rescale + tl.sum(tl.where(allowed, p * (scores - shift[:, None]), 0.0), axis=1)
        elif METRIC == 2:
            moment = moment * rescale * rescale + tl.sum(p * p, axis=1)
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + batch * sv_b + kv_head * sv_h + cols[:, None].to(tl.int64) * sv_t + dims[None, :],
                    mask=cols[:, None] < keys, other=0.0)
        if NEEDLE:
            is_needle = tl.load(needle_ptr + batch * sn_b + cols, mask=cols < keys, other=0) != 0
            p = tl.where(is_needle[None, :], 0.0, p)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        best = new_best
    norm = tl.where(total > 0, total, 1.0)
    out_at = batch * so_b + head * so_h + rows[:, None].to(tl.int64) * so_t + dims[None, :]
    inside = rows[:, None] < steps
    tl.store(out_ptr + out_at, (acc / norm[:, None]).to(out_ptr.dtype.element_ty), mask=inside)
    per_head = (batch * heads + head).to(tl.int64) * steps + rows
    if NEEDLE:
        tl.store(lse_ptr + per_head, tl.where(total > 0, best + tl.log(norm), float("inf")), mask=rows < steps)
    if METRIC == 1:
        tl.store(score_ptr + per_head, moment / norm - tl.log(norm), mask=rows < steps)
    elif METRIC == 2:
        tl.store(score_ptr + per_head, tl.sqrt(moment) / norm, mask=rows < steps)


ATTENTION_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)  # fastest of 54 on an H100, head dim 256
METRICS = {None: 0, "entropy": 1, "l2": 2}


@dataclass
class WindowParts:
    """window_attention's output split for the needle-attention op and the sparsifier (see the kernel)."""

    out: torch.Tensor  # (B, T, H, D); with a needle: what the non-needle keys give
    needle_out: torch.Tensor | None = None  # (B, T, H, D)
    mass: torch.Tensor | None = None  # (B, H, T) float32
    needle_values: torch.Tensor | None = None  # (B, T, H, D) float32: the sum of the needle values a query sees
    shown: torch.Tensor | None = None  # (B, H, T) float32: how many needle keys a query sees
    score: torch.Tensor | None = None  # (B, H, T) float32


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, window: int,
                     scale: float) -> torch.Tensor:
    """Causal attention within `window` keys and a boolean mask (B|1, 1, T, T) for (B, H, T, D) queries and
    (B, KV, T, D) keys and values; returns (B, T, H, D), as transformers' attention functions do."""
    return window_attention_parts(query, key, value, mask, window, scale).out


@on_its_gpu
def window_attention_parts(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                           window: int, scale: float, needle: torch.Tensor | None = None,
                           metric: str | None = None) -> WindowParts:
    """window_attention, with the output split at the needle's keys (needle: (B, T) bool) and/or each head's
    score per query (metric: "entropy", sum of p ln p, or "l2", the norm of its weights)."""
    batch, heads, steps, dim = query.shape
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    if mask.stride(-1) != 1 or mask.stride(2) % 16:  # rows 16-aligned: one compiled kernel, hinted loads, any length
        padded = mask.new_zeros(*mask.shape[:-1], triton.cdiv(steps, 16) * 16)
        padded[..., :steps] = mask
        mask = padded
    parts = WindowParts(torch.empty((batch, steps, heads, dim), dtype=query.dtype, device=query.device))
    out = parts.out  # also the kernel's stand-in for pointers its flags leave unused
    per_head = (batch, heads, steps)
    lse = None if needle is None else torch.empty(per_head, dtype=torch.float32, device=query.device)
    if metric is not None:
        parts.score = torch.empty(per_head, dtype=torch.float32, device=query.device)
    needle_bytes = None if needle is None else needle.to(torch.uint8).contiguous()
    grid = (triton.cdiv(steps, ATTENTION_CONFIG["BLOCK_M"]), batch * heads)
    _window_attention_kernel[grid](
        query, key, value, mask.view(torch.uint8), out, out, steps, steps, 0, window, scale, heads,
        heads // key.shape[1], *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
        mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), out.stride(0), out.stride(2), out.stride(1),
        out if needle is None else needle_bytes, 0 if needle is None else needle_bytes.stride(0),
        out if lse is None else lse, out if parts.score is None else parts.score,
        HEAD_DIM=dim, NEEDLE=needle is not None, METRIC=METRICS[metric], CONTINUED=False, **ATTENTION_CONFIG)
    if needle is not None:
        _weigh_needle(parts, query, key, value, mask[..., :steps], window, scale, needle, lse)
    return parts


@on_its_gpu
def continued_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, first: torch.Tensor,
                        window: int, scale: float) -> torch.Tensor:
    """Causal attention within `window` keys for (B, H, T, D) queries that are the last T of (B, KV, S, D) keys
    and values, each row's keys before its `first` (B,) int32 left out (lab.fast.fork's rows: a trunk's keys
    before their start, then their own); returns (B, T, H, D)."""
    batch, heads, steps, dim = query.shape
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty((batch, steps, heads, dim), dtype=query.dtype, device=query.device)
    grid = (triton.cdiv(steps, ATTENTION_CONFIG["BLOCK_M"]), batch * heads)
    _window_attention_kernel[grid](
        query, key, value, out, first.to(torch.int32).contiguous(), out, steps, key.shape[2], key.shape[2] - steps,
        window, scale, heads, heads // key.shape[1], *query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
        0, 0, out.stride(0), out.stride(2), out.stride(1), out, 0, out, out,
        HEAD_DIM=dim, NEEDLE=False, METRIC=0, CONTINUED=True, **ATTENTION_CONFIG)
    return out


@triton.jit(do_not_specialize=["keys", "chunk"])
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, stats_ptr, keys, chunk, scale, heads, groups,
                             sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b,
                             HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query token's heads that share a key head (program 0: row x key head) over one chunk of the keys
    (program 1), the mask (B, keys) added to the scores: each head's unnormalised output (part: (B, H, chunks,
    D) float32) and its running max and sum (stats: (2, B, H, chunks))."""
    batch = (tl.program_id(0) // (heads // groups)).to(tl.int64)
    kv_head = tl.program_id(0) % (heads // groups)
    part, parts = tl.program_id(1), tl.num_programs(1)
    member = tl.arange(0, BLOCK_G)
    head = kv_head * groups + member
    in_group = member < groups
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + batch * sq_b + head[:, None] * sq_h + dims[None, :], mask=in_group[:, None], other=0.0)
    best = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    end = tl.minimum(part * chunk + chunk, keys)
    for start in tl.range(part * chunk, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < end
        k = tl.load(k_ptr + batch * sk_b + kv_head * sk_h + cols[None, :].to(tl.int64) * sk_t + dims[:, None],
                    mask=inside[None, :], other=0.0)
        scores = tl.dot(q, k) * scale + tl.load(mask_ptr + batch * sm_b + cols, mask=inside, other=0.0)[None, :]
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # every key so far hidden (a -inf mask)
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + batch * sv_b + kv_head * sv_h + cols[:, None].to(tl.int64) * sv_t + dims[None, :],
                    mask=inside[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        best = new_best
    at = (batch * heads + head) * parts + part
    tl.store(part_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc, mask=in_group[:, None])
    tl.store(stats_ptr + at, best, mask=in_group)
    tl.store(stats_ptr + tl.num_programs(0) * groups * parts + at, total, mask=in_group)


@triton.jit
def _decode_combine_kernel(part_ptr, stats_ptr, out_ptr, parts, count, HEAD_DIM: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    """Each (row, head)'s chunks joined: sum of exp(max_s - max) part_s over the same sum of totals."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    used = split < parts
    best = tl.load(stats_ptr + row * parts + split, mask=used, other=float("-inf"))
    total = tl.load(stats_ptr + count * parts + row * parts + split, mask=used, other=0.0)
    weight = tl.where(used, tl.exp(best - tl.max(best, axis=0)), 0.0)
    acc = tl.load(part_ptr + (row * parts + split)[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)
DECODE_PROGRAMS = 264  # rows x key heads x chunks: two programs a multiprocessor on an H100 / H200


@on_its_gpu
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query token per row, (B, H, 1, D), against (B, KV, S, D) keys and values (a decoder's fixed buffers),
    the additive mask (B, 1, 1, S) added to the scores; the keys are read in chunks side by side where rows x key
    heads are few. Returns (B, 1, H, D), as transformers' attention functions do."""
    batch, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    block = DECODE_CONFIG["BLOCK_N"]
    parts = max(1, min(triton.cdiv(DECODE_PROGRAMS, batch * kv_heads), triton.cdiv(keys, block)))
    chunk = triton.cdiv(triton.cdiv(keys, parts), block) * block
    parts = triton.cdiv(keys, chunk)
    partial = torch.empty((batch, heads, parts, dim), dtype=torch.float32, device=query.device)
    stats = torch.empty((2, batch, heads, parts), dtype=torch.float32, device=query.device)
    mask = mask.reshape(mask.shape[0], keys)
    if mask.stride(1) != 1:
        mask = mask.contiguous()
    _decode_attention_kernel[(batch * kv_heads, parts)](
        query, key, value, mask, partial, stats, keys, chunk, scale, heads, groups, query.stride(0), query.stride(1),
        *key.stride()[:3], *value.stride()[:3], mask.stride(0) if mask.shape[0] > 1 else 0,
        HEAD_DIM=dim, BLOCK_G=max(16, triton.next_power_of_2(groups)), **DECODE_CONFIG)
    out = torch.empty((batch, 1, heads, dim), dtype=query.dtype, device=query.device)
    _decode_combine_kernel[(batch * heads,)](partial, stats, out, parts, batch * heads, HEAD_DIM=dim,
                                             BLOCK_S=triton.next_power_of_2(parts))
    return out


def _weigh_needle(parts: WindowParts, query, key, value, mask, window: int, scale: float, needle, lse) -> None:
    """The needle's part of the attention from its few keys: their weights exp(score - lse) (the kernel's
    log-sum-exp over all keys, so no renormalisation), what they give, their mass, the values each query sees."""
    batch, heads, steps, _ = query.shape
    count = int(needle.sum(1).max())
    at = needle.float().topk(max(count, 1), dim=1, sorted=False).indices.sort(1).values  # (B, n) key positions
    real = needle.gather(1, at)  # False where a row has fewer needle tokens
    groups = heads // key.shape[1]
    keys, values = (t.gather(2, at[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])).float()
                    .repeat_interleave(groups, 1) for t in (key, value))  # (B, H, n, D)
    rows = torch.arange(steps, device=query.device)[:, None]
    seen = (at[:, None, :] <= rows) & (at[:, None, :] > rows - window) & real[:, None, :]  # (B, T, n)
    seen = seen[:, None] & mask.expand(batch, -1, -1, -1).gather(3, at[:, None, None, :].expand(-1, 1, steps, -1))
    weights = torch.exp(query.float() @ keys.transpose(2, 3) * scale - lse[..., None]) * seen  # (B, H, T, n)
    parts.needle_out = (weights @ values).transpose(1, 2).to(parts.out.dtype)
    parts.mass = weights.sum(-1)
    parts.shown = seen.sum(-1, dtype=torch.float32).expand(-1, heads, -1)
    parts.needle_values = (seen.float() @ values).transpose(1, 2)
