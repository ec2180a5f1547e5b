"""A chunked parallel scan for diagonal linear recurrences h_t = a_t * h_{t-1} + x_t.

Within a chunk of C steps, h = L @ x + exp(cumsum log a) * h_prev, where L[t, s] = prod a_{s+1..t};
chunks are chained sequentially. It replaces RecurrentGemma's Python loop over time steps
(RG-LRU) for prefill; decoding one token at a time still uses the reference code.
"""

from __future__ import annotations

import math

import torch

CHUNK = 64
_LOG_FLOOR = -80.0  # log of a gate of 0 (a reset): exp(-80) is 0 at float32 precision for our purposes
_state = {"enabled": False, "original": None}


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None = None,
                chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """All states of h_t = a_t * h_{t-1} + x_t for (B, T, D) inputs, in float32; returns (h, h_T)."""
    a, x = a.float(), x.float()
    batch, steps, width = x.shape
    h = torch.zeros(batch, width, device=x.device) if h0 is None else h0.float().to(x.device)
    log_a = torch.log(a.clamp_min(math.exp(_LOG_FLOOR)))  # clamp first: log(0) would poison gradients
    outs = []
    for start in range(0, steps, chunk):
        la, xc = log_a[:, start:start + chunk], x[:, start:start + chunk]
        c = xc.shape[1]
        cum = la.cumsum(1)  # (B, C, D)
        diff = cum[:, :, None, :] - cum[:, None, :, :]  # (B, t, s, D) = sum log a_{s+1..t}
        causal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        weights = torch.where(causal[None, :, :, None], diff, torch.full_like(diff, float("-inf"))).exp()
        hc = torch.einsum("btsd,bsd->btd", weights, xc) + cum.exp() * h[:, None, :]
        outs.append(hc)
        h = hc[:, -1]
    return torch.cat(outs, 1), h


def _rglru_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
    """Drop-in for RecurrentGemmaRglru._rnn_scan: the parallel scan for prefill, reference for decode."""
    if hidden_states.shape[1] == 1:
        return _state["original"](self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
    gate = recurrent_gate * ~reset
    out, last = linear_scan(gate, hidden_states, recurrent_states)
    return out.type(hidden_states.dtype), last.type(acc_dtype)


def enable(on: bool = True) -> None:
    """Switch lab's fast RG-LRU scan on (default) or back to transformers' reference loop."""
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    if _state["original"] is None:
        _state["original"] = rg.RecurrentGemmaRglru._rnn_scan
    rg.RecurrentGemmaRglru._rnn_scan = _rglru_scan if on else _state["original"]
    _state["enabled"] = on


def enabled() -> bool:
    return _state["enabled"]
