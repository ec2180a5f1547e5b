"""Greedy decoding for Jamba from fixed buffers, replayed as one CUDA graph on a GPU.

As lab.fast.decode does for RecurrentGemma: each prompt length is prefilled apart (no padding reaches the
Mamba states), then the attention keys and values move into buffers as long as the longest prompt plus the
new tokens (slot = position) and the Mamba conv and SSM states into fixed tensors, which the model's own
one-token step updates in place (so a plan's hooks still act). Every row keeps its own position, so the
prompts of all lengths decode together. The MoE feed-forward runs through transformers' grouped_mm experts
(one grouped product over the fused gate_up_proj / down_proj weights, routing on the device, no loop over
experts); a model whose experts run on another implementation decodes with generate(). On a CPU the same step runs
eagerly (tests).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lab.fast import fork
from lab.fast.decode import LOGIT_COPIES, SlotWriter, prefill_groups, run_steps
from lab.fast.state import enabled


def supports(model) -> bool:
    """Whether `greedy` may decode this model: lab's fast paths on for it, Jamba with sdpa or eager attention,
    grouped_mm experts if it has experts (the eager ones loop on the host), on one device (no accelerate hooks)."""
    config = model.config
    return (enabled(model) and config.model_type == "jamba" and config._attn_implementation in ("sdpa", "eager")
            and (config.num_experts == 1 or config._experts_implementation == "grouped_mm")
            and not getattr(model, "hf_device_map", None))


def row_bytes(model, length: int) -> int:
    """Memory `greedy` holds per prompt of `length` tokens (new ones included): keys and values, Mamba states,
    logits."""
    config, size = model.config, model.dtype.itemsize
    mamba = sum(kind == "linear_attention" for kind in config.layer_types)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = 2 * (len(config.layer_types) - mamba) * config.num_key_value_heads * length * head_dim * size
    states = mamba * config.mamba_expand * config.hidden_size * (config.mamba_d_conv + config.mamba_d_state) * size
    return keys + states + LOGIT_COPIES * config.vocab_size * 4


class FixedCache(SlotWriter):
    """The cache a one-token Jamba step reads and writes: keys and values (B, kv heads, length, head dim) per
    attention layer, conv and SSM states per Mamba layer, all in tensors allocated once."""

    def __init__(self, model, batch: int, length: int, device, dtype):
        config = model.config
        kinds = config.layer_types
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, length, head_dim)
        self.mamba = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
        attention = [i for i in range(len(kinds)) if i not in self.mamba]
        self.keys = {i: torch.zeros(shape, device=device, dtype=dtype) for i in attention}
        self.values = {i: torch.zeros(shape, device=device, dtype=dtype) for i in attention}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.batch = batch
        self.slot_position = torch.arange(length, device=device)[None]  # key slot = position (needle attention)
        self.slot = torch.zeros((batch, 1), device=device, dtype=torch.long)

    def fill(self, prefilled: DynamicCache | fork.Continuation, rows: slice) -> None:
        """Copy a prefilled group's keys, values and Mamba states into its rows (states in the prefill's dtype,
        as generate() keeps them)."""
        for i in self.keys:
            if isinstance(prefilled, fork.Continuation):  # rows of their own lengths
                for r, row in enumerate(range(rows.start, rows.stop)):
                    keys, values = prefilled.history(i, r)
                    self.keys[i][row, :, :keys.shape[1]] = keys
                    self.values[i][row, :, :values.shape[1]] = values
                continue
            keys, values = prefilled.layers[i].keys, prefilled.layers[i].values
            self.keys[i][rows, :, :keys.shape[2]] = keys
            self.values[i][rows, :, :values.shape[2]] = values
        for i in self.mamba:
            for own, state in ((self.conv, prefilled.get_conv_state(i)), (self.ssm, prefilled.get_recurrent_state(i))):
                if i not in own:
                    own[i] = state.new_zeros((self.batch, *state.shape[1:]))
                own[i][rows] = state

    def advance(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """Claim the slot of `positions` (B, 1) and write the additive mask (B, 1, 1, length): slots up to it."""
        self.slot.copy_(positions)
        seen = self.slot_position <= positions
        mask.copy_(torch.where(seen, 0.0, torch.finfo(mask.dtype).min)[:, None, None, :])

    # what Jamba's Mamba mixer asks of a cache during a one-token step (attention: SlotWriter.update)
    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.ssm[layer_idx]

    def is_recording_past(self, layer_idx: int) -> bool:
        return False


@torch.inference_mode()
def greedy(model, prompts: list[torch.Tensor], max_new_tokens: int, eos_id: int | None = None,
           return_logits: bool = False, forks: fork.Forks | None = None):
    """Greedy tokens (sum B, new) after the prompt groups [(B_i, T_i), ...], rows in group order; with
    return_logits also the (sum B, new, V) logits. forks: the groups are the last tokens of prompts that share
    a trunk (lab.fast.fork's plan, groups in its order)."""
    batch = sum(group.shape[0] for group in prompts)
    device = prompts[0].device
    # per row, in row order: where its tokens start in its prompt (0: the whole prompt)
    starts = forks.row_starts() if forks is not None else [0] * batch
    widths = [group.shape[1] for group in prompts for _ in range(group.shape[0])]
    length = max(start + width for start, width in zip(starts, widths)) + max_new_tokens
    cache = FixedCache(model, batch, length, device, model.dtype)
    positions = torch.empty((batch, 1), device=device, dtype=torch.long)

    trunk = fork.run_trunk(model, forks, device) if forks is not None else None

    def prefill(group: torch.Tensor, rows: slice) -> torch.Tensor:
        own = starts[rows]
        if not any(own):
            prefilled = DynamicCache(config=model.config)
            logits = model(input_ids=group, cache=prefilled, use_cache=True, logits_to_keep=1).logits[:, -1]
            positions[rows] = group.shape[1]
        else:
            prefilled, logits = fork.continued(model, trunk, group, own)
            positions[rows] = prefilled.begin[:, None] + group.shape[1]
        cache.fill(prefilled, rows)
        return logits

    logits = prefill_groups(prompts, prefill)
    tokens = logits.argmax(-1, keepdim=True)
    mask = torch.empty((batch, 1, 1, length), device=device, dtype=model.dtype)
    masks = {"full_attention": mask, "linear_attention": None}
    step_logits = torch.empty_like(logits)

    def step() -> None:
        cache.advance(positions, mask)
        out = model(input_ids=tokens, position_ids=positions, attention_mask=masks, cache=cache,
                    use_cache=True).logits[:, -1]
        step_logits.copy_(out)
        tokens.copy_(out.argmax(-1, keepdim=True))
        positions.add_(1)

    # torch's grouped product copies to the host outside bf16, which a CUDA graph cannot hold: eager steps then
    graph = model.config.num_experts == 1 or model.dtype == torch.bfloat16
    return run_steps(step, tokens, logits, step_logits, max_new_tokens, eos_id, return_logits, graph)
