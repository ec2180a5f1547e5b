"""The command line as people read it: progress per probe, tables at 80 columns and piped, help on every option,
bench headers, and presets that `lab heads --write` hands to `lab run`."""

import argparse
import io
import json
import re
import sys

import pytest
from rich.console import Console
from rich.progress import Progress

from lab import presets, report
from lab.cli import build_parser, main
from lab.store import Store

from conftest import DEMO_PRESET

PRESET = DEMO_PRESET


def rendered(*renderables, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return console.file.getvalue()


# 1. lab run: one bar per probe, each in its own units

def test_run_progress_has_one_bar_per_probe_in_its_own_units(tmp_path, monkeypatch):
    bars: list[Progress] = []

    def progress_bar():
        bars.append(real(console=Console(file=io.StringIO(), width=80)))
        return bars[-1]

    real = report.progress_bar
    monkeypatch.setattr(report, "progress_bar", progress_bar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    (tmp_path / "p.toml").write_text(PRESET)
    assert main(["run", str(tmp_path / "p.toml"), "--db", str(tmp_path / "r.sqlite")]) == 0
    [bar] = bars
    assert [(t.description, t.completed, t.total) for t in bar.tasks] == [("needle", 6, 6), ("mmlu", 8, 8)]
    shown = rendered(bar.make_tasks_table(bar.tasks))
    assert "6/6 trials" in shown and "8/8 questions" in shown


def test_run_without_a_terminal_names_each_probes_units(tmp_path, capsys):
    (tmp_path / "p.toml").write_text(PRESET)
    assert main(["run", str(tmp_path / "p.toml"), "--db", str(tmp_path / "r.sqlite")]) == 0
    assert "needle 0/6 trials, mmlu 0/8 questions already done" in capsys.readouterr().err


# 2. titles at 80 columns; piped output keeps whole paths

def test_summary_titles_do_not_wrap_at_80_columns():
    summary = {"needle": {"accuracy": 1.0, "score": 1.0, "trials": 80, "by_length": {"256": 1.0, "512": 0.5}},
               "mmlu": {"accuracy": 0.9, "questions": 200, "by_category": {"STEM": 0.5}}}
    lines = rendered(*report.summary_tables(summary)).splitlines()
    assert "needle: accuracy 100.0 %, score 100.0 %, 80 trials" in [line.strip() for line in lines]
    assert "mmlu: accuracy 90.0 %, 200 questions" in [line.strip() for line in lines]


def test_inspect_piped_shows_whole_module_paths(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # a width asked for explicitly is honoured, piped or not
    assert main(["inspect", "toy-jamba"]) == 0  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    for path in ("model.layers.1.feed_forward", "model.layers.2.self_attn", "model.layers.0.mamba"):
        assert path in out
    assert "toy-jamba: jamba, 6 layers" in out.splitlines()[0]
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["inspect", "toy-jamba"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 60


# 3. lab bench: every figure under the path it describes

BENCH = {"model": "random:jamba", "parameters": 2e6, "dtype": "float32", "device": "cpu",
         "needle_grid": {"prompts": 12, "new_tokens": 40, "lab_s": 1.5, "reference_s": 6.0,
                         "reference_measured_prompts": 4, "speedup": 4.0},
         "mmlu": {"questions": 16, "lab_qps": 20.0, "per_choice_qps": 5.0, "speedup": 4.0},
         "plan_overhead": [{"batch": 1, "length": 1024, "heads_off_overhead": 0.01, "heads_off_hooked_overhead": 0.02,
                            "sparsify_overhead_vs_eager": 0.3, "sparsify_overhead_vs_default": 0.5,
                            "needle_attention_overhead_vs_default": 0.25}],
         "prefill": {"batch": 1, "length": 1024, "tokens_per_s": 12345, "tflops": 0.12}}


def headers(table) -> list[str]:
    return [str(column.header) for column in table.columns]


def cells(table, row: int) -> list[str]:
    return [str(column._cells[row]) for column in table.columns]


def test_bench_columns_name_the_path_their_figures_describe():
    header, speed, plans, prefill = report.bench_tables(BENCH)
    assert str(header) == "lab bench: random:jamba (2.0 M parameters, float32) on cpu"
    assert headers(speed) == ["measure", "lab path", "reference path", "lab speedup"]
    assert cells(speed, 0)[1:] == ["1.50 s", "6.00 s", "4.0x"]
    assert cells(speed, 1)[1:] == ["20.0 q/s", "5.0 q/s", "4.0x"]
    assert str(speed.caption).startswith("speedup: reference time / lab time")
    assert headers(plans) == ["plan, 1 x 1024 tokens", "time vs no plan", "vs eager, no plan"]
    assert [cells(plans, i) for i in range(4)] == [["heads off (folded)", "+1.0 %", ""],
                                                   ["heads off, prefill only (hooks)", "+2.0 %", ""],
                                                   ["sparsify", "+50.0 %", "+30.0 %"],
                                                   ["needle attention, omit", "+25.0 %", ""]]
    assert headers(prefill) == ["prefill (lab path)", "tokens/s", "TFLOP/s", "of bf16 peak"]
    assert cells(prefill, 0) == ["1 x 1024 tokens", "12,345", "0.12", ""]
    assert all(max(map(len, rendered(table).splitlines())) <= 80 for table in (speed, plans, prefill))


def test_bench_skipped_rows_stay_in_their_table():
    results = {**BENCH, "mmlu": {"skipped": "out of memory at 16 questions"}, "prefill": {"skipped": "failed"}}
    _, speed, _, prefill = report.bench_tables(results)
    assert cells(speed, 1)[:2] == ["MMLU 5-shot", "skipped: out of memory at 16 questions"]
    assert cells(prefill, 0)[:2] == ["prefill", "skipped: failed"]


def test_bench_prints_only_the_tables_of_the_rows_measured():
    header, prefill = report.bench_tables({key: BENCH[key] for key in ("model", "parameters", "dtype", "device",
                                                                        "prefill")})
    assert str(header).startswith("lab bench: random:jamba") and headers(prefill)[0] == "prefill (lab path)"


# 4. help text on every option of every subcommand

def parsers(parser: argparse.ArgumentParser, name: str = "lab"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                yield from parsers(subparser, f"{name} {command}")


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert missing == []


# 7. help at 80 columns

@pytest.mark.parametrize("command", [name.split()[1:] for name, _ in parsers(build_parser())])
def test_help_reads_well_at_80_columns(command, capsys, monkeypatch):
    """Each --help says what the command does, fits 80 columns, and names option values in short words
    (a long metavar such as ATTN_IMPLEMENTATION pushed every help text of its command to a line of its own)."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: lab") and max(map(len, out.splitlines())) <= 80
    assert max(map(len, re.findall(r"\b[A-Z][A-Z_]+\b", out.split("\n\n")[0]))) <= 10
    summary = " ".join(out.split("\n\n")[1].split())
    assert summary == (" ".join(build_parser().description.split()) if not command else next(
        choice.help for choice in parsers_action(build_parser())._choices_actions if choice.dest == command[0]))


def parsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_top_help_names_every_command_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in parsers_action(build_parser()).choices:
        assert f"\n    {command} " in out
    assert "lab heads toy-recurrentgemma --keep 15% --write keep15.toml" in out


# 5. lab heads --write: a preset that lab run runs

def test_heads_write_gives_a_preset_that_lab_run_runs(tmp_path, capsys):
    keep, db = tmp_path / "keep15.toml", tmp_path / "r.sqlite"
    assert main(["heads", "toy-recurrentgemma", "--keep", "15%", "--lengths", "256", "--depths", "50",
                 "--trials", "2", "--max-new-tokens", "8", "--db", str(db), "--json", "--write", str(keep)]) == 0
    kept = json.loads(capsys.readouterr().out)["keep"]
    preset = presets.load(str(keep))
    assert preset.needle is not None and preset.needle.lengths == (256,) and preset.needle.depths == (50,)
    assert main(["run", str(keep), "--db", str(db), "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run"]
    with Store(db, readonly=True) as store:
        assert len(store.trials(run_id, "needle")) == 2
        assert json.loads(store.run(run_id)["plan"])["keep_heads"] == kept
