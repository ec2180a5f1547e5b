"""Summaries of trial rows, each by its probe; the needle heatmap; runs in a few words."""

from __future__ import annotations

import json
import time
from collections import defaultdict

from lab import probes
from lab.probes.base import mean


def summarize(rows: list[dict]) -> dict:
    """{probe name: its summary} for the probes present in `rows` (each row carries "probe")."""
    by_probe: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_probe[row["probe"]].append(row)
    return {name: probes.get(name).summary(probe_rows) for name, probe_rows in by_probe.items()}


def heatmap(rows: list[dict], value: str = "score") -> tuple[list[int], list[float], list[list[float | None]]]:
    """(lengths, depths, grid[depth][length]) of mean `value` for needle rows."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cells = defaultdict(list)
    for r in rows:
        cells[(r["depth"], r["length"])].append(r[value])
    grid = [[mean(cells[(d, n)]) if cells[(d, n)] else None for n in lengths] for d in depths]
    return lengths, depths, grid


KIND_SHORT = {"attention": "attn"}
PHASE_SHORT = {"generation": "gen only", "prefill": "prefill only"}
RUN_COLUMNS = ("id", "needle", "MMLU", "status", "plan", "probes", "trials", "started", "model", "name")  # figures
# and status first: at 80 columns the console's Runs tab showed only id and plan, at 120 a long plan hid the status


def short_plan(plan: dict) -> str:
    """A stored plan in a few words for chart legends and run lists: 'attn off L2', 'k=2 · gen only', 'base'."""
    parts = []
    for entry in plan.get("off", []):
        layers = entry.get("layers")
        where = "" if layers is None else " L" + ",".join(map(str, layers[:3])) + ("…" if len(layers) > 3 else "")
        parts.append(f"{KIND_SHORT.get(entry['kind'], entry['kind'])} off{where}")
    heads = plan.get("heads_off") or []
    if len(heads) == 1:  # a sweep's conditions: which head
        parts.append(f"head L{heads[0][0]}.h{heads[0][1]} off")
    elif heads:
        parts.append(_count(len(heads), "head") + " off")
    if plan.get("keep_heads") is not None:
        parts.append(f"keep {_count(len(plan['keep_heads']), 'head')}")
    if plan.get("sparsify"):
        metric = plan["sparsify"].get("metric", "entropy")
        parts.append(f"k={plan['sparsify']['k']}" + (f" by {metric}" if metric != "entropy" else ""))
    if plan.get("experts_off"):
        parts.append(_count(len(plan["experts_off"]), "expert") + " off")
    needle = plan.get("needle_attention")
    if needle:
        prefill = needle["generation"] if needle["prefill"] == "follow" else needle["prefill"]
        parts.append(f"needle {needle['generation']}" if prefill == needle["generation"] else
                     f"needle {needle['generation']} in gen, {prefill} in prefill")
    if not parts:
        return "base"
    if plan.get("mode") == "mean":
        parts.append("mean")
    if plan.get("phase") in PHASE_SHORT:
        parts.append(PHASE_SHORT[plan["phase"]])
    return " · ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def is_base(run: dict) -> bool:
    """Whether a stored run switched nothing off (the model as it is)."""
    return short_plan(json.loads(run["plan"])) == "base"


def run_label(run: dict) -> str:
    """'#4 attn off L2': how charts name a run."""
    return f"#{run['id']} {short_plan(json.loads(run['plan']))}"


def age(seconds: float) -> str:
    """How long ago, in one short unit: '40s ago', '5m ago', '3h ago', '2d ago'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def preset_name(run: dict) -> str:
    """The name of the preset a run came from (runs are named 'preset · plan in words'); '' when untitled."""
    name = run["name"].rpartition(" · ")[0] or run["name"]
    return "" if name == "untitled" else name


def run_cells(run: dict, summary: dict, now: float | None = None) -> list[str]:
    """One run as the cells of RUN_COLUMNS (`summary`: summarize() of its trials)."""
    def accuracy(probe: str) -> str:
        return f"{100 * summary[probe]['accuracy']:.1f} %" if probe in summary else ""
    return [str(run["id"]), accuracy("needle"), accuracy("mmlu"), run["status"], short_plan(json.loads(run["plan"])),
            " ".join(sorted(summary)), str(run["trials"]), age((now or time.time()) - run["started"]), run["model"],
            preset_name(run)]
