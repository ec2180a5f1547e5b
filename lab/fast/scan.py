"""A parallel scan for diagonal linear recurrences h_t = a_t * h_{t-1} + x_t.

Hillis-Steele doubling: log2(T) elementwise steps over the whole sequence, each combining position t
with t - offset through (a, x) o (a', x') = (a a', a' x + x'). Products of gates in (0, 1] stay
stable. Without gradients on a GPU, a Triton kernel (lab.fast.triton_scan) does the same in one
pass. It replaces RecurrentGemma's Python loop over time steps (RG-LRU) for prefill where
lab.fast.griffin's fused RG-LRU kernel does not apply; decoding one token at a time still uses the
reference code.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

_state = {"enabled": False, "original": None}


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All states of h_t = a_t * h_{t-1} + x_t for (B, T, D) inputs as out_dtype, and the float32 h_T.

    On a GPU with Triton and no gradient wanted, lab.fast.triton_scan's one-pass kernel; elsewhere
    the doubling scan (differentiable)."""
    if triton_applies(x, a):
        from lab.fast import triton_scan

        return triton_scan.linear_scan(a, x, h0, out_dtype)
    a, x = a.float(), x.float()
    if h0 is not None:
        x = torch.cat([x[:, :1] + a[:, :1] * h0.float().to(x.device)[:, None], x[:, 1:]], 1)
    offset, steps = 1, x.shape[1]
    while offset < steps:
        x = torch.cat([x[:, :offset], x[:, offset:] + a[:, offset:] * x[:, :-offset]], 1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], 1)
        offset *= 2
    return x.to(out_dtype), x[:, -1]


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_applies(first: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether lab's Triton kernels may take these tensors: on a GPU, Triton importable, and no gradient
    wanted through any of them (the kernels have no backward)."""
    tensors = [t for t in (first, *others) if t is not None]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return first.is_cuda and not wants_grad and has_triton()


def _rglru_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
    """Drop-in for RecurrentGemmaRglru._rnn_scan: the parallel scan for prefill, reference for decode."""
    if hidden_states.shape[1] == 1:
        return _state["original"](self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
    gate = recurrent_gate * ~reset
    out, last = linear_scan(gate, hidden_states, recurrent_states, out_dtype=hidden_states.dtype)
    return out, last.type(acc_dtype)


def enable(on: bool = True) -> None:
    """Switch lab's parallel scans on (default) or back to transformers' reference loops."""
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    from lab.fast import griffin, mamba

    mamba.enable(on)
    griffin.enable(on)
    # cuDNN's attention builds a plan per new shape (seconds for masked, window-limited prompts); the
    # flash and memory-efficient kernels need none, so a grid of lengths does not pay it per length.
    torch.backends.cuda.enable_cudnn_sdp(not on)
    if _state["original"] is None:
        _state["original"] = rg.RecurrentGemmaRglru._rnn_scan
    rg.RecurrentGemmaRglru._rnn_scan = _rglru_scan if on else _state["original"]
    _state["enabled"] = on


def enabled() -> bool:
    return _state["enabled"]
