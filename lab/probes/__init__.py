"""Probes as plug-ins: needle, mmlu and head scoring, found by name."""

from __future__ import annotations

import difflib

from lab.errors import LabError
from lab.probes.base import Prepared, Probe, Work
from lab.probes.heads import HeadsProbe
from lab.probes.mmlu import MMLUProbe
from lab.probes.needle import NeedleProbe

PROBES: dict[str, Probe] = {p.name: p for p in (NeedleProbe(), MMLUProbe(), HeadsProbe())}


def get(name: str) -> Probe:
    """The probe called `name`, or a LabError that suggests the closest name."""
    if name in PROBES:
        return PROBES[name]
    close = difflib.get_close_matches(name, PROBES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise LabError(f"unknown probe {name!r} (known: {', '.join(PROBES)}){hint}")


__all__ = ["PROBES", "Prepared", "Probe", "Work", "get"]
