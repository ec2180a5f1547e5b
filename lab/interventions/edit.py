"""Editing a Plan one switch at a time (what the console's grid does), as pure functions."""

from __future__ import annotations

from dataclasses import replace

from lab.interventions.plan import NEEDLE_MODES, PHASES, PREFILL_MODES, BlocksOff, NeedleAttention, Plan, Sparsify
from lab.models.anatomy import BLOCK_KINDS, Anatomy


def _with_blocks(plan: Plan, anatomy: Anatomy, off: set[tuple[int, str]]) -> Plan:
    entries = []
    for kind in BLOCK_KINDS:
        layers = sorted(layer for layer, k in off if k == kind)
        if layers:
            every = [layer for layer, _ in anatomy.blocks(kind)]
            entries.append(BlocksOff(kind, None if layers == every else tuple(layers)))
    return plan.with_(off=tuple(entries))


def toggle_block(plan: Plan, anatomy: Anatomy, layer: int, kind: str) -> Plan:
    off = set(plan.blocks_off(anatomy))
    off ^= {(layer, kind)}
    return _with_blocks(plan, anatomy, off)


def toggle_head(plan: Plan, anatomy: Anatomy, layer: int, head: int) -> Plan:
    """Flip one query head; a static keep-set becomes the equivalent explicit heads-off list."""
    removed = {(l, h) for l, heads in plan.heads_removed(anatomy).items() for h in heads}
    removed ^= {(layer, head)}
    return plan.with_(heads_off=tuple(sorted(removed)), keep_heads=None)


def toggle_layer(plan: Plan, anatomy: Anatomy, layer: int) -> Plan:
    """Every block of the layer off, or back on if all already are."""
    kinds = {b.kind for b in anatomy.layers[layer].blocks}
    off = set(plan.blocks_off(anatomy))
    mine = {(layer, k) for k in kinds}
    off = off - mine if mine <= off else off | mine
    return _with_blocks(plan, anatomy, off)


def toggle_kind(plan: Plan, anatomy: Anatomy, kind: str) -> Plan:
    """Every block of a kind off ("all attention", "all ssm", ...), or back on."""
    off = set(plan.blocks_off(anatomy))
    mine = {(layer, kind) for layer, _ in anatomy.blocks(kind)}
    off = off - mine if mine and mine <= off else off | mine
    return _with_blocks(plan, anatomy, off)


def step_sparsify(plan: Plan, anatomy: Anatomy, delta: int) -> Plan:
    """Move sparsify k by delta; k reaching the head count switches sparsification off."""
    most = max((b.heads for _, b in anatomy.blocks("attention")), default=0)
    k = plan.sparsify.k if plan.sparsify else most
    k = max(0, min(most, k + delta))
    return plan.with_(sparsify=None if k >= most else Sparsify(k, plan.sparsify.metric if plan.sparsify else "entropy"))


def next_phase(plan: Plan) -> Plan:
    return plan.with_(phase=PHASES[(PHASES.index(plan.phase) + 1) % len(PHASES)])


def next_mode(plan: Plan) -> Plan:
    return plan.with_(mode="mean" if plan.mode == "zero" else "zero")


def next_needle_mode(plan: Plan, phase: str) -> Plan:
    """Cycle the needle-attention mode of "generation" (keep, omit, only, balanced, null) or "prefill"
    (the same, then follow); back at keep in both phases the op leaves the plan."""
    needle = plan.needle_attention or NeedleAttention()
    modes = {"generation": NEEDLE_MODES, "prefill": PREFILL_MODES}[phase]
    needle = replace(needle, **{phase: modes[(modes.index(getattr(needle, phase)) + 1) % len(modes)]})
    idle = needle.generation == needle.mode("prefill") == "keep" and needle.everywhere
    return plan.with_(needle_attention=None if idle else needle)
