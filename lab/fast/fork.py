"""Prompts that share a prefix with one of them (the paper's needle grid: one haystack cut to every length and
depth), prefilled from that trunk's states instead of each from its first token: Jamba and RecurrentGemma
(`supports`).

The trunk runs once (batch 1) and keeps its keys and values and, at every position where some prompt will
start, its recurrent (Mamba, RG-LRU) and conv states (lab.fast.taps). The prompts then run in groups whose rows
each compute the same number of tokens, the last ones of the prompt, from their own start inside the prefix they
share with the trunk: one forward per group, without padding, each row's attention seeing the trunk's keys
before its start. A row whose shared prefix is longer than its group needs recomputes part of it; the groups
are chosen to cost the fewest tokens, counting OVERHEAD tokens (per model type) per forward (weights read,
launches, a scan's latency). The fixed-buffer decoders (lab.fast.decode, lab.fast.jamba_decode) take the states from there as from a whole
prefill. RecurrentGemma's windowed attention over the trunk's keys runs in lab's window kernel on a GPU
(attention.Continued: each row's first key, no mask).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from lab.fast import attention, taps
from lab.fast.host import on_device

# tokens a forward costs beyond its own, as groups are chosen (H200: Jamba 1024 beat 512; RecurrentGemma-9B's grid
# 3.45 / 3.47 / 3.54 s at 256 / 512 / 1024, 2B's within its noise)
OVERHEAD = {"jamba": 1024, "recurrent_gemma": 256}
OWN = 2  # tokens a prompt computes itself at least: a one-token forward is a decoding step
MIN_SHARED = 128  # tokens two prompts share at least for a trunk to be tried
MIN_SAVED = 0.1  # share of the cost of whole prompts the trunk must save, else every prompt prefills whole
_enabled: ContextVar[bool] = ContextVar("lab_fast_fork", default=True)


def supports(model) -> bool:
    """Jamba; RecurrentGemma on a CPU, with eager attention, or where its windowed attention over a trunk's keys
    runs in lab's kernel (on an H200 torch's memory-efficient kernel gave wrong outputs for one such mask, and
    its math backend was slower than whole prompts: docs/performance.md)."""
    config = model.config
    if config.model_type == "recurrent_gemma":
        on_gpu = next(model.parameters()).is_cuda
        return not on_gpu or config._attn_implementation == "eager" or attention.takes_attention_ops(model)
    return config.model_type == "jamba"


@contextmanager
def disabled():
    """Prompts prefill whole inside (lab bench's comparison)."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


@dataclass(frozen=True)
class Forks:
    trunk: list[int]  # the trunk's tokens up to the last start
    starts: list[int]  # per prompt: the position its own forward starts at (0: its first token)
    groups: list[list[int]]  # prompts prefilled together, each computing the same number of tokens

    @property
    def taps(self) -> tuple[int, ...]:
        """Positions whose states the trunk keeps."""
        return tuple(sorted({s for s in self.starts if s}))

    def row_starts(self) -> list[int]:
        """Each prompt's start in the decoders' row order (the groups', one after another)."""
        return [self.starts[i] for group in self.groups for i in group]

    @property
    def saved(self) -> int:
        """Prompt tokens not computed: the starts, less the trunk."""
        return sum(self.starts) - len(self.trunk)


def plan(prompts: list[list[int]], model_type: str) -> Forks | None:
    """How `prompts` share one trunk on a model of `model_type`, or None where that saves under MIN_SAVED of the
    cost (or is off)."""
    if not _enabled.get() or len(prompts) < 2:
        return None
    found = _trunk(prompts)
    if found is None:
        return None
    trunk, shared = found
    lengths = [len(p) for p in prompts]
    own = [n - max(0, min(s, n - OWN)) for n, s in zip(lengths, shared)]  # a prompt under OWN tokens: all
    overhead = OVERHEAD[model_type]
    groups, cost = _groups(own, lengths, overhead)
    starts = [0] * len(prompts)
    for group in groups:
        width = max(own[i] for i in group)
        for i in group:
            starts[i] = lengths[i] - width
    whole = sum(overhead + lengths.count(n) * n for n in set(lengths))
    if max(starts) < OWN or cost + overhead + max(starts) > (1 - MIN_SAVED) * whole:
        return None  # (a one-token trunk would be a decoding step, which keeps no states)
    return Forks(prompts[trunk][:max(starts)], starts, groups)


def _groups(own: list[int], lengths: list[int], overhead: int) -> tuple[list[list[int]], int]:
    """Prompts in groups (contiguous in order of `own`, the tokens each must compute) that each compute their
    largest `own`, with every prompt at least that long, at the least cost: overhead + tokens per group."""
    order = sorted(range(len(own)), key=lambda i: (own[i], lengths[i]))
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width, shortest = own[order[end - 1]], lengths[order[end - 1]]
        for begin in range(end - 1, -1, -1):
            shortest = min(shortest, lengths[order[begin]])
            if shortest < width:
                break
            cost = best[begin] + overhead + (end - begin) * width
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1], best[-1]


