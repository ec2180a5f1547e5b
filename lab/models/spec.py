"""ModelSpec: what model to load and how (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how. `name`: builtin, `random:<model_type>`, `config:<published>`, a directory or a hub id."""

    name: str = "toy-recurrentgemma"
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | device_map (accelerate, spread over GPUs) | meta
    attn_implementation: str | None = None  # None: transformers' default (sdpa where supported)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    fast: bool = True  # lab's fast paths for this model, in place of the reference code (lab.fast.apply)
