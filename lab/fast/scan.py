"""A parallel scan for diagonal linear recurrences h_t = a_t * h_{t-1} + x_t.

Hillis-Steele doubling: log2(T) elementwise steps over the whole sequence, each combining position t
with t - offset through (a, x) o (a', x') = (a a', a' x + x'). Products of gates in (0, 1] stay
stable. Without gradients on a GPU, a Triton kernel (lab.fast.triton_scan) does the same in one
pass. It replaces RecurrentGemma's Python loop over time steps (RG-LRU) for prefill where
lab.fast.griffin's fused RG-LRU kernel does not apply; decoding one token at a time still uses the
reference code. Where lab's fast paths are off for a model (lab.fast.state), the reference runs.
"""

from __future__ import annotations

import torch

from lab.fast.state import acts_on, triton_applies

_originals: dict = {}


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


def _rglru_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
    """RecurrentGemmaRglru._rnn_scan: the parallel scan for prefill where lab's fast paths are on, else
    (off, or decoding one token) the reference."""
    if hidden_states.shape[1] == 1 or not acts_on(self):
        return _originals["rnn_scan"](self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
    gate = recurrent_gate * ~reset
    out, last = linear_scan(gate, hidden_states, recurrent_states, out_dtype=hidden_states.dtype)
    return out, last.type(acc_dtype)


def install() -> None:
    """Route RecurrentGemmaRglru._rnn_scan through _rglru_scan (once)."""
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    if "rnn_scan" not in _originals:
        _originals["rnn_scan"] = rg.RecurrentGemmaRglru._rnn_scan
        rg.RecurrentGemmaRglru._rnn_scan = _rglru_scan
