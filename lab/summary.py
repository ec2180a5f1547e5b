"""Summaries of trial rows, each by its probe; the needle heatmap."""

from __future__ import annotations

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
