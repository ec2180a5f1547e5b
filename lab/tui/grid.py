"""The layer and head grid: one row per decoder layer, drawn with Textual's Line API.

Cells are block switches (ATTN, SSM, MLP, MOE) and one cell per attention query head. Only the
visible rows are rendered, so 64 layers x 64 heads stays smooth (Textual's checkerboard example).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from lab.interventions import Plan
from lab.interventions.sites import Site, resolve
from lab.models.anatomy import Anatomy, Layer
from lab.tui.effects import effect_colour
from lab.tui.messages import CellToggled

LABEL_WIDTH = 18
BADGE = " k={k}/{heads}"  # sparsify: heads kept per token in an attention layer
BLOCK_LABELS = {"attention": "ATTN", "ssm": "SSM", "mlp": "MLP", "moe": "MOE"}
PLAIN = Style()  # every segment carries a style: textual's monochrome filter (NO_COLOR) needs one


@dataclass(frozen=True)
class Cell:
    x: int
    width: int
    kind: str
    head: int | None = None


def layer_label(layer: Layer) -> str:
    parts = []
    for block in layer.blocks:
        if block.kind == "attention":
            parts.append(f"attn w{block.window}" if block.window else "attn full")
        elif block.kind == "ssm":
            parts.append(block.flavour)
    return f"{layer.index:>3} {'+'.join(parts) or layer.layer_type}"[:LABEL_WIDTH - 1].ljust(LABEL_WIDTH)


def row_cells(layer: Layer) -> list[Cell]:
    cells, x = [], LABEL_WIDTH
    for block in layer.blocks:
        cells.append(Cell(x, 5, block.kind))
        x += 5
    x += 1
    attention = layer.block("attention")
    for head in range(attention.heads if attention else 0):
        cells.append(Cell(x, 2, "head", head))
        x += 2
    return cells


def heat(value: float) -> Color:
    """0 -> dark blue, 1 -> bright yellow."""
    v = max(0.0, min(1.0, value))
    return Color.from_rgb(int(30 + 225 * v), int(40 + 200 * v), int(120 * (1 - v) + 40))


class LayerGrid(ScrollView, can_focus=True):
    """Shows which blocks and heads a plan switches off; posts CellToggled."""

    COMPONENT_CLASSES = {"grid--label", "grid--on", "grid--off", "grid--head-on", "grid--head-off",
                         "grid--head-dim", "grid--cursor", "grid--header", "grid--badge"}
    DEFAULT_CSS = """
    LayerGrid { height: 1fr; }
    LayerGrid > .grid--label { color: $text-muted; }
    LayerGrid > .grid--header { color: $text-muted; text-style: bold; }
    LayerGrid > .grid--on { background: $success 40%; color: $text; }
    LayerGrid > .grid--off { background: $error 60%; color: $text; }
    LayerGrid > .grid--head-on { color: $success; }
    LayerGrid > .grid--head-off { color: $error; }
    LayerGrid > .grid--head-dim { color: $text-disabled; text-style: dim; }
    LayerGrid > .grid--badge { color: $warning; }
    LayerGrid > .grid--cursor { text-style: reverse bold; }
    """
    BINDINGS = [
        Binding("up,k", "move(-1, 0)", "Up", show=False, id="grid.up"),
        Binding("down,j", "move(1, 0)", "Down", show=False, id="grid.down"),
        Binding("left,h", "move(0, -1)", "Left", show=False, id="grid.left"),
        Binding("right,l", "move(0, 1)", "Right", show=False, id="grid.right"),
        Binding("space,enter", "toggle", "Toggle", tooltip="Switch the block or head under the cursor",
                id="grid.toggle"),
    ]
    cursor: reactive[tuple[int, int]] = reactive((0, 0), init=False)

    def __init__(self, anatomy: Anatomy, plan: Plan, **kwargs):
        super().__init__(**kwargs)
        self.anatomy, self.plan, self.resolved = anatomy, plan, resolve(plan, anatomy)
        self.rows = [row_cells(layer) for layer in anatomy.layers]
        self.labels = [layer_label(layer) for layer in anatomy.layers]
        self.overlay: dict[tuple[int, int], float] | None = None
        self.effects: dict[Site, float] = {}  # a sweep's effect map: difference to the base per block or head
        width = max((cells[-1].x + cells[-1].width for cells in self.rows if cells), default=LABEL_WIDTH)
        self.virtual_size = Size(width + len(BADGE.format(k=99, heads=99)), len(self.rows) + 1)
        self.header = self._header(width)

    def _header(self, width: int) -> str:
        """Column titles, with head indices above the head cells of the first attention layer."""
        heads = next((cells for cells in self.rows if any(c.kind == "head" for c in cells)), [])
        first_head = next((c.x for c in heads if c.kind == "head"), width)
        blocks = "blocks"[:first_head - LABEL_WIDTH - 1]  # a space before the head indices
        chars = list(" layer kind".ljust(LABEL_WIDTH) + blocks.ljust(width - LABEL_WIDTH))
        for cell in (c for c in heads if c.kind == "head"):
            index = str(cell.head)
            if len(index) == 1 or cell.head % 2 == 0:  # 10, 12, ...: every other one, so that they do not touch
                chars[cell.x:cell.x + len(index)] = index
        return "".join(chars)

    def set_plan(self, plan: Plan) -> None:
        self.plan, self.resolved = plan, resolve(plan, self.anatomy)
        self.refresh()

    def set_overlay(self, overlay: dict[tuple[int, int], float] | None) -> None:
        self.overlay = overlay
        self.refresh()

    def set_effects(self, effects: dict[Site, float]) -> None:
        self.effects = effects
        self.refresh()

    @property
    def current(self) -> tuple[int, Cell | None]:
        row, col = self.cursor
        cells = self.rows[row]
        return row, cells[min(col, len(cells) - 1)] if cells else None

    def action_move(self, rows: int, cols: int) -> None:
        row = max(0, min(len(self.rows) - 1, self.cursor[0] + rows))
        col = max(0, min(len(self.rows[row]) - 1, self.cursor[1] + cols))
        self.cursor = (row, col)

    def action_toggle(self) -> None:
        layer, cell = self.current
        if cell is not None:
            kind = "attention" if cell.kind == "head" else cell.kind
            self.post_message(CellToggled(layer, kind, cell.head))

    def watch_cursor(self, previous: tuple[int, int], cursor: tuple[int, int]) -> None:
        for row in {previous[0], cursor[0]}:
            self.refresh(Region(0, row + 1 - int(self.scroll_y), self.size.width, 1))
        self.scroll_to_region(Region(0, cursor[0] + 1, 1, 1), animate=False)
        _, cell = self.current
        if cell is not None:
            self.scroll_to(x=self._scroll_showing(cell), animate=False)

    def _scroll_showing(self, cell: Cell) -> int:
        """The horizontal scroll nearest the current one that shows the cell right of the fixed labels."""
        left, view = int(self.scroll_x), self.size.width - LABEL_WIDTH
        if cell.x - LABEL_WIDTH < left:
            return cell.x - LABEL_WIDTH
        return max(left, cell.x + cell.width - LABEL_WIDTH - view)

    def on_click(self, event) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        row = offset.y + int(self.scroll_y) - 1
        x = offset.x + int(self.scroll_x) if offset.x >= LABEL_WIDTH else offset.x
        if 0 <= row < len(self.rows):
            for col, cell in enumerate(self.rows[row]):
                if cell.x <= x < cell.x + cell.width:
                    self.cursor = (row, col)
                    self.action_toggle()
                    return

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        row = y + scroll_y - 1
        if y == 0:
            strip = Strip([Segment(self.header, self.get_component_rich_style("grid--header"))])
        elif 0 <= row < len(self.rows):
            strip = Strip(self._segments(row))
        else:
            return Strip.blank(self.size.width, PLAIN)
        labels = strip.crop(0, LABEL_WIDTH)  # the layer labels stay put while the cells scroll
        cells = strip.crop(LABEL_WIDTH + scroll_x, scroll_x + self.size.width)
        return Strip.join([labels, cells]).crop(0, self.size.width).extend_cell_length(self.size.width, PLAIN)

    def _segments(self, row: int) -> list[Segment]:
        """A layer's row: OFF is written with a symbol (×), not only in colour, so it reads in mono."""
        style = self.get_component_rich_style
        segments = [Segment(self.labels[row], style("grid--label"))]
        x = LABEL_WIDTH
        cursor_row, cursor_col = self.cursor
        attention_off = self.resolved.is_off(Site(row, "attention"))
        for col, cell in enumerate(self.rows[row]):
            if cell.x > x:
                segments.append(Segment(" " * (cell.x - x), PLAIN))
            if cell.kind == "head":
                off = self.resolved.is_off(Site(row, "attention", cell.head))
                text = "× " if off else "● "
                cell_style = style("grid--head-dim" if attention_off else "grid--head-off" if off else "grid--head-on")
            else:
                off = self.resolved.is_off(Site(row, cell.kind))
                label = BLOCK_LABELS[cell.kind]
                text = ("×" + label[:3] if off else label.center(4)) + " "
                cell_style = style("grid--off" if off else "grid--on")
            site = Site(row, "attention" if cell.kind == "head" else cell.kind, cell.head)
            if site in self.effects:
                cell_style = cell_style + Style(bgcolor=effect_colour(self.effects[site]))
            if self.overlay is not None and (row, cell.head) in self.overlay:  # chosen last: over a sweep's map
                cell_style = cell_style + Style(bgcolor=heat(self.overlay[(row, cell.head)]))
            if (row, col) == (cursor_row, cursor_col) and self.has_focus:
                cell_style = cell_style + style("grid--cursor")
            segments.append(Segment(text[: cell.width - 1], cell_style))
            segments.append(Segment(" ", PLAIN))
            x = cell.x + cell.width
        attention = self.anatomy.layers[row].block("attention")
        if self.plan.sparsify is not None and attention is not None and attention.heads:
            segments.append(Segment(BADGE.format(k=min(self.plan.sparsify.k, attention.heads), heads=attention.heads),
                                    style("grid--badge")))
        return segments
