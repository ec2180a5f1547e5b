"""The direction of imports: cli and tui on top, then sweeps, session, runner, presets, probes, interventions,
models and store, fast at the bottom; no module imports one above it, and no import cycle (imports inside
functions count too)."""

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "lab"
LAYERS = [  # lowest first; a module may import its own layer and those below
    ("lab", "lab.errors", "lab.fast"),
    ("lab.models", "lab.store"),
    ("lab.interventions",),
    ("lab.probes",),
    ("lab.summary", "lab.presets"),
    ("lab.runner",),
    ("lab.session", "lab.bench", "lab.toy"),
    ("lab.sweeps",),
    ("lab.report", "lab.sweeps.report", "lab.cli", "lab.tui", "lab.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(LAB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((prefix for group in LAYERS for prefix in group if module == prefix or module.startswith(prefix + ".")),
               key=len)
    return next(i for i, group in enumerate(LAYERS) if best in group)


def lab_imports(path: Path, modules: set[str]) -> set[str]:
    """The lab modules `path` imports anywhere in its body (`from lab.x import y` counts lab.x.y when a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lab"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in LAB.rglob("*.py")}
    return {name: lab_imports(path, set(paths)) - {name} for name, path in paths.items()}


def test_no_module_imports_a_layer_above_it():
    upward = [f"{m} -> {i}" for m, imports in graph().items() for i in imports if layer(i) > layer(m)]
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    # a package's __init__ importing its own modules is how a package exposes them, not a cycle
    edges = {m: {i for i in imports if not m or not i.startswith(m + ".")} for m, imports in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []
