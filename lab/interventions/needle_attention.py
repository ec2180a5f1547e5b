"""Needle-attention manipulation (the paper's section 3) as a plan op: after the softmax, change the
weights that the chosen heads put on the needle's key positions, in the prefill and the generation
phase apart (keep, omit, only, balanced, null; no renormalisation).

While a plan with this op is active, "eager" in transformers' attention registry is `_eager`: it runs
the model's own eager function, and for the attention modules the op acts on it changes the
probabilities and computes probs @ values again. Every other module gets the model's result as is.
On lab's fast paths for RecurrentGemma the op acts inside lab's attention entry instead: a whole prompt
goes through lab's window kernel, which splits the output at the needle's keys (what the needle gives,
what the rest gives, the needle's mass), so no (batch, heads, queries, keys) tensor is made.

Where the needle is: the needle probe hands the tracker each prompt's needle spans (tracker.needles,
keyed by the prompt's token ids); other prompts (MMLU) have no needle tokens. A forward of more than one token starts sequences (a prefill, or a
teacher-forced prompt and answer whose prompt length is tracker.prompt_len); a one-token forward
decodes the rows prefilled since the last decoding step (transformers' generate(): one group of
prompts; lab's ring decoder: all groups, in order). Keys are the positions up to the query, in order
(transformers' caches; RecurrentGemma keeps only its window, so needle tokens that left it are not
attended), or the ring cache's slots (its slot_position).
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from typing import Callable

import torch

from lab.errors import LabError
from lab.fast import attention, state
from lab.interventions.sites import Resolved
from lab.models.anatomy import Anatomy

_OPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> (op, layer, heads)
_LOCK = threading.Lock()
_claims = {"count": 0, "previous": None}  # plans using `_eager`, and what "eager" was before


def _own_eager(module) -> Callable | None:
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _eager(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' "eager" attention while a needle op is active: the model's own function, whose
    probabilities are changed for the modules the op acts on."""
    own = _own_eager(module)
    if own is None:  # a model not under the op whose code names its eager function otherwise
        from transformers.models.llama.modeling_llama import eager_attention_forward as own
    out, probs = own(module, query, key, value, attention_mask, *args, **kwargs)
    entry = _OPS.get(module)
    return (out, probs) if entry is None else entry[0].attend(entry[1], entry[2], out, probs, value, attention_mask)


def _claim_eager() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _LOCK:
        if _claims["count"] == 0:
            _claims["previous"] = ALL_ATTENTION_FUNCTIONS.get("eager")
            ALL_ATTENTION_FUNCTIONS["eager"] = _eager
        _claims["count"] += 1


def _release_eager() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _LOCK:
        _claims["count"] -= 1
        if _claims["count"] == 0:
            if _claims["previous"] is None:
                del ALL_ATTENTION_FUNCTIONS["eager"]
            else:
                ALL_ATTENTION_FUNCTIONS["eager"] = _claims["previous"]


class Heads:
    """The query heads of one layer the op acts on: a (1, H, 1, 1) mask (None: all of them) and their count."""

    def __init__(self, total: int, chosen: set[int]):
        self.count = len(chosen)
        self._mask = None
        if self.count < total:
            self._mask = torch.zeros((1, total, 1, 1), dtype=torch.bool)
            self._mask[0, sorted(chosen)] = True
        self._placed: dict = {}

    def mask(self, device) -> torch.Tensor | None:
        """On `device`, copied once (a prefill comes first, so no copy is captured in a CUDA graph)."""
        if self._mask is None:
            return None
        if device not in self._placed:
            self._placed[device] = self._mask.to(device)
        return self._placed[device]


def _changed(mode: str, probs: torch.Tensor, needle: torch.Tensor, visible: Callable, heads: Heads) -> torch.Tensor:
    """probs (B, H, T, S) under `mode` for the chosen heads; needle: (B, 1, 1, S) bool."""
    if mode == "null":
        new = torch.zeros_like(probs)
    elif mode == "omit":
        new = probs.masked_fill(needle, 0)
    elif mode == "only":
        new = probs.masked_fill(~needle, 0)
    else:  # balanced: the needle's mass over the chosen heads, spread evenly over them and its visible tokens
        mask = heads.mask(probs.device)
        chosen = probs if mask is None else probs * mask
        mass = (chosen * needle).sum((1, 3), keepdim=True, dtype=torch.float32)  # (B, 1, T, 1)
        shown = needle & visible()  # (B, 1, T, S): a token outside a query's window gets nothing
        weight = mass / (heads.count * shown.sum(-1, keepdim=True).clamp(min=1))
        new = torch.where(shown, weight.to(probs.dtype), 0).expand_as(probs)
    mask = heads.mask(probs.device)
    return new if mask is None else torch.where(mask, new, probs)


