"""Presets: model + plan + probe settings as strict TOML (data only; unknown keys are errors)."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import tomli_w

from lab.digest import folder_digest
from lab.errors import LabError
from lab.interventions.plan import Plan
from lab.models import loading
from lab.models.spec import ModelSpec
from lab.probes import haystack
from lab.probes.heads import HeadsSpec
from lab.probes.mmlu import NAMED_SOURCES, MMLUSpec
from lab.probes.needle import NeedleSpec

if typing.TYPE_CHECKING:
    from lab.models.anatomy import Anatomy

VERSION = 1  # of the preset format; files without `version` are version 1
TOP_KEYS = {"version", "name", "description", "model", "plan", "needle", "mmlu", "heads"}
PROBE_TABLES = ("needle", "mmlu", "heads")  # in run order
COMMAND_LINE_ONLY = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}
BUILTIN_PRESETS = resources.files("lab") / "data" / "presets"


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

    def with_model(self, name: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> Preset:
        """Another model; remote code and pickles only as the caller (the command line) asks."""
        return replace(self, model=replace(self.model, name=name, trust_remote_code=trust_remote_code,
                                           allow_pickle=allow_pickle))

    def with_plan(self, plan: Plan) -> Preset:
        return replace(self, plan=plan.to_dict())

    def to_dict(self) -> dict:
        data: dict = {"version": VERSION, "name": self.name}
        if self.description:
            data["description"] = self.description
        data["model"] = {k: v for k, v in asdict(self.model).items() if v is not None and k not in COMMAND_LINE_ONLY}
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
        data.pop("version"), data.pop("name"), data.pop("description", None)
        model_contents = loading.contents(self.model.name)
        if model_contents:  # other weights under the same name are another model
            data["model"]["contents"] = model_contents
        defaults = Plan()  # written out, as the console writes a plan: the same plan, one hash
        data["plan"] = {"mode": defaults.mode, "phase": defaults.phase, **self.plan}
        # the flags were hashed before version 1 of the format; kept, so that stored runs keep their fingerprints
        data["model"].update({k: getattr(self.model, k) for k in COMMAND_LINE_ONLY})
        for key in PROBE_TABLES:
            if key in data:
                data[key].pop("batch_size", None)
                for name in getattr(getattr(self, key), "unhashed", list)():  # options newer than the stored runs
                    data[key].pop(name)
                if data[key].get("haystack", "generated") != "generated":  # a user's text: what it says now
                    data[key]["haystack_text"] = haystack.text_digest(data[key]["haystack"])
                if key == "mmlu" and data[key]["source"] not in NAMED_SOURCES:  # a folder: its files now
                    data[key]["source_files"] = folder_digest(Path(data[key]["source"]))
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


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _fits(value, hint) -> bool:
    """Whether a TOML value has the type a dataclass field declares (bool is no number here)."""
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint) if h is not type(None))
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _expected(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_PLURALS[typing.get_args(hint)[0]]}"
    if isinstance(hint, types.UnionType):
        return " or ".join(_expected(h) for h in typing.get_args(hint) if h is not type(None))
    return _NAMES[hint]


def _section(cls, data, section: str):
    if not isinstance(data, dict):
        raise LabError(f"[{section}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise LabError(f"[{section}]: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _fits(value, hints[key]):
            raise LabError(f"{section}.{key}: expected {_expected(hints[key])}, got {_shorten(repr(value))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _shorten(text: str, most: int = 60) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _model(data) -> ModelSpec:
    """The [model] table; remote code and pickles are the command line's to allow, never a preset's."""
    if isinstance(data, dict):
        for key, option in COMMAND_LINE_ONLY.items():
            if data.get(key, False) is not False:
                raise LabError(f"[model] {key} is not allowed in a preset; pass {option} on the command line")
        data = {k: v for k, v in data.items() if k not in COMMAND_LINE_ONLY}
    return _section(ModelSpec, data, "model")


def _check_version(data: dict) -> None:
    version = data.get("version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LabError(f"version: expected {VERSION}, got {_shorten(repr(version))}")
    if version > VERSION:
        raise LabError(f"preset format version {version} is newer than this lab reads ({VERSION}); upgrade lab")


def from_dict(data: dict) -> Preset:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise LabError(f"unknown preset key {sorted(unknown)[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    _check_version(data)
    plan = data.get("plan", {})
    if not isinstance(plan, dict):
        raise LabError("[plan] must be a table")
    Plan.from_dict(plan)  # everything that can be checked without the model
    needle = _section(NeedleSpec, data["needle"], "needle").validate() if "needle" in data else None
    mmlu = _section(MMLUSpec, data["mmlu"], "mmlu").validate() if "mmlu" in data else None
    heads = _section(HeadsSpec, data["heads"], "heads").validate() if "heads" in data else None
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise LabError(f"{key}: expected a string, got {_shorten(repr(data[key]))}")
    return Preset(name=data.get("name", "untitled"), description=data.get("description", ""),
                  model=_model(data.get("model", {})), plan=plan, needle=needle, mmlu=mmlu, heads=heads)


def parse(text: str, origin: str = "preset") -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LabError(f"{origin}: malformed TOML: {error}") from None
    return from_dict(data)


def resolve(name: str):
    """A preset file (a Path), or a builtin preset by name, with or without .toml (a resource)."""
    path = Path(name).expanduser()
    for candidate in (path, BUILTIN_PRESETS / name, BUILTIN_PRESETS / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    raise LabError(f"preset {name} not found (a .toml file, or one of: {', '.join(list_presets()) or 'none'})")


def load(name: str) -> Preset:
    path = resolve(name)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise LabError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise LabError(f"{path}: cannot read ({error.strerror or error})") from None
    return parse(text, str(path))


def is_builtin(path: str | Path) -> bool:
    """Whether `path` is one of lab's builtin preset files (shipped with the package, never written)."""
    return Path(path).expanduser().resolve().parent == Path(str(BUILTIN_PRESETS)).resolve()


def save(preset: Preset, path: str | Path) -> Path:
    path = Path(path).expanduser()
    if is_builtin(path):
        raise LabError(f"{path.name} is a builtin preset, which lab does not overwrite; save it under another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(preset.to_toml(), encoding="utf-8")
    except OSError as error:
        raise LabError(f"cannot write the preset {path}: {error.strerror or error}") from None
    return path


def list_presets() -> list[str]:
    """Names of the builtin presets (shipped in the package: lab/data/presets)."""
    return sorted(p.name[: -len(".toml")] for p in BUILTIN_PRESETS.iterdir() if p.name.endswith(".toml"))
