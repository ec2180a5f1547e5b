"""RecurrentGemma's prefill with lab's GPU kernels (lab.fast.triton_griffin), for models lab.fast acts on.

The recurrent block, the RMSNorm and the MLP get forwards that use the kernels when the input is on a
GPU, no gradient is wanted and Triton is importable; otherwise (CPU, training, one-token decoding)
they call transformers' own. Hooks on these modules fire as before. Windowed attention over a whole
prompt runs as one kernel that visits only the keys inside each query's window (in half precision on a
GPU), or else in query chunks against those keys, instead of one masked product over every key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lab.fast.state import acts_on, attention_op, has_triton, triton_applies

QUERY_CHUNK = 512
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_originals: dict = {}


def _rms_norm_forward(self, x):
    if not (acts_on(self) and triton_applies(x, self.weight) and x.is_contiguous()):
        return _originals["norm"](self, x)
    from lab.fast import triton_griffin

    return triton_griffin.rms_norm(x, self.weight, self.eps)


def _mlp_forward(self, hidden_states):
    gelu_tanh = self.config.hidden_activation == "gelu_pytorch_tanh"
    if not (gelu_tanh and acts_on(self) and triton_applies(hidden_states, self.gate_proj.weight)):
        return _originals["mlp"](self, hidden_states)
    from lab.fast import triton_griffin

    return self.down_proj(triton_griffin.gelu_mul(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


def _recurrent_block_forward(self, input_states, position_ids, attention_mask, use_cache=True, **kwargs):
    batch, steps, _ = input_states.shape
    if (steps == 1 or type(self.act_fn).__name__ != "GELUTanh" or not acts_on(self)
            or not triton_applies(input_states, self.linear_x.weight)):
        return _originals["block"](self, input_states, position_ids, attention_mask, use_cache=use_cache, **kwargs)
    from lab.fast import triton_griffin

    lru = self.rg_lru
    x = self.linear_x(input_states)
    y = self.linear_y(input_states)
    if use_cache:  # as the reference: a new batch starts from zero states, the conv state keeps the last inputs
        if self.conv1d_state is None or self.conv1d_state.shape[0] != batch:
            lru.recurrent_states = torch.zeros((batch, self.lru_width), device=x.device, dtype=torch.float32)
        self.conv1d_state = F.pad(x.transpose(1, 2), (self.conv1d_width - steps - 1, 0))
        start_state = lru.recurrent_states
    else:
        self.conv1d_state = lru.recurrent_states = start_state = None
    conv = triton_griffin.causal_conv(x, self.conv_1d.weight, self.conv_1d.bias)
    heads, width = lru.num_attention_heads, lru.block_width
    gate_weights = torch.cat([lru.input_gate_weight, lru.recurrent_gate_weight], -1)
    gates = torch.bmm(conv.view(batch * steps, heads, width).transpose(0, 1), gate_weights)
    reset = (position_ids == 0).expand(batch, steps)
    out, last = triton_griffin.rglru(conv, gates, lru.input_gate_bias, lru.recurrent_gate_bias, lru.recurrent_param,
                                     reset, y, start_state)
    if use_cache:
        lru.recurrent_states = last
    return self.linear_out(out), None


def _whole_prompt(module, query, key, attention_mask, sliding_window, args, kwargs) -> bool:
    """Whether an attention call is a whole prompt's windowed attention: queries against their own keys, a
    boolean (B|1, 1, T, T) mask, nothing but the window to apply."""
    steps = query.shape[-2]
    return (isinstance(sliding_window, int) and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dtype == torch.bool and attention_mask.shape[-3:] == (1, steps, steps)
            and key.shape[-2] == steps and not args and not kwargs.get("dropout", 0.0)
            and kwargs.get("softcap") is None and kwargs.get("is_causal") is not False
            and getattr(module, "is_causal", True))


def _kernel_applies(query, key) -> bool:
    return (query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in (16, 32, 64, 128, 256)
            and triton_applies(query, key))


def window_parts(module, query, key, value, attention_mask, *args, sliding_window=None, needle=None, metric=None,
                 **kwargs):
    """lab's window kernel on a whole prompt, its output split at the needle's keys (needle: (B, T) bool) and/or
    with each head's score (metric): triton_griffin.WindowParts, or None where the kernel does not apply."""
    if not (_whole_prompt(module, query, key, attention_mask, sliding_window, args, kwargs)
            and _kernel_applies(query, key)):
        return None
    from lab.fast import triton_griffin

    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    return triton_griffin.window_attention_parts(query, key, value, attention_mask, sliding_window, scale,
                                                 needle=needle, metric=metric)


def eager(module, query, key, value, attention_mask, *args, **kwargs):
    """RecurrentGemma's own eager attention (it returns the weights) for a call that came through the sdpa
    entry, whose mask is boolean where eager adds it."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import eager_attention_forward

    window = kwargs.pop("sliding_window", None)
    kwargs.pop("is_causal", None)
    if attention_mask is None:  # sdpa's causal flag: the last query sees the last key
        queries, keys = query.shape[-2], key.shape[-2]
        offset = torch.arange(keys, device=query.device)[None] - torch.arange(keys - queries, keys, device=query.device)[:, None]
        attention_mask = (offset <= 0) & (offset > -window if isinstance(window, int) else True)
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    return eager_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def windowed_sdpa(module, query, key, value, attention_mask, *args, sliding_window=None, **kwargs):
    """Windowed attention over a whole prompt: lab's kernel on a GPU in half precision; elsewhere
    transformers' sdpa in chunks of queries against only the keys inside their window."""
    steps = query.shape[-2]
    original = _originals["sdpa"]
    if not _whole_prompt(module, query, key, attention_mask, sliding_window, args, kwargs):
        return original(module, query, key, value, attention_mask, *args, sliding_window=sliding_window, **kwargs)
    if _kernel_applies(query, key):
        return window_parts(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs).out, None
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
    """Whether a plan's attention ops (needle attention, sparsification) act inside lab's attention entry for
    this model, instead of switching it to eager attention: RecurrentGemma on lab's fast paths with sdpa, where
    lab's window kernel runs (half precision on a GPU, Triton importable)."""
    config, weight = model.config, next(model.parameters())
    return (config.model_type == "recurrent_gemma" and acts_on(model) and config._attn_implementation == "sdpa"
            and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and has_triton())


def _sdpa(module, query, *args, **kwargs):
    """transformers' "sdpa" entry: for modules lab.fast acts on, a plan's attention op if one is set
    (lab.fast.state.set_attention_op), else windowed attention as above and, on a GPU, without cuDNN's
    attention (it builds a plan per new prompt shape: seconds per length of a grid; the flash and
    memory-efficient kernels need none)."""
    if not acts_on(module):
        return _originals["sdpa"](module, query, *args, **kwargs)
    attend = attention_op(module) or windowed_sdpa
    if not query.is_cuda:
        return attend(module, query, *args, **kwargs)
    with sdpa_kernel(NO_CUDNN):
        return attend(module, query, *args, **kwargs)


def install() -> None:
    """Route RecurrentGemma's norm, MLP and recurrent block forwards and the "sdpa" attention entry through
    the functions above (once)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    if _originals:
        return
    targets = {"norm": (rg.RecurrentGemmaRMSNorm, _rms_norm_forward), "mlp": (rg.RecurrentGemmaMlp, _mlp_forward),
               "block": (rg.RecurrentGemmaRecurrentBlock, _recurrent_block_forward)}
    for key, (cls, fast_forward) in targets.items():
        _originals[key] = cls.forward
        cls.forward = fast_forward
    _originals["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _sdpa