def _trunk(prompts: list[list[int]]) -> tuple[int, list[int]] | None:
    """(the prompt sharing the most tokens with the others, the tokens each prompt shares with it), or None
    where no two share MIN_SHARED. In sorted order the prefix two prompts share is the least shared by the
    neighbours between them."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    arrays = [np.asarray(prompts[i], dtype=np.int64) for i in order]
    neighbours = np.array([_common(a, b) for a, b in zip(arrays, arrays[1:])])
    if neighbours.max() < MIN_SHARED:
        return None
    n = len(order)
    common = np.zeros((n, n), dtype=np.int64)
    for p in range(n):
        common[p, p] = len(arrays[p])
        if p + 1 < n:
            run = np.minimum.accumulate(neighbours[p:])
            common[p, p + 1:] = run
            common[p + 1:, p] = run
    caps = np.array([len(a) - OWN for a in arrays])
    best = int(np.minimum(common, caps[:, None]).sum(0).argmax())
    shared = [0] * n
    for p, i in enumerate(order):
        shared[i] = int(common[p, best])
    return order[best], shared


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class Trunk:
    """What the trunk's forward kept: every attention layer's keys and values (1, heads, T, head dim), and the
    recurrent and conv states at its tapped positions (per Mamba layer index, or RecurrentGemma block)."""

    def __init__(self, keys: dict, tapped: taps.Taps):
        self.keys, self.tapped = keys, tapped

    def stacked(self, layer, what: str, starts: list[int]) -> torch.Tensor:
        """The states `what` of `layer` at each start, (len(starts), ...): zeros for a start of 0."""
        kept = self.tapped.get(layer, what)
        like = next(iter(kept.values()))
        return torch.cat([kept[s] if s else torch.zeros_like(like) for s in starts])


class _Recording(DynamicCache):
    """A cache that also keeps every key and value given to it and (Jamba) the conv inputs at the taps."""

    def __init__(self, config, tapped: taps.Taps):
        super().__init__(config=config)
        self.tapped, self.recorded = tapped, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """A trunk's forward has no past: its attention sees the keys given (the cache's layers are never read)."""
        self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def update_conv_state(self, conv_states, layer_idx, *args, conv_kernel_size=None, **kwargs):
        self.tapped.keep_inputs(layer_idx, conv_states, conv_kernel_size)
        return super().update_conv_state(conv_states, layer_idx, *args, conv_kernel_size=conv_kernel_size, **kwargs)


@torch.inference_mode()
def run_trunk(model, forks: Forks, device) -> Trunk:
    tapped = taps.Taps(forks.taps)
    cache = _Recording(model.config, tapped)
    if hasattr(model, "_setup_cache"):  # RecurrentGemma keeps its states in its blocks
        model._setup_cache(model.config, 1, device, model.dtype)
    with taps.recording(tapped):
        model(input_ids=on_device([forks.trunk], device), cache=cache, use_cache=True, logits_to_keep=1)
    return Trunk(cache.recorded, tapped)


class Continuation:
    """The cache of a group's forward: each row's attention sees the trunk's keys before its start (`span` of
    them, right-aligned, masked before position 0) then its own; recurrent and conv states start from the
    trunk's at each row's start. history() and recent() give each row's keys for the decoders' buffers."""

    def __init__(self, trunk: Trunk, starts: list[int], span: int, device):
        self.trunk, self.starts, self.span = trunk, starts, span
        self.begin = on_device(starts, device)  # (B,) each row's start
        before = self.begin[:, None] - span + torch.arange(span, device=self.begin.device)
        self._before = before.clamp(min=0)  # (B, span) the trunk's positions each row sees before its start
        self.own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}

    def _prefix(self, tensor: torch.Tensor) -> torch.Tensor:
        """(rows, heads, span, head dim): the trunk's `tensor` (1, heads, T, head dim) before each row's start."""
        return tensor[0][:, self._before].transpose(0, 1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.own[layer_idx] = (key_states, value_states)
        keys, values = self.trunk.keys[layer_idx]
        return (torch.cat([self._prefix(keys), key_states], 2), torch.cat([self._prefix(values), value_states], 2))

    def recent(self, layer_idx: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values) (rows, heads, n, head dim) of each row's last n <= count positions, and those positions
        (rows, n), negative where a row has none (before its first token)."""
        own_keys, own_values = self.own[layer_idx]
        keys, values = self.trunk.keys[layer_idx]
        n = min(count, self.span + own_keys.shape[2])
        keys, values = (torch.cat([self._prefix(t), o], 2)[:, :, -n:] for t, o in ((keys, own_keys),
                                                                                    (values, own_values)))
        ends = self.begin[:, None] + own_keys.shape[2]
        return keys, values, ends - n + torch.arange(n, device=keys.device)

    def start_states(self, block) -> tuple[torch.Tensor, torch.Tensor]:
        """A RecurrentGemma block's (conv inputs (rows, width, kernel - 1), RG-LRU state (rows, width) float32)
        at each row's start."""
        return self.trunk.stacked(block, "conv", self.starts), self.trunk.stacked(block, "lru", self.starts)

    def history(self, layer_idx: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) (heads, positions, head dim) of `row`'s every position."""
        start, (own_keys, own_values) = self.starts[row], self.own[layer_idx]
        keys, values = self.trunk.keys[layer_idx]
        return (torch.cat([keys[0][:, :start], own_keys[row]], 1), torch.cat([values[0][:, :start], own_values[row]], 1))

    # what Jamba's Mamba mixer asks of a cache
    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        if layer_idx not in self.conv:
            self.conv[layer_idx] = self.trunk.stacked(layer_idx, "conv", self.starts)
        return self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        if layer_idx not in self.ssm:
            self.ssm[layer_idx] = self.trunk.stacked(layer_idx, "ssm", self.starts)
        return self.ssm[layer_idx]

    def update_conv_state(self, conv_states, layer_idx, *args, **kwargs):
        history = torch.cat([self.get_conv_state(layer_idx).to(conv_states.dtype), conv_states], -1)
        self.conv[layer_idx] = history[..., -self.conv[layer_idx].shape[-1]:]
        return history

    def update_recurrent_state(self, recurrent_states, layer_idx, *args, **kwargs):
        self.ssm[layer_idx] = recurrent_states
        return recurrent_states

    def is_recording_past(self, layer_idx: int) -> bool:
        return False


