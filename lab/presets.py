"""Presets: model + plan + probe settings as strict TOML (data only; unknown keys are errors)."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from lab.errors import LabError
from lab.interventions.plan import Plan
from lab.models.anatomy import Anatomy
from lab.models.loading import ModelSpec
from lab.probes.heads import HeadsSpec
from lab.probes.mmlu import MMLUSpec
from lab.probes.needle import NeedleSpec

TOP_KEYS = {"name", "description", "model", "plan", "needle", "mmlu", "heads"}
PROBE_TABLES = ("needle", "mmlu", "heads")  # in run order
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str = "untitled"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    plan: dict = field(default_factory=dict)  # the [plan] table; resolved against a model by plan_for()
    needle: NeedleSpec | None = None
    mmlu: MMLUSpec | None = None
    heads: HeadsSpec | None = None

    @property
    def probes(self) -> dict:
        """{probe name: spec} for each probe table the preset has, in run order."""
        return {name: spec for name in PROBE_TABLES if (spec := getattr(self, name)) is not None}

    def plan_for(self, anatomy: Anatomy) -> Plan:
        return Plan.from_dict(self.plan, anatomy)

    def with_model(self, name: str) -> Preset:
        return replace(self, model=replace(self.model, name=name))

    def with_plan(self, plan: Plan) -> Preset:
        return replace(self, plan=plan.to_dict())

    def to_dict(self) -> dict:
        data: dict = {"name": self.name}
        if self.description:
            data["description"] = self.description
        data["model"] = {k: v for k, v in asdict(self.model).items() if v is not None}
        data["plan"] = self.plan
        for key in PROBE_TABLES:
            spec = getattr(self, key)
            if spec is not None:
                data[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}
        return data

    def to_toml(self) -> str:
        return _compact_arrays(tomli_w.dumps(self.to_dict()))

    def fingerprint(self) -> str:
        """Identity of the results: what changes them (not batch sizes)."""
        data = self.to_dict()
        data.pop("name", None), data.pop("description", None)
        for key in PROBE_TABLES:
            if key in data:
                data[key].pop("batch_size", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]




def _compact_arrays(text: str) -> str:
    """Write arrays of numbers (and of number pairs) on one line: [250, 677] and [[2, 0], [2, 1]]."""
    while True:
        new = re.sub(r"\[\s*([-\d.]+(?:,\s*[-\d.]+)*),?\s*\]", lambda m: "[" + ", ".join(
            x.strip() for x in m.group(1).split(",")) + "]", text)
        new = re.sub(r"\[\s*(\[[-\d., ]*\](?:,\s*\[[-\d., ]*\])*),?\s*\]",
                     lambda m: "[" + ", ".join(x.strip() for x in re.findall(r"\[[^\]]*\]", m.group(1))) + "]", new)
        if new == text:
            return text
        text = new


def _section(cls, data, section: str):
    if not isinstance(data, dict):
        raise LabError(f"[{section}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise LabError(f"[{section}]: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
    values = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list):
                raise LabError(f"{section}.{key}: expected a list")
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise LabError(f"{section}.{key}: expected true or false")
        elif isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise LabError(f"{section}.{key}: expected an integer")
        elif isinstance(default, str) and not isinstance(value, str):
            raise LabError(f"{section}.{key}: expected a string")
        values[key] = value
    return cls(**values)


def from_dict(data: dict) -> Preset:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise LabError(f"unknown preset key {sorted(unknown)[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    plan = data.get("plan", {})
    if not isinstance(plan, dict):
        raise LabError("[plan] must be a table")
    Plan.from_dict(plan)  # everything that can be checked without the model
    needle = _section(NeedleSpec, data["needle"], "needle").validate() if "needle" in data else None
    mmlu = _section(MMLUSpec, data["mmlu"], "mmlu").validate() if "mmlu" in data else None
    heads = _section(HeadsSpec, data["heads"], "heads").validate() if "heads" in data else None
    return Preset(name=str(data.get("name", "untitled")), description=str(data.get("description", "")),
                  model=_section(ModelSpec, data.get("model", {}), "model"), plan=plan, needle=needle, mmlu=mmlu,
                  heads=heads)


def parse(text: str, origin: str = "preset") -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LabError(f"{origin}: malformed TOML: {error}") from None
    return from_dict(data)


def resolve(name: str) -> Path:
    """A preset path, or a name in presets/ (with or without .toml)."""
    path = Path(name).expanduser()
    for candidate in (path, PRESET_DIR / name, PRESET_DIR / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    raise LabError(f"preset {name} not found (a .toml file, or one of: {', '.join(list_presets()) or 'none'})")


def load(name: str) -> Preset:
    path = resolve(name)
    return parse(path.read_text(encoding="utf-8"), str(path))


def save(preset: Preset, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(preset.to_toml(), encoding="utf-8")
    return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml")) if PRESET_DIR.is_dir() else []
