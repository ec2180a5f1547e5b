"""A parallel selective scan and a fused causal convolution for Mamba-1 blocks (Jamba) when the mamba-ssm and
causal-conv1d kernels are missing.

transformers' fallback loops over time in Python. On a GPU without gradients, lab.fast.triton_mamba's
fused kernel scans in registers; otherwise this discretises the whole sequence at once and runs the
doubling scan of lab.fast.scan over the (channel, state) pairs. On a GPU only: on a CPU the reference
loop is faster. A decoding step's state update is one kernel there too.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util

import torch
import torch.nn.functional as F

from lab.fast import taps
from lab.fast.scan import linear_scan
from lab.fast.state import acts_on, enabled, triton_applies

_originals: dict = {}
_mixer_fast = contextvars.ContextVar("lab_fast_mamba_mixer", default=None)  # set while a mixer runs
_initial = contextvars.ContextVar("lab_fast_mamba_initial", default=None)  # the cached state a prompt continues
_layer = contextvars.ContextVar("lab_fast_mamba_layer", default=None)  # the running mixer's layer index
PARALLEL_DEVICES = {"cuda"}  # on a CPU the reference loop over time is cheaper (measured 5x)


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, use_mambapy=False, use_associative_scan=False, **kwargs):
    """Same contract as transformers' jamba mamba_selective_scan: inputs (batch, channels, time). The reference
    runs where lab.fast does not act on the calling mixer, mamba-ssm is installed, or on a CPU, except for a
    prompt that continues a cached state (_initial), which only lab's scans start from, and for a trunk whose
    states lab.fast.taps records (scanned in segments that end at its tapped positions)."""
    fast, initial = _mixer_fast.get(), _initial.get()
    tapping = taps.active(hidden_states.shape[-1], hidden_states.shape[0]) if fast and initial is None else None
    if initial is None and tapping is None and (
            not (enabled() if fast is None else fast) or _has_mamba_ssm() or use_mambapy
            or hidden_states.device.type not in PARALLEL_DEVICES):
        return _originals["scan"](hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state,
                                  use_mambapy=use_mambapy, use_associative_scan=use_associative_scan, **kwargs)
    if tapping is None:
        out, last = _scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, initial)
    else:
        outs, last = [], None
        for start, end in tapping.segments(hidden_states.shape[-1]):
            part = slice(start, end)
            out, last = _scan(hidden_states[..., part], dt[..., part], A, B[..., part], C[..., part], D,
                              None if z is None else z[..., part], delta_bias, delta_softplus, last)
            outs.append(out)
            tapping.keep(_layer.get(), "ssm", end, last.clone())
        out = torch.cat(outs, -1)
    return (out, last.to(hidden_states.dtype)) if return_last_state else out


def _scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, initial):
    """lab's scan from `initial` (or zeros): (output (batch, channels, time), float32 last state)."""
    batch, channels, steps = hidden_states.shape
    input_dtype = hidden_states.dtype
    state = A.shape[-1]
    if triton_applies(hidden_states, dt, B, C, z) and state & (state - 1) == 0:  # tl.arange: a power of 2
        from lab.fast import triton_mamba

        return triton_mamba.selective_scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, initial)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.float().transpose(1, 2)  # (b, t, d)
    decay = torch.exp(A.float()[None, None] * dt[..., None])  # (b, t, d, n)
    inputs = (dt * hidden_states.float().transpose(1, 2))[..., None] * B.float().transpose(1, 2)[:, :, None, :]
    start = None if initial is None else initial.float().reshape(batch, -1)
    states, _ = linear_scan(decay.reshape(batch, steps, -1), inputs.reshape(batch, steps, -1), start)
    states = states.view(batch, steps, channels, state)
    out = torch.einsum("btdn,btn->bdt", states, C.float().transpose(1, 2))
    if D is not None:
        out = out + hidden_states.float() * D[None, :, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(input_dtype), states[:, -1]


def selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None,
                           **kwargs):
    """transformers' Jamba mamba_selective_state_update (one decoding step, the state updated in place): on a GPU,
    for mixers lab.fast acts on, lab's one-kernel step (lab.fast.triton_mamba); else the reference."""
    if not (_mixer_fast.get() and not _has_mamba_ssm() and state.is_contiguous()
            and A.shape[-1] & (A.shape[-1] - 1) == 0 and triton_applies(hidden_states, state, dt, B, C, z)):
        return _originals["update"](state, hidden_states, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                    z=z, **kwargs)
    from lab.fast import triton_mamba

    return triton_mamba.selective_state_update(state, hidden_states, dt, A, B, C, D, dt_bias, dt_softplus, z)


def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
    """transformers' Jamba causal_conv1d_fn (inputs (batch, channels, time)): on a GPU, for mixers lab.fast acts
    on, lab's causal-convolution kernel with the silu fused, reading the projection's (batch, time, channels)
    memory as it lies (the reference convolves a transposed copy); its output is that layout, seen transposed."""
    x = hidden_states.transpose(1, 2)  # (b, t, d): the in-projection's own layout, channels contiguous
    if not (_mixer_fast.get() and not _has_causal_conv1d() and bias is not None and activation in (None, "silu")
            and x.stride(-1) == 1 and weight.is_contiguous() and triton_applies(x, weight, bias)):
        return _originals["conv"](hidden_states, weight, bias, activation=activation, **kwargs)
    from lab.fast import triton_griffin

    return triton_griffin.causal_conv(x, weight, bias, silu=activation == "silu").transpose(1, 2)


@functools.cache
def _has_mamba_ssm() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


@functools.cache
def _has_causal_conv1d() -> bool:
    return importlib.util.find_spec("causal_conv1d") is not None


def _mixer_forward(self, hidden_states, *args, **kwargs):
    """JambaMambaMixer.forward, telling selective_scan whether lab.fast acts on this mixer and, for a prompt that
    continues a cached one (lab.fast.prefix), the state to start from: transformers' own prefill starts
    every prompt from zeros."""
    fast = acts_on(self)
    cache = kwargs.get("cache", args[0] if args else None)
    initial = None
    if fast and cache is not None and hidden_states.shape[1] > 1:
        initial = cache.get_recurrent_state(self.layer_idx)
    tokens = _mixer_fast.set(fast), _initial.set(initial), _layer.set(self.layer_idx)
    try:
        return _originals["mixer"](self, hidden_states, *args, **kwargs)
    finally:
        _mixer_fast.reset(tokens[0])
        _initial.reset(tokens[1])
        _layer.reset(tokens[2])


def install() -> None:
    """Route Jamba's mixer forward and its module's mamba_selective_scan, mamba_selective_state_update and
    causal_conv1d_fn through the functions above (once)."""
    from transformers.models.jamba import modeling_jamba as jamba

    if _originals:
        return
    _originals["mixer"], _originals["scan"] = jamba.JambaMambaMixer.forward, jamba.mamba_selective_scan
    _originals["conv"], _originals["update"] = jamba.causal_conv1d_fn, jamba.mamba_selective_state_update
    jamba.JambaMambaMixer.forward, jamba.mamba_selective_scan = _mixer_forward, selective_scan
    jamba.causal_conv1d_fn, jamba.mamba_selective_state_update = causal_conv1d_fn, selective_state_update
