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


def bench_tables(results: dict) -> list[Table]:
    table = Table(title=f"lab bench: {results['model']} ({results['parameters'] / 1e6:.1f} M parameters, "
                        f"{results['dtype']}) on {results['device']}", title_justify="left")
    table.add_column("measure")
    table.add_column("lab", justify="right")
    table.add_column("reference", justify="right")
    table.add_column("ratio", justify="right")
    n, m, p, f = results["needle_grid"], results["mmlu"], results["plan_overhead"], results["prefill"]
    table.add_row(f"needle grid, {n['prompts']} prompts x {n['new_tokens']} tokens", f"{n['lab_s']:.2f} s",
                  f"{n['reference_s']:.2f} s ({n['reference_measured_prompts']} timed)", f"{n['speedup']:.1f}x")
    table.add_row(f"MMLU 5-shot, {m['questions']} questions", f"{m['lab_qps']:.1f} q/s",
                  f"{m['per_choice_qps']:.1f} q/s", f"{m['speedup']:.1f}x")
    for plan in p:
        shape = f"{plan['batch']} x {plan['length']} tokens"
        table.add_row(f"plan overhead, heads off ({shape})", f"{100 * plan['heads_off_overhead']:+.1f} %", "", "")
        table.add_row(f"plan overhead, heads off in prefill phase: hooks ({shape})",
                      f"{100 * plan['heads_off_hooked_overhead']:+.1f} %", "", "")
        table.add_row(f"plan overhead, sparsify vs eager ({shape})", f"{100 * plan['sparsify_overhead_vs_eager']:+.1f} %",
                      "", "")
    peak = f", {100 * f['fraction_of_bf16_peak']:.0f} % of bf16 peak" if "fraction_of_bf16_peak" in f else ""
    table.add_row(f"prefill {f['batch']} x {f['length']} tokens", f"{f['tokens_per_s']:,} tok/s",
                  f"{f['tflops']} TFLOP/s{peak}", "")
    return [table]
