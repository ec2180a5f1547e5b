"""Model notes the console has shown, remembered per model in the user's data folder, so each appears once."""

from __future__ import annotations

import json
from pathlib import Path

from lab.store import default_path


def seen_path() -> Path:
    """Beside the results database: ~/.local/share/lab/seen-notes.json (or $LAB_DB's folder)."""
    return default_path().parent / "seen-notes.json"


def unseen(model: str, notes: list[str], path: Path) -> list[str]:
    """The notes not shown for `model` yet, now remembered as shown. A damaged file counts as empty and
    one that cannot be written is left as it is: the notes then show again, never an error."""
    try:
        seen = json.loads(path.read_text())
        if not isinstance(seen, dict):
            seen = {}
    except (OSError, ValueError):
        seen = {}
    shown = seen.get(model) if isinstance(seen.get(model), list) else []
    new = [note for note in notes if note not in shown]
    if new:
        seen[model] = shown + new
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(seen, indent=1))
        except OSError:
            pass
    return new
