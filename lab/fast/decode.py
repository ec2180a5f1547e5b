"""Greedy decoding for RecurrentGemma from fixed buffers, replayed as one CUDA graph on a GPU.

transformers' generate() spends about 45 ms of Python per token on RecurrentGemma-2B (26 layers) on an
H100 host while the GPU idles, so a needle grid is decode-bound. Here the model prefills the prompt as
usual; then the attention caches move into ring buffers (slot = position mod window), the recurrent and
conv states into fixed tensors, and the decode step (the model's own forward, so a plan's hooks still
act) is captured once per batch and replayed. Every row keeps its own position, so prompts of
different lengths (prefilled one length at a time: no padding reaches the recurrences) decode together
in one graph; prompts that share a trunk (lab.fast.fork) start from its states. On a CPU the same loop runs
eagerly (tests).
"""

from __future__ import annotations

import threading
from contextvars import ContextVar

import torch
from transformers import DynamicCache

from lab.fast import fork
from lab.fast.state import current_gpu, enabled


def supports(model) -> bool:
    """Whether `greedy` may decode this model: lab's fast paths on for it (lab.fast.apply), RecurrentGemma with
    sdpa or eager attention, on one device (accelerate's offload hooks move weights during the forward, which
    a CUDA graph cannot replay)."""
    config = model.config
    return (enabled(model) and config.model_type == "recurrent_gemma" and config._attn_implementation in ("sdpa", "eager")
            and not getattr(model, "hf_device_map", None))


def row_bytes(model, length: int) -> int:
    """Memory `greedy` holds per prompt: window keys and values, recurrent and conv states, logits."""
    config, size = model.config, model.dtype.itemsize
    attention = sum(kind == "sliding_attention" for kind in config.layer_types)
    window = config.attention_window_size
    keys = 2 * attention * config.num_key_value_heads * window * config.head_dim * size + 8 * window
    states = (len(config.layer_types) - attention) * config.lru_width * ((config.conv1d_width - 1) * size + 4)
    return keys + states + LOGIT_COPIES * config.vocab_size * 4


LOGIT_COPIES = 4  # the prefill's last logits, the step's, their argmax inputs: a bound on the (B, V) tensors alive


def prefill_groups(prompts: list[torch.Tensor], prefill) -> torch.Tensor:
    """prefill(part, rows) over every prompt group (B_i, T_i), rows numbered across the groups in order; returns
    the (sum B, V) logits it gave, in row order."""
    first, start = [], 0
    for group in prompts:
        first += _in_parts(group, start, prefill)
        start += group.shape[0]
    return torch.cat(first)


def _in_parts(group: torch.Tensor, start: int, prefill) -> list[torch.Tensor]:
    """prefill over one group: whole or, where that runs out of memory, in halves."""
    try:
        return [prefill(group, slice(start, start + group.shape[0]))]
    except torch.OutOfMemoryError:
        if group.shape[0] == 1:
            raise
    torch.cuda.empty_cache()  # outside the except block: the failed call's tensors are gone by now
    half = group.shape[0] // 2
    return _in_parts(group[:half], start, prefill) + _in_parts(group[half:], start + half, prefill)


