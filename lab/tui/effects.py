"""A sweep's result as the console draws it: each condition's effect (difference to the base accuracy) on
a diverging colour scale for the grid, and accuracy against the swept value for a chart."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rich.color import Color
from rich.style import Style
from rich.text import Text

from lab.interventions.sites import Site
from lab.models.anatomy import Anatomy
from lab.sweeps.axes import BLOCK_AXES
from lab.sweeps.stats import OUTCOMES

NEUTRAL, DROP, GAIN = (70, 70, 70), (215, 48, 39), (49, 130, 220)  # no effect, accuracy lost, accuracy gained
LEGEND = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
NUMERIC_AXES = ("k", "keep-top")  # a number on the x axis; other axes: one place per condition
SHORT_LABELS = ((".attn.h", "h"), (".attn.kv", "kv"), (".attn", ""), (".ssm", ""), (".mlp", ""))


def effect_colour(delta: float) -> Color:
    """-1 (every trial lost) -> red, 0 -> grey, +1 -> blue; linear in between."""
    v = max(-1.0, min(1.0, delta))
    end = DROP if v < 0 else GAIN
    return Color.from_rgb(*(round(n + (e - n) * abs(v)) for n, e in zip(NEUTRAL, end)))


def legend() -> Text:
    """The scale's swatches, labelled in percentage points."""
    text = Text("effect vs base (pp) ")
    for step in LEGEND:
        text.append(f"{100 * step:+.0f} ".replace("+0 ", "0 ").rjust(5), Style(color="white", bgcolor=effect_colour(step)))
    return text


def _short(label: str) -> str:
    """A condition's label as an axis tick: L2.attn.h3 -> L2h3, L4.ssm -> L4."""
    for long, short in SHORT_LABELS:
        label = label.replace(long, short)
    return label


def thinned(ticks: list[tuple[float, str]], width: int) -> list[tuple[float, str]]:
    """Every n-th tick, so that their labels fit side by side in `width` columns."""
    room = max(1, width // (max((len(label) for _, label in ticks), default=1) + 2))
    return ticks[::-(-len(ticks) // room) or 1]


def probe_of(result: dict) -> str | None:
    """The probe a sweep's map and chart show: needle if it measured it, else MMLU."""
    rows = ([result["base"]] if result.get("base") else []) + result["conditions"]
    return next((p for p in OUTCOMES if any(p in row for row in rows)), None)


def sites(axis: str, value, anatomy: Anatomy) -> list[Site]:
    """The grid cells one condition switched off: a block, a head, a KV group's query heads; none for k and
    keep-top, which change every layer."""
    if axis in BLOCK_AXES:
        return [Site(value, BLOCK_AXES[axis])]
    if axis == "heads":
        return [Site(value[0], "attention", value[1])]
    if axis == "kv-heads":
        layer, group = value
        block = anatomy.attention(layer)
        per_group = block.heads // block.kv_heads
        return [Site(layer, "attention", h) for h in range(group * per_group, (group + 1) * per_group)]
    return []


def effect_map(result: dict, anatomy: Anatomy) -> dict[Site, float]:
    """{site: difference to the base accuracy} of the finished conditions (random controls left out)."""
    probe = probe_of(result)
    found = {}
    for condition in result["conditions"]:
        figures = condition.get(probe) or {}
        if condition["control"] == 0 and condition["status"] == "done" and "delta" in figures:
            found.update(dict.fromkeys(sites(result["axis"], condition["value"], anatomy), figures["delta"]))
    return found


@dataclass
class Curve:
    """Accuracy (%) against the swept value: the conditions, the base and the random controls as lines."""

    title: str
    xlabel: str
    ticks: list[tuple[float, str]] = field(default_factory=list)
    lines: list[tuple[str, list[float], list[float]]] = field(default_factory=list)  # name, xs, ys


def curve(result: dict) -> Curve:
    """The finished conditions' accuracy by swept value (k: the paper's curve); the base as a flat line and
    the mean of each value's random controls as another."""
    probe = probe_of(result)
    axis = result["axis"]
    done = [c for c in result["conditions"] if c["status"] == "done" and probe in c]
    numeric = axis in NUMERIC_AXES
    places: dict[str, float] = {}
    for condition in (c for c in result["conditions"] if c["control"] == 0):
        key = json.dumps(condition["value"])
        places[key] = float(condition["value"]) if numeric else len(places) + 1
    names = {json.dumps(c["value"]): f"{c['value']:g}" if numeric else _short(c["label"]) for c in result["conditions"]}
    found = Curve(f"{probe or 'accuracy'} by {axis}" + (" (the paper's curve)" if axis == "k" else ""),
                  axis if numeric else "condition")
    found.ticks = [(x, names[key]) for key, x in places.items()]
    for name, control in ((axis, False), ("random controls", True)):
        by_place: dict[float, list[float]] = {}
        for condition in done:
            if (condition["control"] > 0) == control and json.dumps(condition["value"]) in places:
                by_place.setdefault(places[json.dumps(condition["value"])], []).append(condition[probe]["accuracy"])
        if by_place:
            xs = sorted(by_place)
            found.lines.append((name, xs, [100 * sum(by_place[x]) / len(by_place[x]) for x in xs]))
    base = (result.get("base") or {}).get(probe)
    if base is not None and places:
        xs = sorted(places.values())
        found.lines.append(("base", [xs[0], xs[-1]], [100 * base["accuracy"]] * 2))
    return found
