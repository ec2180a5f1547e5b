"""Sweep axes: a sweep's conditions as plans, each the preset's own plan plus one change.

The change extends the plan's lists (off, heads_off, kv_heads_off, experts_off); the k axis replaces the
preset's sparsify and keep-top its keep_heads; the experts axis sets expert_mode when --expert-mode is
given. A random control (--controls N) changes a set of the same size, drawn from every unit of the axis's
kind with a generator seeded by the sweep, so it is the same each time.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from lab.errors import LabError
from lab.interventions import METRICS, Plan, Site
from lab.interventions.plan import EXPERT_MODES
from lab.models.anatomy import Anatomy
from lab.probes.heads import SCORES, keep_set

BLOCK_AXES = {"attention-layers": "attention", "ssm-layers": "ssm", "mlp-layers": "mlp"}
AXES = (*BLOCK_AXES, "heads", "kv-heads", "experts", "k", "keep-top")
LAYERED = (*BLOCK_AXES, "heads", "kv-heads", "experts")  # the axes --layers narrows
VALUED = ("k", "keep-top")  # the axes --values narrows
KEEP_TOP = (5, 10, 15, 25)  # percentages keep-top sweeps without --values


MAX_CONTROLS = 1000  # random sets per condition: more is a typo (each is a whole run of the probes)


@dataclass(frozen=True)
class Options:
    """What a sweep varies: the axis and its narrowing, controls and their seed."""

    axis: str
    layers: tuple[int, ...] | None = None
    values: tuple[float, ...] | None = None  # k (integers) or keep-top percentages
    metric: str | None = None  # k: sparsify metric (default: the preset's, else entropy)
    score: str | None = None  # keep-top: head score (default: retrieval)
    expert_mode: str | None = None  # experts: zero or reroute (default: the preset's expert_mode, else zero)
    controls: int = 0
    seed: int = 0

    def validate(self) -> Options:
        """Check what needs no model; return self or raise LabError."""
        if self.axis not in AXES:
            close = difflib.get_close_matches(self.axis, AXES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise LabError(f"unknown sweep axis {self.axis!r} (known: {', '.join(AXES)}){hint}")
        for flag, given, axes in (("--layers", self.layers, LAYERED), ("--values", self.values, VALUED),
                                  ("--metric", self.metric, ("k",)), ("--score", self.score, ("keep-top",)),
                                  ("--expert-mode", self.expert_mode, ("experts",))):
            if given is not None and self.axis not in axes:
                raise LabError(f"{flag} does not apply to axis {self.axis} (only to {', '.join(axes)})")
        if self.metric is not None and self.metric not in METRICS:
            raise LabError(f"--metric: {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.score is not None and self.score not in SCORES:
            raise LabError(f"--score: {self.score!r} is not one of {', '.join(SCORES)}")
        if self.expert_mode is not None and self.expert_mode not in EXPERT_MODES:
            raise LabError(f"--expert-mode: {self.expert_mode!r} is not one of {', '.join(EXPERT_MODES)}")
        if not 0 <= self.controls <= MAX_CONTROLS:
            raise LabError(f"--controls: {self.controls} is out of range; give the number of random sets per "
                           f"condition, 0 (none) to {MAX_CONTROLS}")
        for layer in self.layers or ():
            if not isinstance(layer, int):
                raise LabError(f"--layers: {layer:g} is not a layer index")
        for flag, given in (("--layers", self.layers), ("--values", self.values)):
            twice = sorted({v for v in given or () if given.count(v) > 1})
            if twice:
                raise LabError(f"{flag}: {twice[0]:g} appears twice")
        if self.values is not None:
            self._check_values()
        return self

    def _check_values(self) -> None:
        if not self.values:
            raise LabError("--values: give at least one value")
        for value in self.values:
            if self.axis == "k" and (value < 0 or not float(value).is_integer()):
                raise LabError(f"--values: k = {value:g} is not a whole number of heads (0, 1, 2, ...)")
            if self.axis == "keep-top" and not 0 < value <= 100:
                raise LabError(f"--values: {value:g} % is not a percentage above 0 and at most 100")

    def to_dict(self) -> dict:
        """As stored with the sweep and fingerprinted; expert_mode only when given, so sweeps from before it
        keep their fingerprints (and resume)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k != "expert_mode" or v is not None}


def numbers(text: str, flag: str) -> tuple[float, ...]:
    """'5,10,15' as numbers (whole ones as int), or a one-line LabError naming the flag."""
    values = []
    for word in text.split(","):
        try:
            value = float(word.strip().removesuffix("%"))
        except ValueError:
            raise LabError(f"{flag}: {word.strip()!r} is not a number (give a comma-separated list, e.g. 2,5)") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise LabError(f"{flag}: {word.strip()!r} is not a number")
        values.append(int(value) if value.is_integer() else value)
    return tuple(values)


@dataclass(frozen=True)
class Condition:
    label: str
    value: object  # the swept quantity: a layer, [layer, head], [layer, kv group], [layer, expert], k or a percentage
    plan: dict  # the whole plan: the preset's own plus this condition's change
    control: int = 0  # 0: the condition itself; n: its n-th random control


Draw = Callable[[random.Random], dict]  # a random control's plan


def conditions(options: Options, anatomy: Anatomy, base: dict, ranked: list | None = None) -> list[Condition]:
    """The base condition (the preset's plan) first, then each condition followed by its random controls;
    every plan checked against the model. keep-top needs `ranked`, the heads from best to worst."""
    options = options.validate()
    found = [Condition("base", None, base)]
    for label, value, plan, draw in _changes(options, anatomy, base, ranked):
        found.append(Condition(label, value, plan))
        for n in range(1, options.controls + 1):
            rng = random.Random(f"{options.seed}/{options.axis}/{label}/{n}")
            found.append(Condition(f"{label} · random {n}", value, draw(rng), n))
    for condition in found:
        Plan.from_dict(condition.plan, anatomy)
    return found


