"""RecurrentGemma's prefill with lab's GPU kernels (lab.fast.triton_griffin), for models lab.fast acts on.

The recurrent block (its one-token decoding steps too), the attention's rotary embedding, the RMSNorm and the
MLP get forwards that use the kernels when the input is on a GPU, no gradient is wanted and Triton is
importable; otherwise (CPU, training) they call transformers' own. Hooks on these modules and their
projections fire as before. Its windowed attention is in lab.fast.attention. A recurrent block in a forward
of lab.fast.fork (a trunk keeping its states, or rows continuing them) runs here on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.utils.deprecation import deprecate_kwarg

from lab.fast import fork, taps
from lab.fast.state import acts_on, triton_applies

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


@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as transformers' forward
def _attention_forward(self, hidden_states, position_ids=None, attention_mask=None, cache=None, **kwargs):
    """transformers' RecurrentGemma attention with the rotary embedding of queries and keys in one kernel each
    (the reference: a dozen small ops and copies) where it applies (a GPU, no gradient wanted, head dims a power
    of two); the projections, cache and attention entry as there."""
    if not (acts_on(self) and self.head_dim & (self.head_dim - 1) == 0
            and triton_applies(hidden_states, self.q_proj.weight)):
        return _originals["attention"](self, hidden_states, position_ids, attention_mask, cache, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    from lab.fast import triton_griffin

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape)
    key = self.k_proj(hidden_states).view(hidden_shape)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = self.rotary_emb(value, position_ids)
    if triton_applies(query, key):
        query, key = (triton_griffin.rotary(t, cos, sin).transpose(1, 2) for t in (query, key))
    else:  # a projection (its weight, or a hook on it) wants a gradient
        query, key = rg.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, rg.eager_attention_forward)
    out, weights = interface(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             sliding_window=self.sliding_window, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _kernels_apply(self, input_states) -> bool:
    return type(self.act_fn).__name__ == "GELUTanh" and triton_applies(input_states, self.linear_x.weight)


def _recurrent_block_forward(self, input_states, position_ids, attention_mask, use_cache=True, **kwargs):
    batch, steps, _ = input_states.shape
    cache, tapping = kwargs.get("cache"), taps.active(steps, batch)
    if steps > 1 and acts_on(self) and (isinstance(cache, fork.Continuation) or tapping is not None):
        return _from_states(self, input_states, position_ids, cache, tapping)
    has_states = use_cache and self.conv1d_state is not None and self.conv1d_state.shape[0] == batch
    if not acts_on(self) or not _kernels_apply(self, input_states) or (steps == 1 and not has_states):
        return _originals["block"](self, input_states, position_ids, attention_mask, use_cache=use_cache, **kwargs)
    if steps == 1:
        return _step(self, input_states, position_ids)
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
    out, last, _ = _rglru(self, conv, y, position_ids, start_state)
    if use_cache:
        lru.recurrent_states = last
    return self.linear_out(out), None


def _step(self, input_states, position_ids):
    """One decoding step through lab's kernels, from the block's conv inputs and RG-LRU state (the reference: some
    thirty small ops); leaves the new ones in the block, as the reference does."""
    from lab.fast import triton_griffin

    x = self.linear_x(input_states)
    y = self.linear_y(input_states)
    conv, self.conv1d_state = triton_griffin.conv_step(x, self.conv_1d.weight, self.conv_1d.bias, self.conv1d_state)
    out, self.rg_lru.recurrent_states, _ = _rglru(self, conv, y, position_ids, self.rg_lru.recurrent_states)
    return self.linear_out(out), None


def _rglru(self, conv, y, position_ids, start, keep: tuple[int, ...] = ()):
    """lab's RG-LRU kernel over (B, T, W) conv output from `start` (B, W) float32 or zeros (None), times gelu(y):
    (that product, the last state, the states before positions `keep` or None)."""
    from lab.fast import triton_griffin

    lru = self.rg_lru
    batch, steps, _ = conv.shape
    heads, width = lru.num_attention_heads, lru.block_width
    gate_weights = torch.cat([lru.input_gate_weight, lru.recurrent_gate_weight], -1)
    gates = torch.bmm(conv.reshape(batch * steps, heads, width).transpose(0, 1), gate_weights)
    reset = (position_ids == 0).expand(batch, steps)
    return triton_griffin.rglru(conv.contiguous(), gates, lru.input_gate_bias, lru.recurrent_gate_bias,
                                lru.recurrent_param, reset, y.contiguous(), start, keep)


def _from_states(self, input_states, position_ids, cache, tapping):
    """The block from each row's states at its start (a group of lab.fast.fork, whose cache holds them), or from
    zeros keeping the states at the tapped positions (its trunk); lab's kernels where they apply, else torch
    (the reference's convolution and RG-LRU). Leaves the last conv inputs and RG-LRU state in the block, as the
    reference's prefill does."""
    batch, steps, _ = input_states.shape
    kernel = self.conv1d_width - 1
    x = self.linear_x(input_states)
    y = self.linear_y(input_states)
    if tapping is not None:
        prior = x.new_zeros((batch, self.lru_width, kernel))
        state = torch.zeros((batch, self.lru_width), device=x.device, dtype=torch.float32)
        tapping.keep_inputs(self, x.transpose(1, 2), kernel)
    else:
        prior, state = cache.start_states(self)
    if _kernels_apply(self, input_states):  # one pass, the RG-LRU kernel keeping the states at the taps
        from lab.fast import triton_griffin

        conv = triton_griffin.causal_conv(x, self.conv_1d.weight, self.conv_1d.bias,
                                          prior=None if tapping is not None else prior)  # the trunk's: zeros
        keep = tuple(p for p in tapping.positions if p <= steps) if tapping is not None else ()
        out, state, kept = _rglru(self, conv, y, position_ids, state, keep)
        if keep:
            tapping.keep_all(self, "lru", list(keep), kept[:, None])  # (taps, 1, width)
    else:  # the reference's convolution and RG-LRU, in segments ending at the taps
        inputs = torch.cat([prior.to(x.dtype), x.transpose(1, 2)], 2)  # (B, W, kernel + T)
        conv = F.conv1d(inputs, self.conv_1d.weight, self.conv_1d.bias, groups=self.lru_width).transpose(1, 2)
        outs = []
        for begin, end in tapping.segments(steps) if tapping is not None else [(0, steps)]:
            part = slice(begin, end)
            self.rg_lru.recurrent_states = state
            outs.append(self.rg_lru(conv[:, part], position_ids[:, part]) * self.act_fn(y[:, part]))
            state = self.rg_lru.recurrent_states
            if tapping is not None:
                tapping.keep(self, "lru", end, state.clone())
        out = torch.cat(outs, 1)
    recent = x[:, max(0, steps - kernel):].transpose(1, 2)
    self.conv1d_state = torch.cat([prior.to(x.dtype), recent], 2)[..., recent.shape[2]:]  # the last kernel inputs
    self.rg_lru.recurrent_states = state
    return self.linear_out(out), None


def install() -> None:
    """Route RecurrentGemma's norm, MLP and recurrent block forwards through the functions above (once)."""
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as rg

    if _originals:
        return
    targets = {"norm": (rg.RecurrentGemmaRMSNorm, _rms_norm_forward), "mlp": (rg.RecurrentGemmaMlp, _mlp_forward),
               "block": (rg.RecurrentGemmaRecurrentBlock, _recurrent_block_forward),
               "attention": (rg.RecurrentGemmaAttention, _attention_forward)}
    for key, (cls, fast_forward) in targets.items():
        _originals[key] = cls.forward
        cls.forward = fast_forward
