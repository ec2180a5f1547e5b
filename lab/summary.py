"""Summaries of trial rows: needle accuracy by length and depth, MMLU accuracy by category/subject."""

from __future__ import annotations

from collections import defaultdict


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _by(rows, key, value) -> dict[str, float]:
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row[value])
    return {(f"{k:g}" if isinstance(k, float) else str(k)): round(_mean(v), 4) for k, v in sorted(groups.items())}


def needle_summary(rows: list[dict]) -> dict:
    return {"accuracy": round(_mean(r["exact"] for r in rows), 4), "score": round(_mean(r["score"] for r in rows), 4),
            "trials": len(rows), "by_length": _by(rows, "length", "exact"), "by_depth": _by(rows, "depth", "exact")}


def mmlu_summary(rows: list[dict]) -> dict:
    return {"accuracy": round(_mean(r["correct"] for r in rows), 4), "questions": len(rows),
            "by_category": _by(rows, "category", "correct"), "by_subject": _by(rows, "subject", "correct")}


def summarize(rows: list[dict]) -> dict:
    """{"needle": ..., "mmlu": ...} for the probes present in `rows` (each row carries "probe")."""
    out = {}
    needle = [r for r in rows if r["probe"] == "needle"]
    mmlu = [r for r in rows if r["probe"] == "mmlu"]
    if needle:
        out["needle"] = needle_summary(needle)
    if mmlu:
        out["mmlu"] = mmlu_summary(mmlu)
    return out


def heatmap(rows: list[dict], value: str = "score") -> tuple[list[int], list[float], list[list[float | None]]]:
    """(lengths, depths, grid[depth][length]) of mean `value` for needle rows."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cells = defaultdict(list)
    for r in rows:
        cells[(r["depth"], r["length"])].append(r[value])
    grid = [[_mean(cells[(d, n)]) if cells[(d, n)] else None for n in lengths] for d in depths]
    return lengths, depths, grid