def _changes(options: Options, anatomy: Anatomy, base: dict, ranked) -> Iterator[tuple[str, object, dict, Draw]]:
    heads = [(layer, h) for layer, block in anatomy.blocks("attention") for h in range(block.heads)]
    if options.axis in BLOCK_AXES:
        kind = BLOCK_AXES[options.axis]
        pool = [layer for layer, _ in anatomy.blocks(kind)]
        for layer in _layers(options, anatomy, kind, pool):
            yield (str(Site(layer, kind)), layer, _off(base, kind, [layer]),
                   lambda rng: _off(base, kind, rng.sample(pool, 1)))
        return
    if options.axis == "experts":
        yield from _expert_changes(options, anatomy, base)
        return
    if not heads:
        raise LabError(f"{anatomy.architecture} has no attention heads to sweep")
    attention = anatomy.blocks("attention")
    if options.axis == "heads":
        for layer in _layers(options, anatomy, "attention", [layer for layer, _ in attention]):
            for head in range(anatomy.attention(layer).heads):
                yield (str(Site(layer, "attention", head)), [layer, head], _extend(base, "heads_off", [[layer, head]]),
                       lambda rng: _extend(base, "heads_off", [list(rng.choice(heads))]))
    elif options.axis == "kv-heads":
        groups = [[layer, g] for layer, block in attention for g in range(block.kv_heads)]
        for layer in _layers(options, anatomy, "attention", [layer for layer, _ in attention]):
            for group in range(anatomy.attention(layer).kv_heads):
                yield (f"L{layer}.attn.kv{group}", [layer, group], _extend(base, "kv_heads_off", [[layer, group]]),
                       lambda rng: _extend(base, "kv_heads_off", [rng.choice(groups)]))
    elif options.axis == "k":
        yield from _k_changes(options, attention, base)
    else:
        yield from _keep_top_changes(options, heads, base, ranked)


def _expert_changes(options: Options, anatomy: Anatomy, base: dict) -> Iterator[tuple[str, object, dict, Draw]]:
    """Each expert of each MoE layer off alone, in --expert-mode (else the preset's); a control: a random expert."""
    moe = anatomy.blocks("moe")
    if options.expert_mode is not None:
        base = {**base, "expert_mode": options.expert_mode}
    every = [[layer, e] for layer, block in moe for e in range(block.experts)]
    for layer in _layers(options, anatomy, "moe", [layer for layer, _ in moe]):
        for expert in range(anatomy.layers[layer].block("moe").experts):
            yield (str(Site(layer, "moe", expert=expert)), [layer, expert],
                   _extend(base, "experts_off", [[layer, expert]]),
                   lambda rng: _extend(base, "experts_off", [rng.choice(every)]))


def _k_changes(options: Options, attention: list, base: dict) -> Iterator[tuple[str, object, dict, Draw]]:
    """k = 0..heads (or --values); a control keeps k random heads in every attention layer, statically."""
    most = max(block.heads for _, block in attention)
    metric = options.metric or (base.get("sparsify") or {}).get("metric", "entropy")
    for k in options.values if options.values is not None else range(most + 1):
        if k > most:
            raise LabError(f"--values: k = {k} is out of range (0..{most}, the most heads in a layer)")

        def draw(rng, k=k):
            keep = [[layer, h] for layer, block in attention for h in sorted(rng.sample(range(block.heads),
                                                                                          min(k, block.heads)))]
            return _replace(base, "keep_heads", keep, drop="sparsify")

        yield f"k={k}", k, _replace(base, "sparsify", {"k": k, "metric": metric}), draw


def _keep_top_changes(options: Options, heads: list, base: dict, ranked) -> Iterator[tuple[str, object, dict, Draw]]:
    """Keep the top p % of heads by the score; a control keeps as many random heads."""
    score = options.score or "retrieval"
    for percent in options.values if options.values is not None else KEEP_TOP:
        keep = keep_set(ranked, percent / 100)

        def draw(rng, n=len(keep)):
            return _replace(base, "keep_heads", [list(h) for h in sorted(rng.sample(heads, n))])

        yield (f"top {percent:g} % by {score} ({len(keep)} head{'s' if len(keep) > 1 else ''})", percent,
               _replace(base, "keep_heads", [list(h) for h in keep]), draw)


def _layers(options: Options, anatomy: Anatomy, kind: str, pool: list[int]) -> list[int]:
    """The layers with a block of `kind` to sweep: all of them, or those --layers names (each checked)."""
    if not pool:
        raise LabError(f"{anatomy.architecture} has no {kind} blocks to sweep")
    for layer in options.layers or ():
        if not 0 <= layer < anatomy.num_layers:
            raise LabError(f"--layers: layer {layer} is out of range (0..{anatomy.num_layers - 1})")
        if layer not in pool:
            raise LabError(f"--layers: layer {layer} has no {kind} block (these do: {', '.join(map(str, pool))})")
    return pool if options.layers is None else sorted(options.layers)


def _extend(base: dict, key: str, items: list) -> dict:
    return {**base, key: list(base.get(key, [])) + items}


def _off(base: dict, kind: str, layers: list[int]) -> dict:
    return _extend(base, "off", [{"kind": kind, "layers": sorted(layers)}])


def _replace(base: dict, key: str, value, drop: str | None = None) -> dict:
    return {**{k: v for k, v in base.items() if k != drop}, key: value}
