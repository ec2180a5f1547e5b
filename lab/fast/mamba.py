"""A parallel selective scan for Mamba-1 blocks (Jamba) when the mamba-ssm kernels are missing.

transformers' fallback loops over time in Python. On a GPU without gradients, lab.fast.triton_mamba's
fused kernel scans in registers; otherwise this discretises the whole sequence at once and runs the
doubling scan of lab.fast.scan over the (channel, state) pairs. On a GPU only: on a CPU the reference
loop is faster.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from lab.fast.scan import linear_scan, triton_applies

_state = {"original": None}
PARALLEL_DEVICES = {"cuda"}  # on a CPU the reference loop over time is cheaper (measured 5x)


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, use_mambapy=False, use_associative_scan=False, **kwargs):
    """Same contract as transformers' jamba mamba_selective_scan: inputs (batch, channels, time)."""
    if use_mambapy or hidden_states.device.type not in PARALLEL_DEVICES:
        return _state["original"](hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state,
                                  use_mambapy=use_mambapy, use_associative_scan=use_associative_scan, **kwargs)
    batch, channels, steps = hidden_states.shape
    input_dtype = hidden_states.dtype
    state = A.shape[-1]
    if triton_applies(hidden_states, dt, B, C, z) and state & (state - 1) == 0:  # tl.arange: a power of 2
        from lab.fast import triton_mamba

        out, last = triton_mamba.selective_scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last.to(input_dtype)) if return_last_state else out
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.float().transpose(1, 2)  # (b, t, d)
    decay = torch.exp(A.float()[None, None] * dt[..., None])  # (b, t, d, n)
    inputs = (dt * hidden_states.float().transpose(1, 2))[..., None] * B.float().transpose(1, 2)[:, :, None, :]
    states, _ = linear_scan(decay.reshape(batch, steps, -1), inputs.reshape(batch, steps, -1))
    states = states.view(batch, steps, channels, state)
    out = torch.einsum("btdn,btn->bdt", states, C.float().transpose(1, 2))
    if D is not None:
        out = out + hidden_states.float() * D[None, :, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(input_dtype)
    if return_last_state:
        return out, states[:, -1].to(input_dtype)
    return out


def enable(on: bool = True) -> None:
    """Use the parallel scan for Jamba's Mamba blocks (only when mamba-ssm is not installed)."""
    from transformers.models.jamba import modeling_jamba as jamba

    if _state["original"] is None:
        _state["original"] = jamba.mamba_selective_scan
    kernels = importlib.util.find_spec("mamba_ssm") is not None
    jamba.mamba_selective_scan = selective_scan if on and not kernels else _state["original"]