@torch.inference_mode()
def continued(model, trunk: Trunk, ids: torch.Tensor, starts: list[int]) -> tuple[Continuation, torch.Tensor]:
    """(the group's cache, (B, V) last logits) of rows `ids` (B, S), the last S tokens of prompts that start at
    `starts` inside the trunk."""
    config, device = model.config, ids.device
    window = getattr(config, "attention_window_size", None)  # RecurrentGemma's; Jamba's attention is global
    span = max(starts) if window is None else min(max(starts), window - 1)
    cache = Continuation(trunk, starts, span, device)
    begin = cache.begin[:, None]
    queries = begin + torch.arange(ids.shape[1], device=device)
    if window is not None and attention.takes_attention_ops(model):  # lab's kernel: no mask, each row's first key
        mask = attention.Continued((span - begin[:, 0]).clamp(min=0))
    else:
        keys = begin + torch.arange(-span, ids.shape[1], device=device)
        offset = keys[:, None] - queries[..., None]  # (B, S, span + S): causal, the trunk's before position 0
        seen = (keys[:, None] >= 0) & (offset <= 0)
        if window is not None:
            seen &= offset > -window
        mask = seen[:, None]  # sdpa takes a boolean mask; eager attention adds its mask to the scores
        if config._attn_implementation != "sdpa":
            mask = torch.where(mask, 0.0, torch.finfo(model.dtype).min).to(model.dtype)
    attending = "full_attention" if window is None else "sliding_attention"
    masks = {attending: mask, "linear_attention": None}
    logits = model(input_ids=ids, position_ids=queries, attention_mask=masks, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    return cache, logits