class SlotWriter:
    """A fixed-buffer cache's write of a one-token step: each row's key and value into its slot (self.slot,
    (B, 1)) of self.keys / self.values[layer] (B, kv heads, slots, head dim)."""

    slot: torch.Tensor
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = self.slot[:, None, :, None].expand(-1, key_states.shape[1], 1, key_states.shape[-1])
        self.keys[layer_idx].scatter_(2, index, key_states)
        self.values[layer_idx].scatter_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class RingCache(SlotWriter):
    """Sliding-window keys and values in fixed buffers: the part of a transformers cache that
    RecurrentGemma's attention uses while decoding."""

    def __init__(self, model, batch: int, device, dtype):
        config = model.config
        self.window = config.attention_window_size
        shape = (batch, config.num_key_value_heads, self.window, config.head_dim)
        layers = [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
        self.keys = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.values = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.slot_position = torch.full((batch, self.window), -1, device=device, dtype=torch.long)
        self.slot = torch.zeros((batch, 1), device=device, dtype=torch.long)

    def fill(self, prefilled: DynamicCache, prompt_len: int, rows: slice) -> None:
        """Copy a prefilled group's cached keys (its last min(len, window - 1) positions) into its rows."""
        for i in self.keys:
            keys, values = prefilled.layers[i].keys, prefilled.layers[i].values
            positions = torch.arange(prompt_len - keys.shape[2], prompt_len, device=keys.device)
            slots = positions % self.window
            self.keys[i][rows, :, slots] = keys
            self.values[i][rows, :, slots] = values
            self.slot_position[rows, slots] = positions

    def fill_continued(self, prefilled: fork.Continuation, rows: slice) -> None:
        """Copy each row's last window - 1 keys of a group that continued a trunk (its own positions) into its rows."""
        for i in self.keys:
            keys, values, positions = prefilled.recent(i, self.window - 1)
            slots = positions % self.window  # distinct: at most window - 1 consecutive positions
            index = slots[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            self.keys[i][rows].scatter_(2, index, keys)
            self.values[i][rows].scatter_(2, index, values)
            self.slot_position[rows].scatter_(1, slots, positions.clamp(min=-1))  # -1: no key there

    def advance(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        """Claim the slot of `positions` (B, 1) and write the additive mask (B, 1, 1, window)."""
        self.slot.copy_(positions % self.window)
        self.slot_position.scatter_(1, self.slot, positions)
        seen = (self.slot_position >= 0) & (self.slot_position > positions - self.window)
        mask.copy_(torch.where(seen, 0.0, torch.finfo(mask.dtype).min)[:, None, None, :])


class RecurrentState:
    """The recurrent blocks' conv and RG-LRU states, kept in the same tensors from step to step."""

    def __init__(self, model):
        self.blocks = [layer.temporal_block for layer in model.model.layers if hasattr(layer.temporal_block, "rg_lru")]
        self.groups: list[tuple[list, list]] = []

    def take(self) -> None:
        """Keep the states the blocks hold after prefilling one group of rows."""
        self.groups.append(([b.conv1d_state for b in self.blocks], [b.rg_lru.recurrent_states for b in self.blocks]))

    def join(self) -> None:
        """Stack the groups' states (in the order taken) into the fixed tensors."""
        self.conv = [torch.cat(parts) for parts in zip(*(conv for conv, _ in self.groups))]
        self.lru = [torch.cat(parts) for parts in zip(*(lru for _, lru in self.groups))]
        self.groups = []
        self.point()

    def point(self) -> None:
        for block, conv, lru in zip(self.blocks, self.conv, self.lru):
            block.conv1d_state, block.rg_lru.recurrent_states = conv, lru

    def store(self) -> None:
        """Copy the states a forward left behind into the fixed tensors and point the blocks at them."""
        for block, conv, lru in zip(self.blocks, self.conv, self.lru):
            conv.copy_(block.conv1d_state)
            lru.copy_(block.rg_lru.recurrent_states)
        self.point()


@torch.inference_mode()
def greedy(model, prompts: list[torch.Tensor], max_new_tokens: int, eos_id: int | None = None,
           return_logits: bool = False, forks: fork.Forks | None = None):
    """Greedy tokens (sum B, new) after the prompt groups [(B_i, T_i), ...], rows in group order; with
    return_logits also the (sum B, new, V) logits. forks: the groups are the last tokens of prompts that share
    a trunk (lab.fast.fork's plan, groups in its order)."""
    batch = sum(group.shape[0] for group in prompts)
    device = prompts[0].device
    ring = RingCache(model, batch, device, model.dtype)
    state = RecurrentState(model)
    positions = torch.empty((batch, 1), device=device, dtype=torch.long)
    # per row, in row order: where its tokens start in its prompt (0: the whole prompt)
    starts = forks.row_starts() if forks is not None else [0] * batch
    trunk = fork.run_trunk(model, forks, device) if forks is not None else None

    def prefill(group: torch.Tensor, rows: slice) -> torch.Tensor:
        own = starts[rows]
        model._setup_cache(model.config, group.shape[0], device, model.dtype)
        if not any(own):
            prefilled = DynamicCache(config=model.config)
            logits = model(input_ids=group, cache=prefilled, use_cache=True, logits_to_keep=1).logits[:, -1]
            ring.fill(prefilled, group.shape[1], rows)
            positions[rows] = group.shape[1]
        else:
            prefilled, logits = fork.continued(model, trunk, group, own)
            ring.fill_continued(prefilled, rows)
            positions[rows] = prefilled.begin[:, None] + group.shape[1]
        state.take()
        return logits

    logits = prefill_groups(prompts, prefill)
    state.join()
    tokens = logits.argmax(-1, keepdim=True)
    mask = torch.empty((batch, 1, 1, ring.window), device=device, dtype=model.dtype)
    step_logits = torch.empty_like(logits)

    def step() -> None:
        ring.advance(positions, mask)
        out = model(input_ids=tokens, position_ids=positions, attention_mask={"sliding_attention": mask},
                    cache=ring, use_cache=True).logits[:, -1]
        step_logits.copy_(out)
        tokens.copy_(out.argmax(-1, keepdim=True))
        positions.add_(1)
        state.store()

    return run_steps(step, tokens, logits, step_logits, max_new_tokens, eos_id, return_logits)


STOP: ContextVar[threading.Event | None] = ContextVar("lab_decoding_stop", default=None)  # the job's cancel


def stop_requested() -> bool:
    """Whether the job decoding in this thread was cancelled (lab.models.generation.stopping sets STOP)."""
    event = STOP.get()
    return event is not None and event.is_set()


def run_steps(step, tokens: torch.Tensor, first_logits: torch.Tensor, step_logits: torch.Tensor,
              max_new_tokens: int, eos_id: int | None, return_logits: bool, graph: bool = True):
    """Replay `step` (which writes the next `tokens` (B, 1) and `step_logits` (B, V) in place) until
    max_new_tokens tokens or every row has eos (checked every 8 steps); `first_logits` came from the prefill.
    On a GPU the step is a CUDA graph unless `graph` is false. Returns the tokens (B, new) and, with
    return_logits, the (B, new, V) logits."""
    outputs, all_logits = [tokens.clone()], [first_logits.float()]
    if max_new_tokens > 1:
        room = LOGIT_COPIES * step_logits.numel() * 4 + CAPTURE_ROOM
        replay = _graph(step, room, tokens.device) if graph and tokens.device.type == "cuda" else step
        for n in range(1, max_new_tokens):
            if stop_requested():  # the caller drops the batch
                break
            replay()
            outputs.append(tokens.clone())
            if return_logits:
                all_logits.append(step_logits.float().clone())
            if eos_id is not None and n % 8 == 0 and bool((torch.cat(outputs, 1) == eos_id).any(1).all()):
                break
    generated = torch.cat(outputs, 1)
    return (generated, torch.stack(all_logits, 1)) if return_logits else generated


CAPTURE_ROOM = 1 << 30  # bytes free on the GPU, beyond the step's logits, under which a capture empties the cache


def _graph(step, room: int, device: torch.device):
    """Run `step` once (warm-up, a real step) and return a function replaying it as a CUDA graph, all on the
    step's GPU `device` (streams and graphs belong to the current GPU, which a worker thread leaves at the
    first). The capture does not wait for the GPU to finish the prefill (torch.cuda.graph synchronises and
    empties the allocator's cache first: the GPU then idled while the host captured, about 25 ms a batch on
    RecurrentGemma-2B), unless the GPU has under `room` bytes free: a capture allocates from a pool of its own,
    which cannot take the cache's free blocks, so there the cache is emptied first (which waits for the GPU)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if torch.cuda.mem_get_info()[0] < room:
            torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin()
            try:
                step()
            finally:
                graph.capture_end()
    first = [True]

    def replay() -> None:
        if first[0]:  # the warm-up already made this step
            first[0] = False
            return
        with current_gpu(device):
            graph.replay()

    return replay
