"""A plan resolved against one model, once: the canonical sites it acts on and the op there.

Sites are named as everywhere in lab (the store, the grid, sweeps): `L2.attn` (a block),
`L2.attn.h3` (a query head), `L4.ssm`, `L5.mlp`, `L5.moe`, `L5.moe.e3` (a routed expert). Hooks,
calibration and the grid read the resolved form instead of re-deriving layers, heads and experts from the
plan's entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lab.errors import LabError
from lab.interventions.plan import NeedleAttention, Plan, Sparsify
from lab.models.anatomy import BLOCK_KINDS, Anatomy

SHORT = {"attention": "attn", "ssm": "ssm", "mlp": "mlp", "moe": "moe"}
_NAME = re.compile(r"L(\d+)\.(attn|ssm|mlp|moe)(?:\.h(\d+)|\.e(\d+))?")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str  # one of BLOCK_KINDS
    head: int | None = None  # a query head of an attention block; None: the whole block
    expert: int | None = None  # a routed expert of a MoE block; None: the whole block

    def __str__(self) -> str:
        unit = f".h{self.head}" if self.head is not None else f".e{self.expert}" if self.expert is not None else ""
        return f"L{self.layer}.{SHORT[self.kind]}{unit}"

    @property
    def order(self) -> tuple:
        """Layer order, the block before its heads or experts (None cannot be compared with an index)."""
        unit = self.head if self.head is not None else self.expert
        return (self.layer, self.kind, -1 if unit is None else unit)

    @classmethod
    def parse(cls, name: str) -> Site:
        match = _NAME.fullmatch(name)
        if match is None:
            raise LabError(f"{name!r} is not a site name (L2.attn, L2.attn.h3, L4.ssm, L5.mlp, L5.moe, L5.moe.e3)")
        layer, short, head, expert = match.groups()
        kind = next(k for k in BLOCK_KINDS if SHORT[k] == short)
        if head is not None and kind != "attention":
            raise LabError(f"{name!r}: only attention blocks have heads")
        if expert is not None and kind != "moe":
            raise LabError(f"{name!r}: only MoE blocks have experts")
        return cls(int(layer), kind, None if head is None else int(head), None if expert is None else int(expert))


@dataclass(frozen=True)
class Resolved:
    """What a plan does to one model: blocks off, heads off (static), sparsification, the heads whose
    attention to the needle is manipulated, experts off; op and phase."""

    plan: Plan
    blocks: frozenset[Site]
    heads: frozenset[Site]
    needle_heads: frozenset[Site] = frozenset()
    experts: frozenset[Site] = frozenset()

    @property
    def sparsify(self) -> Sparsify | None:
        return self.plan.sparsify

    @property
    def needle(self) -> NeedleAttention | None:
        return self.plan.needle_attention

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def phase(self) -> str:
        return self.plan.phase

    @property
    def expert_mode(self) -> str:
        return self.plan.expert_mode

    @property
    def is_empty(self) -> bool:
        return not (self.blocks or self.heads or self.sparsify or self.needle or self.experts)

    def is_off(self, site: Site) -> bool:
        return site in self.blocks or site in self.heads or site in self.experts

    def heads_by_layer(self) -> dict[int, set[int]]:
        return _by_layer(self.heads)

    def needle_by_layer(self) -> dict[int, set[int]]:
        """The query heads whose needle weights the plan changes, per attention layer."""
        return _by_layer(self.needle_heads)

    def experts_by_layer(self) -> dict[int, set[int]]:
        """The experts switched off, per MoE layer."""
        return _by_layer(self.experts, unit="expert")

    def names(self) -> list[str]:
        """Every site switched off, by its canonical name, in layer order."""
        return [str(site) for site in sorted(self.blocks | self.heads | self.experts, key=lambda s: s.order)]


def _by_layer(sites: frozenset[Site], unit: str = "head") -> dict[int, set[int]]:
    by_layer: dict[int, set[int]] = {}
    for site in sites:
        by_layer.setdefault(site.layer, set()).add(getattr(site, unit))
    return dict(sorted(by_layer.items()))


def _needle_heads(needle: NeedleAttention | None, anatomy: Anatomy) -> frozenset[Site]:
    if needle is None:
        return frozenset()
    layers = [layer for layer, _ in anatomy.blocks("attention") if needle.everywhere or layer in (needle.layers or ())]
    sites = {Site(layer, "attention", h) for layer in layers for h in range(anatomy.attention(layer).heads)}
    return frozenset(sites | {Site(layer, "attention", h) for layer, h in needle.heads})


def resolve(plan: Plan, anatomy: Anatomy) -> Resolved:
    """Check the plan against the model and list its sites; raises LabError on a layer or head out of range."""
    plan.validate(anatomy)
    heads = frozenset(Site(layer, "attention", head) for layer, removed in plan.heads_removed(anatomy).items()
                      for head in removed)
    return Resolved(plan, frozenset(Site(layer, kind) for layer, kind in plan.blocks_off(anatomy)), heads,
                    _needle_heads(plan.needle_attention, anatomy),
                    frozenset(Site(layer, "moe", expert=expert) for layer, expert in plan.experts_off))
