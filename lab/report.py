"""Rich tables and progress for the CLI.

Rich parses a str cell or title as markup ("[bold]"), so user text (run names, model names, paths,
categories) breaks it or changes how it looks: every cell and title here is a plain Text.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from lab.models import Loaded

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def text(value) -> Text:
    """User text as plain text: never markup, and control characters (a terminal escape in a preset name
    could retitle or clear the terminal) shown as \\xNN instead of sent."""
    return Text(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))


def _table(title: str, columns: dict[str, str]) -> Table:
    """A table titled `title` with columns {header: justify}, all as plain text; at least as wide as its title,
    so that a title wraps only where the terminal is narrower than it."""
    title = text(title)
    table = Table(title=title, title_justify="left", min_width=title.cell_len)
    for header, justify in columns.items():
        table.add_column(text(header), justify=justify, overflow="fold")  # long names wrap, never cut
    return table


def _row(table: Table, *cells) -> None:
    table.add_row(*(text(cell) for cell in cells))


def anatomy_table(loaded: Loaded) -> Table:
    anatomy = loaded.anatomy
    title = (f"{loaded.spec.name}: {anatomy.architecture}, {anatomy.num_layers} layers, "
             f"{anatomy.total_heads} attention heads, {loaded.num_params / 1e6:.2f} M parameters")
    table = _table(title, {name: "right" if name in ("layer", "heads", "kv", "head dim", "window") else "left"
                           for name in ("layer", "kind", "flavour", "heads", "kv", "head dim", "window", "path")})
    for layer in anatomy.layers:
        for i, block in enumerate(layer.blocks):
            heads = str(block.heads) if block.heads else ""
            _row(table, str(layer.index) if i == 0 else "", block.kind, block.flavour + (
                f" ({block.experts} experts)" if block.experts else ""), heads,
                str(block.kv_heads) if block.heads else "", str(block.head_dim) if block.heads else "",
                str(block.window or ""), block.path)
    if anatomy.notes:
        table.caption = text("; ".join(anatomy.notes))
    return table


UNITS = {"mmlu": "questions"}  # what a probe counts; every other probe counts trials


def unit(probe: str) -> str:
    return UNITS.get(probe, "trials")


class CountColumn(ProgressColumn):
    """Done of total ("12/80 trials"), in the task's `unit` field where it has one."""

    def render(self, task) -> Text:
        total = "?" if task.total is None else f"{task.total:g}"
        return Text(f"{task.completed:g}/{total} {task.fields.get('unit', '')}".rstrip())


def progress_bar(console: Console | None = None) -> Progress:
    """A transient progress display on stderr (or `console`): description, bar, CountColumn, time left.
    Descriptions are markup: escape user text."""
    return Progress(TextColumn("{task.description}"), BarColumn(), CountColumn(), TimeRemainingColumn(),
                    console=console or Console(stderr=True), transient=True)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _accuracy_table(title: str, key: str, justify: str, accuracy: dict[str, float]) -> Table:
    table = _table(title, {key: justify, "accuracy": "right"})
    for name, acc in accuracy.items():
        _row(table, name, _pct(acc))
    return table


def summary_tables(summary: dict) -> list[Table]:
    tables = []
    if "needle" in summary:
        s = summary["needle"]
        tables.append(_accuracy_table(f"needle: accuracy {_pct(s['accuracy'])}, score {_pct(s['score'])}, "
                                      f"{s['trials']} trials", "context length", "right", s["by_length"]))
    if "mmlu" in summary:
        s = summary["mmlu"]
        tables.append(_accuracy_table(f"mmlu: accuracy {_pct(s['accuracy'])}, {s['questions']} questions",
                                      "category", "left", s["by_category"]))
    if "heads" in summary:
        from lab.probes.heads import ranking, scores

        s = summary["heads"]
        table = heads_table(ranking(scores(s), "retrieval"), "retrieval", set(), 10)
        table.caption = text(f"{s['recalled']} of {s['trials']} trials recalled the needle (retrieval counts "
                             "only those)")
        tables.append(table)
    return tables


DROP_FIRST = ("probes", "name", "started", "trials", "model", "status")  # when a terminal is too narrow
WRAPPED = {"plan": 24, "model": 24}  # columns rich wraps: counted this wide at most when columns are dropped


def runs_table(runs: list[dict], summaries: dict[int, dict], path, width: int = 250) -> Table:
    """Runs as RUN_COLUMNS; `summaries`: run id -> summarize() of its trials. Columns that do not fit in
    `width` are left out, least useful first (a model's name is wrapped, not cut)."""
    from lab.summary import RUN_COLUMNS, run_cells

    rows = [run_cells(run, summaries[run["id"]]) for run in runs]
    keep = list(RUN_COLUMNS)

    def needed(name: str) -> int:
        i = RUN_COLUMNS.index(name)
        return 3 + min(WRAPPED.get(name, width), max([len(name)] + [len(row[i]) for row in rows]))
    for name in DROP_FIRST:
        if sum(map(needed, keep)) + 1 <= width:
            break
        keep.remove(name)
    table = _table(f"runs in {path}", {name: "right" if name in ("id", "needle", "MMLU", "trials") else "left"
                                       for name in keep})
    for row in rows:
        _row(table, *(cell for name, cell in zip(RUN_COLUMNS, row) if name in keep))
    return table


