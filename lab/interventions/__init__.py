"""Interventions: a Plan (plain data) and the hooks that carry it out."""

from lab.interventions.hooks import Means, PhaseTracker, apply_plan
from lab.interventions.means import calibrate
from lab.interventions.plan import METRICS, MODES, PHASES, BlocksOff, Plan, Sparsify, kv_group_heads
from lab.interventions.sites import Resolved, Site, resolve

__all__ = ["METRICS", "MODES", "PHASES", "BlocksOff", "Means", "PhaseTracker", "Plan", "Resolved", "Site",
           "Sparsify", "apply_plan", "calibrate", "kv_group_heads", "resolve"]
