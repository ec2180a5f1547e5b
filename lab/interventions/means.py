"""Calibration means for `mode = "mean"`: average block outputs and per-head inputs of o_proj."""

from __future__ import annotations

import torch

from lab.interventions.hooks import Means, _first
from lab.interventions.plan import Plan
from lab.interventions.sites import Resolved, resolve
from lab.models.anatomy import Anatomy


@torch.inference_mode()
def calibrate(model: torch.nn.Module, anatomy: Anatomy, plan: Plan | Resolved, batches: list[torch.Tensor]) -> Means:
    """Mean activations over every position of `batches` (token id tensors), for what `plan` touches."""
    plan = plan if isinstance(plan, Resolved) else resolve(plan, anatomy)
    sums: dict[tuple, torch.Tensor] = {}
    counts: dict[tuple, int] = {}

    def collect(key):
        def add(value: torch.Tensor):
            flat = value.detach().float().reshape(-1, value.shape[-1])
            sums[key] = sums.get(key, 0) + flat.sum(0).cpu()
            counts[key] = counts.get(key, 0) + flat.shape[0]
        return add

    handles = []
    for site in sorted(plan.blocks):
        add = collect(("block", site.layer, site.kind))
        module = model.get_submodule(anatomy.layers[site.layer].block(site.kind).path)
        handles.append(module.register_forward_hook(lambda m, a, out, add=add: add(_first(out))))
    head_layers = set(plan.heads_by_layer())
    if plan.sparsify is not None:
        head_layers |= set(anatomy.attention_layers)
    for layer in sorted(head_layers):
        add = collect(("heads", layer))
        proj = model.get_submodule(anatomy.attention(layer).out_proj)
        handles.append(proj.register_forward_pre_hook(lambda m, args, add=add: add(args[0])))
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sums}
