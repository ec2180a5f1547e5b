"""Install a Plan as forward hooks inside a context manager; leaving it restores the model exactly.

Block ablation replaces a block's output (what it adds to the residual stream). Head ablation and
sparsification act on the input of the attention output projection, so its bias survives. Zeroing
heads at every position is folded into that projection's weight instead (the removed heads' columns
are saved, zeroed, and copied back on leaving), so it costs nothing per forward call.
Phase: a position is "generation" when it is at or after the prompt length. The prompt length is
given, or taken from the first call of a sequence (cached generate: the prefill call).
Sparsification and needle-attention manipulation (lab.interventions.needle_attention) need the
attention probabilities: the model runs eager attention while such a plan is active, except on lab's fast
paths for RecurrentGemma and Jamba on a GPU, where lab's window kernel scores the heads (or splits the output
at the needle) online and only one-token decoding steps compute weights. Experts off in MoE blocks (zeroed
or rerouted) are hooked by lab.interventions.experts.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

from lab.errors import LabError
from lab.fast import attention
from lab.fast import state as fast_state
from lab.interventions import experts, needle_attention
from lab.interventions.plan import Plan
from lab.interventions.sites import Resolved, resolve
from lab.models.anatomy import ADAPTERS, Anatomy

Means = dict[tuple, torch.Tensor]


class PhaseTracker:
    """Knows the absolute positions of the current forward call and which are in the plan's phase."""

    def __init__(self, phase: str, prompt_len: int | None = None):
        self.phase = phase
        self.prompt_len = prompt_len  # set by callers that run a teacher-forced forward
        self.early = 0  # the prompt's last `early` tokens count as generation (the paper's sampler; the
        # needle-attention op reads it too)
        self.needles: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # prompt ids -> needle spans (needle probe)
        self.positionwise = True  # the plan acts alike at every position of any forward: a prompt may run in pieces
        self._auto_len: int | None = None
        self._mask: torch.Tensor | None = None
        self._step_mask: torch.Tensor | None | bool = False  # while decoding(): the mask of every one-token step

    @contextmanager
    def decoding(self, device) -> Iterator[None]:
        """One-token forwards inside are generation steps, known without reading positions on the host (a
        fixed-buffer decoder replays them as a CUDA graph); longer forwards are prompts, as always."""
        self._step_mask = None if self.phase != "prefill" else torch.zeros((1, 1), dtype=torch.bool, device=device)
        try:
            yield
        finally:
            self._step_mask = False

    def pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        if self._step_mask is not False and ids.shape[-1] == 1:
            self._mask = self._step_mask
            return
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            positions = torch.arange(start, start + ids.shape[-1], device=ids.device)[None]
        if positions.dim() == 3:  # multimodal rope layouts: (3, B, T)
            positions = positions[0]
        if int(positions[0, 0]) == 0:
            self._auto_len = ids.shape[-1]
        prompt_len = self.prompt_len if self.prompt_len is not None else self._auto_len
        generation = positions >= (prompt_len - self.early if prompt_len is not None else 0)
        self._mask = generation if self.phase == "generation" else ~generation  # once per forward call

    def mask(self) -> torch.Tensor | None:
        """(B|1, T) bool: positions the plan acts on now; None means every position."""
        return None if self.phase == "both" else self._mask


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


