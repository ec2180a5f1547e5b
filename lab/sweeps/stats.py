"""Accuracy with a 95 % Wilson interval, per probe, from a run's trial rows."""

from __future__ import annotations

import math

Z95 = 1.959964  # the normal quantile of 97.5 %
OUTCOMES = {"needle": "exact", "mmlu": "correct"}  # the 0/1 column each probe's accuracy counts


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (n > 0)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(rows: list[dict], probe: str) -> dict | None:
    """{"accuracy", "ci95", "trials"} of one probe's rows (None without rows)."""
    if not rows:
        return None
    hits = sum(row[OUTCOMES[probe]] for row in rows)
    low, high = wilson(hits, len(rows))
    return {"accuracy": round(hits / len(rows), 4), "ci95": [round(low, 4), round(high, 4)], "trials": len(rows)}


def compared(figures: dict, base: dict | None) -> dict:
    """`figures` with its difference to the base accuracy and whether its interval excludes the base."""
    if base is None:
        return figures
    low, high = figures["ci95"]
    return {**figures, "delta": round(figures["accuracy"] - base["accuracy"], 4),
            "excludes_base": not low <= base["accuracy"] <= high}
