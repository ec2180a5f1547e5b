"""Rich tables and progress for the CLI."""

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


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def summary_tables(summary: dict) -> list[Table]:
    tables = []
    if "needle" in summary:
        s = summary["needle"]
        table = Table(title=f"needle: accuracy {_pct(s['accuracy'])}, score {_pct(s['score'])}, {s['trials']} trials",
                      title_justify="left")
        table.add_column("context length", justify="right")
        table.add_column("accuracy", justify="right")
        for length, acc in s["by_length"].items():
            table.add_row(length, _pct(acc))
        tables.append(table)
    if "mmlu" in summary:
        s = summary["mmlu"]
        table = Table(title=f"mmlu: accuracy {_pct(s['accuracy'])}, {s['questions']} questions", title_justify="left")
        table.add_column("category")
        table.add_column("accuracy", justify="right")
        for name, acc in s["by_category"].items():
            table.add_row(name, _pct(acc))
        tables.append(table)
    return tables


def runs_table(runs: list[dict]) -> Table:
    import time

    table = Table(title="runs", title_justify="left")
    for name in ("id", "name", "model", "status", "trials", "started"):
        table.add_column(name, justify="right" if name in ("id", "trials") else "left")
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started"]))
        table.add_row(str(run["id"]), run["name"], run["model"], run["status"], str(run["trials"]), started)
    return table


def heads_table(ranked: list, score: str, keep: set, top: int) -> Table:
    table = Table(title=f"heads by {score}" + (f", {len(keep)} kept" if keep else ""), title_justify="left")
    for name in ("rank", "layer", "head", score, "keep"):
        table.add_column(name, justify="right")
    for rank, ((layer, head), value) in enumerate(ranked[:top], 1):
        table.add_row(str(rank), str(layer), str(head), f"{value:.4f}", "yes" if (layer, head) in keep else "")
    return table
