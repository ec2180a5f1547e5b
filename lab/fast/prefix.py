"""Last-position logits of prompts that share a prefix: the prefix once, the rest from copies of its cache.

MMLU's five-shot prompts of one subject share everything up to the question (about 90 % of their tokens).
The prefix runs once (batch 1) into a transformers cache, which is then repeated for every prompt, and the
rest of each prompt continues from it (right-padded, one forward). Models whose continued prompts transformers
computes exactly take it: Jamba on lab's fast paths, whose Mamba scan starts from the cached state
(lab.fast.mamba; transformers' own prefill starts from zeros). Hooks of an active plan act on both forwards,
position by position, as on one.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from lab.fast.state import enabled

MIN_SHARED = 32  # tokens: below this one padded forward is as quick


def supports(model) -> bool:
    """Whether prompts of `model` may continue a cached prefix: Jamba on lab's fast paths, on one device."""
    return (model.config.model_type == "jamba" and enabled(model) and not getattr(model, "hf_device_map", None))


def shared_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with, less one: each row keeps at least one token of its own."""
    first, shortest = rows[0], min(len(row) for row in rows)
    n = 0
    while n < shortest - 1 and all(row[n] == first[n] for row in rows):
        n += 1
    return n


def fork(cache: DynamicCache, batch: int) -> DynamicCache:
    """A copy of a batch-1 cache for `batch` prompts that continue it; the original can go on by itself."""
    twin = copy.copy(cache)
    twin.layers = []
    for layer in cache.layers:
        own = copy.copy(layer)
        for name, value in vars(layer).items():
            if isinstance(value, dict):  # states and their flags, updated in place
                setattr(own, name, dict(value))
        if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel():
            own.keys, own.values = layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)
        for states in (getattr(own, "conv_states", {}), getattr(own, "recurrent_states", {})):
            for i, state in states.items():
                if state is not None:
                    states[i] = state.repeat(batch, *([1] * (state.dim() - 1)))
        twin.layers.append(own)
    return twin


@torch.inference_mode()
def last_logits(model, rows: list[list[int]], pad: int, device) -> torch.Tensor:
    """(B, V) logits at each row's last token, the rows' shared prefix computed once."""
    shared = shared_length(rows)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([rows[0][:shared]], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    cache = fork(cache, len(rows))
    rest = [row[shared:] for row in rows]
    width = max(len(r) for r in rest)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rest], device=device)
    mask = torch.tensor([[1] * (shared + len(r)) + [0] * (width - len(r)) for r in rest], device=device)
    positions = torch.arange(shared, shared + width, device=device)[None].expand(len(rows), -1)
    last = torch.tensor([[len(r) - 1] for r in rest], device=device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=last).logits
    return logits[:, 0]