def heads_table(ranked: list, score: str, keep: set, top: int) -> Table:
    table = _table(f"heads by {score}" + (f", {len(keep)} kept" if keep else ""),
                   dict.fromkeys(("rank", "layer", "head", score, "keep"), "right"))
    for rank, ((layer, head), value) in enumerate(ranked[:top], 1):
        _row(table, rank, layer, head, f"{value:.4f}", "yes" if (layer, head) in keep else "")
    return table


def bench_tables(results: dict) -> list:
    """A header line, then a table per measure present, each figure under the path it describes: lab's probe
    paths against the reference paths (the speedup is the reference's time over lab's), a plan's overhead on a
    forward pass, prefill speed."""
    active = results.get("active_parameters", results["parameters"])
    experts = f", {active / 1e6:.1f} M active per token" if active < 0.9 * results["parameters"] else ""
    header = text(f"lab bench: {results['model']} ({results['parameters'] / 1e6:.1f} M parameters{experts}, "
                  f"{results['dtype']}) on {results['device']}")
    speed = [_speed_table(results)] if {"needle_grid", "mmlu"} & set(results) else []
    shared = [_shared_table(results["needle_grid_shared"])] if "needle_grid_shared" in results else []
    prefill = [_prefill_table(results["prefill"])] if "prefill" in results else []
    return [header, *speed, *shared, *map(_plan_table, results.get("plan_overhead", [])), *prefill]


def _shared_table(n: dict) -> Table:
    """The needle grid as the paper builds it (one haystack cut to every prompt): lab's path sharing it, and
    with every prompt prefilled whole."""
    table = _table("needle grid, one haystack per trial (the paper's protocol)",
                   {"measure": "left", "shared trunk": "right", "whole prompts": "right", "tokens shared": "right"})
    if not _skipped(table, "needle, one haystack", n):
        _row(table, f"needle, {n['prompts']} prompts x {n['new_tokens']} tokens", _seconds(n, "lab"),
             _seconds(n, "whole_prompts"), f"{100 * n['shared_tokens']:.0f} %")
    return table


def _speed_table(results: dict) -> Table:
    table = _table("lab against the reference paths", {"measure": "left", "lab path": "right",
                                                        "reference path": "right", "lab speedup": "right"})
    notes = []
    n = results.get("needle_grid")
    if n is not None and not _skipped(table, "needle grid", n):
        timed = n["reference_s"] is not None
        _row(table, f"needle, {n['prompts']} prompts x {n['new_tokens']} tokens", _seconds(n, "lab"),
             f"{n['reference_s']:.2f} s" if timed else "not timed", f"{n['speedup']:.1f}x" if timed else "")
        if timed:
            notes.append(f"needle reference: generate(), one prompt at a time ({n['reference_measured_prompts']} "
                         "timed, scaled to the grid)")
    m = results.get("mmlu")
    if m is not None and not _skipped(table, "MMLU 5-shot", m):
        timed = m["per_choice_qps"] is not None
        spread = f" ({m['lab_qps_range'][0]:.1f}-{m['lab_qps_range'][1]:.1f})" if "lab_qps_range" in m else ""
        _row(table, f"MMLU 5-shot, {m['questions']} questions", f"{m['lab_qps']:.1f} q/s{spread}",
             f"{m['per_choice_qps']:.1f} q/s" if timed else "not timed", f"{m['speedup']:.1f}x" if timed else "")
        if timed:
            notes.append("MMLU reference: one forward per choice")
    table.caption = text("; ".join(["speedup: reference time / lab time", *notes]))
    table.caption_justify = "left"
    return table


def _seconds(row: dict, key: str) -> str:
    """A timed path's seconds: the median, and the range where several passes were timed."""
    spread = row.get(f"{key}_range_s")
    return f"{row[f'{key}_s']:.2f} s" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def _skipped(table: Table, label: str, row: dict) -> bool:
    """Add a row saying why a measure was skipped, if it was."""
    if "skipped" in row:
        _row(table, label, f"skipped: {row['skipped']}", *[""] * (len(table.columns) - 2))
    return "skipped" in row


def _plan_table(plan: dict) -> Table:
    """A forward pass under each plan against the same pass without one (lab's path both times)."""
    shape = f"{plan['batch']} x {plan['length']} tokens" if "batch" in plan else "a forward pass"
    table = _table("plan overhead (lab path)", {f"plan, {shape}": "left", "time vs no plan": "right",
                                                "vs eager, no plan": "right"})
    if not _skipped(table, "plan overhead", plan):
        def pct(key: str) -> str:
            return "eager out of memory" if plan[key] is None else f"{100 * plan[key]:+.1f} %"
        _row(table, "heads off (folded)", pct("heads_off_overhead"), "")
        _row(table, "heads off, prefill only (hooks)", pct("heads_off_hooked_overhead"), "")
        _row(table, "sparsify", pct("sparsify_overhead_vs_default"), pct("sparsify_overhead_vs_eager"))
        if "needle_attention_overhead_vs_default" in plan:
            _row(table, "needle attention, omit", pct("needle_attention_overhead_vs_default"), "")
    return table


def _prefill_table(f: dict) -> Table:
    table = _table("prefill", {"prefill (lab path)": "left", "tokens/s": "right", "TFLOP/s": "right",
                               "of bf16 peak": "right"})
    if not _skipped(table, "prefill", f):
        peak = f"{100 * f['fraction_of_bf16_peak']:.0f} %" if "fraction_of_bf16_peak" in f else ""
        _row(table, f"{f['batch']} x {f['length']} tokens", f"{f['tokens_per_s']:,}", f"{f['tflops']}", peak)
    return table