def _where(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return new
    return torch.where(mask.to(old.device)[..., None], new, old)


def _block_hook(tracker: PhaseTracker, mean: torch.Tensor | None):
    def hook(module, args, output):
        out = _first(output)
        new = torch.zeros_like(out) if mean is None else mean.to(out.device, out.dtype).expand_as(out)
        return _replace_first(output, _where(tracker.mask(), new, out))

    return hook


def _head_mix(x: torch.Tensor, keep: torch.Tensor, heads: int, mean: torch.Tensor | None) -> torch.Tensor:
    """Keep heads where keep==1 in x (B, T, H*D); others become 0 or their mean. keep: (H,) or (B, T, H)."""
    shape = x.shape
    xh = x.reshape(*shape[:-1], heads, -1)
    keep = keep.to(x.device, x.dtype)[..., None]
    if mean is None:
        return (xh * keep).reshape(shape)
    return (xh * keep + mean.to(x.device, x.dtype).reshape(heads, -1) * (1 - keep)).reshape(shape)


def _static_heads_prehook(tracker: PhaseTracker, heads: int, removed: set[int], mean):
    """Idempotent (x*keep + mean*(1-keep) twice is the same), so the sparsifier may call o_proj again."""
    keep = torch.ones(heads)
    keep[sorted(removed)] = 0
    placed: dict = {}  # keep on each (device, dtype) seen: no host-to-device copy per call (CUDA graphs replay it)

    def pre(module, args):
        x = args[0]
        if (x.device, x.dtype) not in placed:
            placed[x.device, x.dtype] = keep.to(x.device, x.dtype)
        here = placed[x.device, x.dtype]
        return (_where(tracker.mask(), _head_mix(x, here, heads, mean), x),) + tuple(args[1:])

    return pre


def _weight_address(proj: torch.nn.Module) -> int:
    weight = getattr(proj, "weight", None)
    return weight.data_ptr() if isinstance(weight, torch.Tensor) else id(proj)


def _fold_heads_off(proj: torch.nn.Module, heads: int, removed: set[int]):
    """Zero the removed heads' input columns of `proj` in place; returns the undo, or None where the
    weight cannot be edited safely (quantised, on the meta device, or moved in by accelerate's hooks)."""
    weight = getattr(proj, "weight", None)
    if (not isinstance(proj, torch.nn.Linear) or not weight.is_floating_point() or weight.device.type == "meta"
            or hasattr(proj, "_hf_hook")):
        return None
    width = weight.shape[1] // heads
    columns = torch.tensor([h * width + i for h in sorted(removed) for i in range(width)], device=weight.device)
    with torch.no_grad():
        saved = weight.index_select(1, columns)
        weight.index_fill_(1, columns, 0)

    def undo():
        with torch.no_grad():
            weight.index_copy_(1, columns, saved)

    return undo


def head_scores(weights: torch.Tensor, metric: str, score_dtype: str) -> torch.Tensor:
    """(B, H, T) per-head scores of attention rows (B, H, T, K), higher is kept: minus the entropy (up to a
    factor ln 2) or the L2 norm; summed in fp32, or in the probabilities' own dtype as the authors did (bf16
    sums can reorder heads whose scores differ by less than about 0.03 bits)."""
    dtype = torch.float32 if score_dtype == "fp32" else weights.dtype
    if metric == "entropy":
        return torch.xlogy(weights, weights).sum(-1, dtype=dtype)
    return weights.norm(dim=-1, dtype=dtype)


class _Sparsifier:
    """Dynamic top-k heads per token from the attention probabilities (the paper's method)."""

    def __init__(self, tracker: PhaseTracker, proj: torch.nn.Linear, heads: int, sparsify, mean):
        self.tracker, self.proj, self.heads, self.sparsify, self.mean = tracker, proj, heads, sparsify, mean
        self.stash: torch.Tensor | None = None
        self.score: torch.Tensor | None = None  # from lab's kernel, when it computed the attention
        self.recomputing = False

    def pre(self, module, args):
        """Keep the projection's input for post(); when lab's kernel has scored the heads already, mix the heads
        here instead, so the projection runs once."""
        if self.recomputing:
            return None
        if self.score is None:
            self.stash = args[0]
            return None
        score, self.score = self.score, None
        self.stash = None
        return (_head_mix(args[0], self._kept(score).to(args[0].device), self.heads, self.mean), *args[1:])

    def sdpa(self, module, query, key, value, attention_mask, *args, **kwargs):
        """The attention inside lab's attention entry (lab.fast.attention): a whole prompt through lab's window
        kernel, which scores each head online (no weights made); anything else through eager attention."""
        parts = attention.window_parts(module, query, key, value, attention_mask, *args, metric=self.sparsify.metric,
                                     **kwargs)
        if parts is None:
            return attention.eager(module, query, key, value, attention_mask, *args, **kwargs)
        self.score = parts.score
        return parts.out, None

    def post(self, module, args, output):
        if self.stash is None:  # pre() mixed the heads already
            return None
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None or weights.dim() != 4:
            raise LabError("sparsification needs attention probabilities; load the model with eager attention")
        keep = self._kept(head_scores(weights, self.sparsify.metric, self.sparsify.score_dtype))
        x, self.stash = self.stash, None
        self.recomputing = True  # call the projection itself so accelerate's offload hooks still apply
        try:
            new = self.proj(_head_mix(x, keep.to(x.device), self.heads, self.mean))
        finally:
            self.recomputing = False
        return _replace_first(output, new.to(_first(output).dtype))

    def _kept(self, score: torch.Tensor) -> torch.Tensor:
        """(B, T, H) 1 for the k best heads of each query by `score` (B, H, T), 1 everywhere outside the phase."""
        keep = torch.zeros_like(score, dtype=torch.float32)
        if self.sparsify.k > 0:
            keep.scatter_(1, score.topk(self.sparsify.k, dim=1).indices, 1.0)
        keep = keep.transpose(1, 2)
        mask = self.tracker.mask()
        if mask is not None:
            keep = torch.where(mask.to(keep.device)[..., None], keep, torch.ones_like(keep))
        return keep


def _attention_ops_in_kernel(model: torch.nn.Module, plan: Resolved) -> bool:
    """Whether the plan's needle-attention or sparsification op acts inside lab's attention kernel (one of them,
    and sparsification scoring in fp32) rather than through eager attention's weights."""
    sparsify, needle = plan.sparsify is not None, plan.needle is not None
    return (sparsify != needle and (not sparsify or plan.sparsify.score_dtype == "fp32")
            and attention.takes_attention_ops(model))


def base_module(model: torch.nn.Module, anatomy: Anatomy) -> torch.nn.Module:
    """The decoder stack's owner (model.model or model.backbone), which receives position_ids."""
    return model.get_submodule(ADAPTERS[anatomy.architecture].layers.rsplit(".", 1)[0])


_ACTIVE: weakref.WeakSet = weakref.WeakSet()  # models with a plan installed now
_ACTIVE_LOCK = threading.Lock()


@contextmanager
def _only_plan(model: torch.nn.Module) -> Iterator[None]:
    """Refuse a second plan on a model that has one: stacked hooks and folded weights undone out of order
    would leave heads zeroed for good."""
    with _ACTIVE_LOCK:
        if model in _ACTIVE:
            raise LabError("a plan is already active on this model: one job at a time (wait, or cancel it)")
        _ACTIVE.add(model)
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(model)


@contextmanager
def apply_plan(model: torch.nn.Module, anatomy: Anatomy, plan: Plan | Resolved, means: Means | None = None,
               prompt_len: int | None = None) -> Iterator[PhaseTracker]:
    """Install `plan` (resolved here unless it already is) on `model`; yields the PhaseTracker (set
    .prompt_len for teacher forcing)."""
    plan = plan if isinstance(plan, Resolved) else resolve(plan, anatomy)
    if plan.mode == "mean" and means is None and not plan.is_empty:
        raise LabError("mean ablation needs calibration means: compute them with lab.interventions.calibrate")
    with _only_plan(model):
        yield from _installed(model, anatomy, plan, means or {}, prompt_len)


def _installed(model, anatomy: Anatomy, plan: Resolved, means: Means, prompt_len: int | None
               ) -> Iterator[PhaseTracker]:
    tracker = PhaseTracker(plan.phase, prompt_len)
    tracker.positionwise = plan.is_empty or (plan.phase == "both" and plan.sparsify is None and plan.needle is None)
    handles, undos = [], []
    previous_impl = None
    try:
        if plan.is_empty:
            yield tracker
            return
        if plan.phase != "both":  # positions only matter when the plan acts on one phase
            handles.append(base_module(model, anatomy).register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        weights = Counter(_weight_address(model.get_submodule(b.out_proj)) for _, b in anatomy.blocks("attention"))
        for layer, heads in plan.heads_by_layer().items():
            block = anatomy.attention(layer)
            proj, mean = model.get_submodule(block.out_proj), means.get(("heads", layer))
            foldable = mean is None and plan.phase == "both" and weights[_weight_address(proj)] == 1  # Zamba ties them
            undo = _fold_heads_off(proj, block.heads, heads) if foldable else None
            if undo is not None:
                undos.append(undo)
                continue
            pre = _static_heads_prehook(tracker, block.heads, heads, mean)
            handles.append(proj.register_forward_pre_hook(pre))
        in_kernel = _attention_ops_in_kernel(model, plan)
        if (plan.sparsify is not None or plan.needle is not None) and not in_kernel \
                and model.config._attn_implementation != "eager":
            previous_impl = model.config._attn_implementation
            model.set_attn_implementation("eager")
        if plan.needle is not None:
            base = base_module(model, anatomy)
            undos.append(needle_attention.install(model, anatomy, plan, tracker, base, in_kernel))
        if plan.sparsify is not None:
            for layer, block in anatomy.blocks("attention"):
                if plan.sparsify.k >= block.heads:
                    continue
                proj, module = model.get_submodule(block.out_proj), model.get_submodule(block.path)
                sparsifier = _Sparsifier(tracker, proj, block.heads, plan.sparsify, means.get(("heads", layer)))
                handles.append(proj.register_forward_pre_hook(sparsifier.pre))
                handles.append(module.register_forward_hook(sparsifier.post))
                if in_kernel:
                    fast_state.set_attention_op(module, sparsifier.sdpa)
                    undos.append(functools.partial(fast_state.set_attention_op, module))
        for site in sorted(plan.blocks):
            block = anatomy.layers[site.layer].block(site.kind)
            hook = _block_hook(tracker, means.get(("block", site.layer, site.kind)))
            handles.append(model.get_submodule(block.path).register_forward_hook(hook))
        handles.extend(experts.install(model, anatomy, plan, tracker))
        yield tracker
    finally:
        for handle in handles:
            handle.remove()
        for undo in undos:
            undo()
        if previous_impl is not None:
            model.set_attn_implementation(previous_impl)
