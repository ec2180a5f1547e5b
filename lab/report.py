"""Rich tables for the CLI (no textual here)."""

from __future__ import annotations

from rich.table import Table

from lab.models import Loaded


def anatomy_table(loaded: Loaded) -> Table:
    anatomy = loaded.anatomy
    title = (f"{loaded.spec.name}: {anatomy.architecture}, {anatomy.num_layers} layers, "
             f"{anatomy.total_heads} attention heads, {loaded.num_params / 1e6:.2f} M parameters")
    table = Table(title=title, title_justify="left")
    for name in ("layer", "kind", "flavour", "heads", "kv", "head dim", "window", "path"):
        table.add_column(name, justify="right" if name in ("layer", "heads", "kv", "head dim", "window") else "left")
    for layer in anatomy.layers:
        for i, block in enumerate(layer.blocks):
            heads = str(block.heads) if block.heads else ""
            table.add_row(str(layer.index) if i == 0 else "", block.kind, block.flavour + (
                f" ({block.experts} experts)" if block.experts else ""), heads,
                str(block.kv_heads) if block.heads else "", str(block.head_dim) if block.heads else "",
                str(block.window or ""), block.path)
    if anatomy.notes:
        table.caption = "; ".join(anatomy.notes)
    return table
