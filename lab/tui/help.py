"""Help: every binding with its id (remap keys with a keymap: binding id -> keys)."""

from __future__ import annotations

import textwrap

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
        self.rows = [(key_text(keymap.get(b.id, b.key)), b.id or "",
                      f"{b.description}: {b.tooltip}" if b.tooltip else b.description) for b in bindings]

    def compose(self) -> ComposeResult:
        table = DataTable(id="help-box", cursor_type="row", zebra_stripes=True)
        table.add_columns(*HEADERS)
        yield table
        yield Static("Esc, q or F1 closes. Remap keys in ~/.config/lab/keymap.toml: binding-id = \"keys\"")

    def on_resize(self) -> None:
        self.call_after_refresh(self._fill)

    def _fill(self) -> None:
        """The rows, "what it does" (the action and its tooltip) wrapped to the width the other columns leave (at 80
        columns it was cut to a few characters)."""
        table = self.query_one(DataTable)
        fixed = sum(max(len(row[i]) for row in [*self.rows, HEADERS]) + 2 for i in range(2))  # + cell padding
        room = max(16, table.scrollable_content_region.width - fixed - 3)
        table.clear()
        for keys, binding_id, what in self.rows:
            table.add_row(keys, binding_id, "\n".join(textwrap.wrap(what, room)), height=None)


HEADERS = ("keys", "binding id", "what it does")
