"""Ablation sweeps: every layer, head, KV group, k or keep-top percentage as a condition, each a run in
the results database linked by a sweep id."""

from lab.sweeps.axes import AXES, Condition, Options, conditions, numbers
from lab.sweeps.run import SweepFinished, SweepStarted, Stage, result, run

__all__ = ["AXES", "Condition", "Options", "Stage", "SweepFinished", "SweepStarted", "conditions", "numbers",
           "result", "run"]
