"""The wheel ships what lab needs at run time: builtin presets, toy models, toy data."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from lab import presets

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("lab/data/presets", "lab/toy/models", "lab/toy/data")


def _tracked(folder: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_presets_folder_is_the_packaged_one():
    assert (ROOT / "presets").resolve() == (ROOT / "lab" / "data" / "presets").resolve()
    assert Path(str(presets.BUILTIN_PRESETS)).resolve() == (ROOT / "lab" / "data" / "presets").resolve()
    assert len(presets.list_presets()) == len(_tracked("lab/data/presets")) >= 15


def test_wheel_ships_presets_toy_models_and_data(tmp_path):
    source = tmp_path / "src"  # a copy, so no build/ folder is left in (or reused from) the checkout
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", ".venv", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "whl"), str(source)], check=True, capture_output=True, env=env)
    wheel, = (tmp_path / "whl").glob("lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in SHIPPED:
        files = _tracked(folder)
        assert files and files <= names, (folder, sorted(files - names)[:5])
    assert not any(n.startswith(("presets/", "tests/")) for n in names)
