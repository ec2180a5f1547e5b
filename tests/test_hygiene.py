import re
import subprocess
import sys
from pathlib import Path

from lab import presets

ROOT = Path(__file__).resolve().parent.parent


def test_core_never_imports_textual():
    code = ("import sys, lab.cli, lab.runner, lab.models, lab.interventions, lab.probes.needle, lab.probes.mmlu, "
            "lab.probes.heads, lab.store, lab.presets; sys.exit('textual' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    for path in (ROOT / "lab").rglob("*.py"):
        if "tui" not in path.relative_to(ROOT / "lab").parts:
            assert not re.search(r"^\s*(from|import)\s+textual", path.read_text(), re.M), path


def test_shipped_presets_parse():
    names = presets.list_presets()
    assert len(names) >= 15
    for name in names:
        preset = presets.load(name)
        assert preset.needle or preset.mmlu
        assert presets.parse(preset.to_toml()) == preset
