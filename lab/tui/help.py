"""Help: every binding with its id (remap keys with a keymap: binding id -> keys)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from lab.tui.keymap import key_text


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,f1,question_mark", "dismiss", "Close", id="help.close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > #help-box { width: 90%; height: 90%; border: round $accent; background: $surface; }
    """

    def __init__(self, bindings: list[Binding], keymap: dict[str, str]):
        """`keymap` (binding id -> keys) overrides the bindings' own keys: help shows the keys in force."""
        super().__init__()
        self.rows = [(key_text(keymap.get(b.id, b.key)), b.description, b.id or "", b.tooltip or "")
                     for b in bindings]

    def compose(self) -> ComposeResult:
        table = DataTable(id="help-box", cursor_type="row", zebra_stripes=True)
        table.add_columns("keys", "action", "binding id", "what it does")
        for row in self.rows:
            table.add_row(*row)
        yield table
        yield Static("Esc, q or F1 closes. Remap keys in ~/.config/lab/keymap.toml: binding-id = \"keys\"")
