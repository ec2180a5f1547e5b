"""transformers' "sdpa" attention entry for the models lab.fast acts on.

A whole prompt's windowed attention (RecurrentGemma's local attention) runs as lab's window kernel, which
visits only the keys inside each query's window (half precision on a GPU), or else in query chunks against
those keys, instead of one masked product over every key; so do rows continuing a trunk's keys (Continued).
A plan's attention op (needle attention, sparsification: lab.fast.state.set_attention_op) takes a module's
calls instead, for RecurrentGemma and Jamba: a whole prompt through the same kernel (for Jamba's global
attention the window is the prompt), whose output it splits at the needle or whose heads it scores online,
and one-token decoding steps through the model's own eager attention. Decoding steps against a decoder's fixed
buffers (an additive mask over every slot) run in lab's decode kernel on a GPU. Everything else gets
transformers' sdpa.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lab.fast.state import acts_on, attention_op, has_triton, triton_applies

QUERY_CHUNK = 512
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
OPS_ON = ("recurrent_gemma", "jamba")  # models whose attention ops act in this entry
_originals: dict = {}


@dataclass(frozen=True)
class Continued:
    """The mask of rows that continue a trunk's keys (lab.fast.fork), as data for lab's window kernel: every row's
    queries are its last keys, and its keys before `first` (B,) lie before position 0."""

    first: torch.Tensor


def _whole_prompt(module, query, key, attention_mask, args, kwargs) -> bool:
    """Whether an attention call is a whole prompt's causal attention: queries against their own keys, a
    boolean (B|1, 1, T, T) mask or none (sdpa's causal flag), nothing but a window to apply."""
    steps = query.shape[-2]
    mask_fits = attention_mask is None or (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
        and attention_mask.shape[-3:] == (1, steps, steps))
    return (mask_fits and steps > 1 and key.shape[-2] == steps and not args and not kwargs.get("dropout", 0.0)
            and kwargs.get("softcap") is None and kwargs.get("is_causal") is not False
            and getattr(module, "is_causal", True))


def _decode_step(module, query, key, value, attention_mask, args, kwargs) -> bool:
    """Whether an attention call is RecurrentGemma's or Jamba's decoding step (whose arguments lab knows): one
    query token per row against a decoder's buffers, its additive mask (B|1, 1, 1, keys) holding the window and
    the empty slots."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return (model_type in OPS_ON and query.shape[-2] == 1 and isinstance(attention_mask, torch.Tensor)
            and attention_mask.is_floating_point() and attention_mask.shape[0] in (1, query.shape[0])
            and attention_mask.shape[1:] == (1, 1, key.shape[-2]) and value.shape[-1] == query.shape[-1]
            and query.shape[1] % key.shape[1] == 0 and not args and not kwargs.get("dropout", 0.0)
            and kwargs.get("softcap") is None)


def _scale(query, kwargs) -> float:
    """The call's softmax scale: its `scaling` (0 too), else sdpa's 1 / sqrt(head dim)."""
    scaling = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def _kernel_applies(query, key) -> bool:
    return (query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in (16, 32, 64, 128, 256)
            and triton_applies(query, key))


def window_parts(module, query, key, value, attention_mask, *args, sliding_window=None, needle=None, metric=None,
                 **kwargs):
    """lab's window kernel on a whole prompt (no window: causal over the prompt), its output split at the
    needle's keys (needle: (B, T) bool) and/or with each head's score (metric): triton_griffin.WindowParts, or
    None where the kernel does not apply."""
    if not (_whole_prompt(module, query, key, attention_mask, args, kwargs) and _kernel_applies(query, key)):
        return None
    from lab.fast import triton_griffin

    steps = query.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones((1, 1, steps, steps), dtype=torch.bool, device=query.device)
    window = sliding_window if isinstance(sliding_window, int) else steps
    return triton_griffin.window_attention_parts(query, key, value, attention_mask, window, _scale(query, kwargs),
                                                 needle=needle, metric=metric)


def eager(module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own eager attention (it returns the weights) for a call that came through the sdpa entry,
    whose mask may be boolean or absent (sdpa's causal flag) where eager adds one."""
    own = sys.modules[type(module).__module__].eager_attention_forward
    window = kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    if attention_mask is None:  # causal: the last query sees the last key
        queries, keys = query.shape[-2], key.shape[-2]
        positions = torch.arange(keys, device=query.device)
        offset = positions[None] - positions[keys - queries:, None]  # key position - query position
        attention_mask = (offset <= 0) & (offset > -window if isinstance(window, int) else True)
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    return own(module, query, key, value, attention_mask, *args, **kwargs)


def windowed_sdpa(module, query, key, value, attention_mask, *args, sliding_window=None, **kwargs):
    """Windowed attention over a whole prompt: lab's kernel on a GPU in half precision; elsewhere
    transformers' sdpa in chunks of queries against only the keys inside their window."""
    steps = query.shape[-2]
    original = _originals["sdpa"]
    if _decode_step(module, query, key, value, attention_mask, args, kwargs) and _kernel_applies(query, key):
        from lab.fast import triton_griffin

        return triton_griffin.decode_attention(query, key, value, attention_mask, _scale(query, kwargs)), None
    if isinstance(attention_mask, Continued):  # fork.continued passes one only where the kernel applies
        from lab.fast import triton_griffin

        return triton_griffin.continued_attention(query, key, value, attention_mask.first, sliding_window,
                                                  _scale(query, kwargs)), None
    if not (isinstance(sliding_window, int) and isinstance(attention_mask, torch.Tensor)
            and _whole_prompt(module, query, key, attention_mask, args, kwargs)):
        return original(module, query, key, value, attention_mask, *args, sliding_window=sliding_window, **kwargs)
    if _kernel_applies(query, key):
        parts = window_parts(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
        return parts.out, None
    if steps <= QUERY_CHUNK:
        return original(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
    outputs = []
    for start in range(0, steps, QUERY_CHUNK):
        end, low = min(start + QUERY_CHUNK, steps), max(0, start - sliding_window + 1)
        out, _ = original(module, query[:, :, start:end], key[:, :, low:end], value[:, :, low:end],
                          attention_mask[:, :, start:end, low:end], sliding_window=sliding_window, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, 1), None


def takes_attention_ops(model) -> bool:
    """Whether a plan's attention ops (needle attention, sparsification) act inside this entry for this model,
    instead of switching it to eager attention: RecurrentGemma or Jamba on lab's fast paths with sdpa, where
    lab's window kernel runs (half precision on a GPU, Triton importable)."""
    config, weight = model.config, next(model.parameters())
    return (config.model_type in OPS_ON and acts_on(model) and config._attn_implementation == "sdpa"
            and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and has_triton()
            and not getattr(model, "hf_device_map", None))


def _sdpa(module, query, *args, **kwargs):
    """transformers' "sdpa" entry: for modules lab.fast acts on, a plan's attention op if one is set, else
    windowed attention as above and, on a GPU, without cuDNN's attention (it builds a plan per new prompt
    shape: seconds per length of a grid; the flash and memory-efficient kernels need none)."""
    if not acts_on(module):
        return _originals["sdpa"](module, query, *args, **kwargs)
    attend = attention_op(module) or windowed_sdpa
    if not query.is_cuda:
        return attend(module, query, *args, **kwargs)
    with sdpa_kernel(NO_CUDNN):
        return attend(module, query, *args, **kwargs)


def install() -> None:
    """Put `_sdpa` in transformers' attention registry (once)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not _originals:
        _originals["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _sdpa
