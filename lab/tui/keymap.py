"""The user's keymap (~/.config/lab/keymap.toml: binding id = "keys") and keys as people write them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from textual.keys import key_to_character

from lab.errors import LabError

SPOKEN = {"space": "space", "enter": "enter", "escape": "Esc", "tab": "Tab", "minus": "-", "plus": "+"}


def flatten(table: dict, prefix: str = "") -> dict:
    """TOML reads `probe.needle = "g"` as {"probe": {"needle": "g"}}: back to {"probe.needle": "g"}."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def read_keymap(path: Path, defaults: dict[str, str]) -> dict[str, str]:
    """{binding id: keys} from `path`, over `defaults` ({binding id: keys}); LabError (one line) when it is not
    TOML, not strings, names no binding or gives a key two bindings."""
    try:
        keymap = flatten(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as error:
        raise LabError(f"keymap {path}: {error}") from None
    for binding_id, keys in keymap.items():
        if binding_id not in defaults:
            raise LabError(f"keymap {path}: no binding has the id {binding_id} (F1 lists them)")
        if not isinstance(keys, str) or not keys.strip():
            raise LabError(f"keymap {path}: {binding_id} must be a string of keys, e.g. \"g\" or \"ctrl+g,f5\"")
    owner: dict[str, str] = {}
    for binding_id, keys in {**defaults, **keymap}.items():
        for key in (k.strip() for k in keys.split(",") if k.strip()):
            if key in owner:
                raise LabError(f"keymap {path}: {key_text(key)} would be both {owner[key]} and {binding_id} "
                               "(F1 lists the keys in use)")
            owner[key] = binding_id
    return keymap


def key_text(keys: str) -> str:
    """'f1,question_mark' -> 'F1 ?'; 'minus' -> '-'; 'space,enter' -> 'space enter'."""
    def one(key: str) -> str:
        if key in SPOKEN:
            return SPOKEN[key]
        if key[:1] == "f" and key[1:].isdigit():
            return key.upper()
        return key if "+" in key else key_to_character(key) or key
    return " ".join(one(k.strip()) for k in keys.split(",") if k.strip())
