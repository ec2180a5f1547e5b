"""Expert ablation in MoE blocks (plan.experts_off), as hooks; no weight or buffer is edited.

transformers 5.x MoE blocks call `router(x) -> (logits, top-k weights, top-k indices)`, then one fused
experts module `experts(x, top-k indices, top-k weights)`.
- zero: a forward pre-hook on the experts module sets the expert's routing weight to 0 wherever a token
  routed to it, so its output is dropped and the token's other top-k experts keep their weights.
- reroute: while the router runs, its logits (the output of its first linear map) are -inf at the expert,
  and so is any sum with a selection bias the router adds before choosing (DeepSeek-style
  `e_score_correction_bias`, LFM2's `expert_bias`): top-k picks other experts, and softmax routers
  renormalise over the rest.
Both act only on the positions in the plan's phase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lab.interventions.sites import Resolved
from lab.models.anatomy import Anatomy

SELECTION_BIASES = ("e_score_correction_bias", "expert_bias")  # on the router, or on the MoE block (LFM2)


def _rows(tracker, tokens: int) -> torch.Tensor | None:
    """(tokens,) bool: which of the flattened (batch x time) tokens are in the phase; None: all of them."""
    mask = tracker.mask()
    if mask is None:
        return None
    return mask.expand(tokens // mask.shape[-1], mask.shape[-1]).reshape(tokens)


def _drop(tracker, experts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(tokens, k) bool: the top-k slots that hold one of `experts`, at positions in the phase."""
    hit = torch.isin(index, experts.to(index.device))
    rows = _rows(tracker, index.shape[0])
    return hit if rows is None else hit & rows.to(hit.device)[:, None]


def _zero_prehook(tracker, experts: torch.Tensor):
    def pre(module, args, kwargs):
        args = list(args)
        positional = len(args) > 2
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if positional else kwargs["top_k_weights"]
        weights = weights.masked_fill(_drop(tracker, experts, index), 0)
        if positional:
            args[2] = weights
        else:
            kwargs = {**kwargs, "top_k_weights": weights}
        return tuple(args), kwargs

    return pre


class _MaskScores(TorchFunctionMode):
    """Inside one router call: -inf at the masked experts' columns of its logits (the first linear map) and of
    any result computed from a selection bias (looked up at each call: accelerate may swap the tensor in)."""

    def __init__(self, tracker, columns: torch.Tensor, biases: list[tuple[torch.nn.Module, str]]):
        super().__init__()
        self.tracker, self.columns, self.biases = tracker, columns, biases
        self.logits_seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-1] == len(self.columns)):
            return out  # not scores of every token for every expert
        logits = func is F.linear and not self.logits_seen
        self.logits_seen |= logits
        if logits or any(arg is getattr(owner, name) for arg in args for owner, name in self.biases):
            return self._masked(out)
        return out

    def _masked(self, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.reshape(-1, scores.shape[-1])
        mask = self.columns.to(flat.device)[None].expand_as(flat)
        rows = _rows(self.tracker, flat.shape[0])
        if rows is not None:
            mask = mask & rows.to(flat.device)[:, None]
        return flat.masked_fill(mask, float("-inf")).reshape(scores.shape)


class _Rerouter:
    """Enters a _MaskScores mode before the router's forward and leaves it after (even when it raises)."""

    def __init__(self, tracker, columns: torch.Tensor, biases: list[tuple[torch.nn.Module, str]]):
        self.tracker, self.columns, self.biases = tracker, columns, biases
        self.modes: list[_MaskScores] = []

    def pre(self, module, args):
        mode = _MaskScores(self.tracker, self.columns, self.biases)
        mode.__enter__()
        self.modes.append(mode)

    def post(self, module, args, output):
        self.modes.pop().__exit__(None, None, None)


def install(model: torch.nn.Module, anatomy: Anatomy, plan: Resolved, tracker) -> list:
    """Hook the plan's experts off onto `model`; returns the hook handles (removing them undoes it)."""
    handles = []
    for layer, experts in plan.experts_by_layer().items():
        block = anatomy.layers[layer].block("moe")
        chosen = torch.tensor(sorted(experts))
        if plan.expert_mode == "zero":
            module = model.get_submodule(block.experts_path)
            handles.append(module.register_forward_pre_hook(_zero_prehook(tracker, chosen), with_kwargs=True))
            continue
        router = model.get_submodule(block.router)
        columns = torch.zeros(block.experts, dtype=torch.bool)
        columns[chosen] = True
        owners = (router, model.get_submodule(block.path))
        biases = [(owner, name) for owner in owners for name in SELECTION_BIASES
                  if isinstance(getattr(owner, name, None), torch.Tensor)]
        rerouter = _Rerouter(tracker, columns, biases)
        handles.append(router.register_forward_pre_hook(rerouter.pre))
        handles.append(router.register_forward_hook(rerouter.post, always_call=True))
    return handles