def _padded(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows of several prefilled groups, in order, needle tables padded to one width."""
    if not groups:
        return None
    width = max(table.shape[1] for table, _ in groups)
    tables = [torch.nn.functional.pad(table, (0, width - table.shape[1])) for table, _ in groups]
    return torch.cat(tables), torch.cat([lengths for _, lengths in groups])


class NeedleOp:
    """The op on one model: per forward call, which key positions hold the needle and which queries
    are in the generation phase."""

    def __init__(self, tracker, generation: str, prefill: str, layers: set[int]):
        self.tracker, self.layers = tracker, layers
        self.modes = {"generation": generation, "prefill": prefill}
        self.rows = None  # (needle at position (B, W) bool, prompt length (B, 1)) of the current rows
        self.query_pos: torch.Tensor | None = None  # (B|1, T) absolute positions of the queries
        self.key_pos: torch.Tensor | None = None  # the ring cache's (B, window) slot positions
        self.reached: set[int] = set()
        self._groups: list = []  # rows prefilled since the last decoding step
        self._decoding = False
        self._needles = None  # the tracker's needles that the groups were found in

    def pre_hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise LabError("needle attention needs token ids: it finds the needle in the prompt's tokens")
        steps = ids.shape[-1]
        if self.tracker.needles is not self._needles or (steps > 1 and self._decoding):
            self._groups, self._decoding, self._needles = [], False, self.tracker.needles
        if steps > 1:
            self.rows = self._find(ids)
            self._groups.append(self.rows)
        elif not self._decoding:
            self.rows, self._decoding = _padded(self._groups), True
        if self.rows is None or self.rows[0].shape[0] != ids.shape[0]:
            raise LabError("needle attention: a decoding step that continues no needle prompt of this batch")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        positions = kwargs.get("position_ids")
        if positions is None:
            start = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
            positions = torch.arange(start, start + steps, device=ids.device)[None]
        self.query_pos = positions[0] if positions.dim() == 3 else positions
        self.key_pos = getattr(cache, "slot_position", None)
        self.reached = set()

    def post_hook(self, module, args, output) -> None:
        missing = self.layers - self.reached
        if missing:
            raise LabError(f"needle attention did not reach the attention of layer {min(missing)}: "
                           "this architecture does not compute it through transformers' eager function")

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The needle table of each row, found by its prompt's tokens (the prompt, or its start when the
        prefill leaves the last prompt tokens to decoding steps). Without needles from the probe (MMLU, a
        memory measurement) a prompt has no needle tokens: omit changes nothing, only and balanced leave
        no attention."""
        length = min(self.tracker.prompt_len or ids.shape[-1], ids.shape[-1]) - self.tracker.early
        table = torch.zeros((ids.shape[0], length), dtype=torch.bool)
        needles = self.tracker.needles
        for row, tokens in enumerate(ids[:, :length].tolist() if needles else ()):
            spans = needles.get(tuple(tokens))
            if spans is None:
                starts = [s for prompt, s in needles.items() if list(prompt[:length]) == tokens]
                if len(starts) != 1:
                    raise LabError("needle attention: a prompt that is none of the needle probe's prompts of "
                                   "this batch, so where its needle is is unknown")
                spans = starts[0]
            for start, end in spans:
                table[row, start:end] = True
        return table.to(ids.device), torch.full((ids.shape[0], 1), length, device=ids.device)

    def _key_positions(self, keys: int) -> torch.Tensor:
        """(B|1, S) absolute positions of the keys."""
        if self.key_pos is not None:
            return self.key_pos
        return self.query_pos[:, -1:] + torch.arange(1 - keys, 1, device=self.query_pos.device)

    def _needle_keys(self, keys: int) -> torch.Tensor:
        """(B, 1, 1, S) bool: the keys that hold a needle token."""
        table, positions = self.rows[0], self._key_positions(keys)
        width = table.shape[1]
        found = table.gather(1, positions.clamp(0, width - 1).expand(table.shape[0], -1))
        return (found & (positions >= 0) & (positions < width))[:, None, None, :]

    def _visible(self, mask: torch.Tensor | None, keys: int) -> torch.Tensor:
        """(B|1, 1, T, S) bool: the keys each query may attend to (its window, causality)."""
        if mask is None:
            return (self._key_positions(keys)[:, None, :] <= self.query_pos[:, :, None])[:, None]
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2

    def attend(self, layer: int, heads: Heads, out: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, mask):
        """(output (B, T, H, D), probabilities) with the needle weights changed in each phase's mode."""
        self.reached.add(layer)
        gen_mode, pre_mode = self.modes["generation"], self.modes["prefill"]
        if gen_mode == pre_mode == "keep":
            return out, probs
        batch, _, steps, keys = probs.shape
        needle = self._needle_keys(keys)

        def changed(mode: str) -> torch.Tensor:
            return _changed(mode, probs, needle, lambda: self._visible(mask, keys), heads)

        new = self._by_phase(probs, changed, lambda generation: generation.expand(batch, steps)[:, None, :, None])
        values = value.repeat_interleave(probs.shape[1] // value.shape[1], dim=1)
        return torch.matmul(new, values).transpose(1, 2).contiguous(), new

    def _by_phase(self, unchanged: torch.Tensor, changed: Callable[[str], torch.Tensor], shaped: Callable):
        """`unchanged` with the rows of each phase replaced by changed(that phase's mode) (keep: as they are);
        shaped(generation) lays the (B|1, T) generation-phase rows out as `unchanged` is laid out."""
        gen_mode, pre_mode = self.modes["generation"], self.modes["prefill"]
        if gen_mode == pre_mode:
            return unchanged if gen_mode == "keep" else changed(gen_mode)
        generation = shaped(self.query_pos >= self.rows[1])
        new = unchanged
        for mode, rows in ((pre_mode, ~generation), (gen_mode, generation)):
            if mode != "keep":
                new = torch.where(rows, changed(mode), new)
        return new

    def sdpa(self, layer: int, heads: Heads, module, query, key, value, attention_mask, *args, **kwargs):
        """The op inside lab's attention entry (lab.fast.attention): a whole prompt through lab's window kernel,
        its output split at the needle's keys; anything else (decoding steps, CPU) through eager attention."""
        if self.modes["generation"] == self.modes["prefill"] == "keep":
            self.reached.add(layer)
            return attention.windowed_sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        needle = self._needle_keys(key.shape[-2])[:, 0, 0, :] if query.shape[-2] > 1 else None
        parts = None if needle is None else attention.window_parts(module, query, key, value, attention_mask, *args,
                                                                  needle=needle, **kwargs)
        if parts is None:
            out, probs = attention.eager(module, query, key, value, attention_mask, *args, **kwargs)
            return self.attend(layer, heads, out, probs, value, attention_mask)
        self.reached.add(layer)
        kept = parts.out + parts.needle_out
        new = self._by_phase(kept, lambda mode: _changed_output(mode, parts, heads),
                             lambda generation: generation.expand(query.shape[0], -1)[:, :, None, None])
        mask = heads.mask(query.device)
        return (new if mask is None else torch.where(mask.transpose(1, 2), new, kept)), None


def _changed_output(mode: str, parts, heads: Heads) -> torch.Tensor:
    """The attention output (B, T, H, D) under `mode`, from lab's kernel's split output (for every head)."""
    if mode == "omit":
        return parts.out
    if mode == "only":
        return parts.needle_out
    if mode == "null":
        return torch.zeros_like(parts.out)
    mask = heads.mask(parts.mass.device)  # balanced, as in _changed
    mass = (parts.mass if mask is None else parts.mass * mask[:, :, :, 0]).sum(1)  # (B, T)
    weight = mass / (heads.count * parts.shown[:, 0].clamp(min=1))
    return (weight[:, :, None, None] * parts.needle_values).to(parts.out.dtype)


def install(model: torch.nn.Module, anatomy: Anatomy, plan: Resolved, tracker, base: torch.nn.Module,
            in_kernel: bool = False) -> Callable[[], None]:
    """Put the plan's needle op on `model`: inside lab's attention entry (in_kernel; see
    lab.fast.attention.takes_attention_ops), or else in the eager attention the model must use now. Returns the undo."""
    needle, by_layer = plan.needle, plan.needle_by_layer()
    op = NeedleOp(tracker, needle.mode("generation"), needle.mode("prefill"), set(by_layer))
    modules = []
    for layer, chosen in by_layer.items():
        block = anatomy.attention(layer)
        module = model.get_submodule(block.path)
        if not in_kernel and _own_eager(module) is None:
            raise LabError(f"needle attention: {anatomy.architecture} has no eager attention function to change")
        heads = Heads(block.heads, chosen)
        if in_kernel:
            state.set_attention_op(module, functools.partial(op.sdpa, layer, heads))
        else:
            _OPS[module] = (op, layer, heads)
        modules.append(module)
    handles = [base.register_forward_pre_hook(op.pre_hook, with_kwargs=True), base.register_forward_hook(op.post_hook)]
    if not in_kernel:
        _claim_eager()

    def undo() -> None:
        for handle in handles:
            handle.remove()
        for module in modules:
            _OPS.pop(module, None)
            state.set_attention_op(module)
        if not in_kernel:
            _release_eager()

    return undo
