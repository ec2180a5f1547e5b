"""Sweeps: conditions from an axis, runs linked by a sweep id, resume, Wilson intervals, the CLI."""

import csv
import io
import json
from dataclasses import replace

import pytest
from rich.console import Console

from lab import presets, sweeps
from lab.cli import main
from lab.errors import LabError
from lab.interventions import Plan
from lab.models import ModelSpec
from lab.probes.heads import keep_set
from lab.probes.mmlu import MMLUSpec
from lab.probes.needle import NeedleSpec
from lab.session import Session
from lab.store import Store
from lab.sweeps import Options, conditions
from lab.sweeps.report import drive, sweep_table, sweeps_table, write_csv
from lab.sweeps.stats import accuracy, compared, wilson

from conftest import tiny

NEEDLE = NeedleSpec(task="passkey", lengths=(300,), depths=(0, 100), mode="fast", max_new_tokens=6, batch_size=2)
MMLU = MMLUSpec(source="toy", limit=1, shots=1)


def rg_preset(plan=None, **changes) -> presets.Preset:
    """random:recurrent_gemma: attention in layers 2 and 5, 4 query heads sharing 1 KV head (fast on a CPU)."""
    return presets.Preset(name="demo", model=ModelSpec("random:recurrent_gemma"), plan=plan or {},
                          **{"needle": NEEDLE, **changes})


def sweep(preset, store, session=None, **options):
    """Run a sweep to its end; returns (the SweepFinished event, every event)."""
    session = session or Session(tiny(preset.model.name.removeprefix("random:")))
    events = list(sweeps.run(preset, Options(**options), session, store))
    return events[-1], events


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("lab: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# 1. the Wilson interval and the comparison with the base

def test_wilson_interval_matches_known_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson(1, 1000)[0] > 0


def test_accuracy_counts_exact_for_needle_and_correct_for_mmlu():
    needle = accuracy([{"exact": 1.0, "score": 0.2}, {"exact": 0.0, "score": 0.9}], "needle")
    mmlu = accuracy([{"correct": 1}, {"correct": 1}, {"correct": 0}, {"correct": 1}], "mmlu")
    assert needle["accuracy"] == 0.5 and needle["trials"] == 2
    assert mmlu["accuracy"] == 0.75 and mmlu["ci95"] == [round(x, 4) for x in wilson(3, 4)]
    assert accuracy([], "needle") is None
    worse = compared({"accuracy": 0.0, "ci95": [0.0, 0.28]}, {"accuracy": 1.0})
    assert worse["delta"] == -1.0 and worse["excludes_base"]
    assert compared({"accuracy": 0.9, "ci95": [0.6, 0.98]}, {"accuracy": 0.95})["excludes_base"] is False


# 2. conditions: the preset's plan plus one change per condition

BASE = {"mode": "zero", "phase": "generation", "off": [{"kind": "mlp", "layers": [0]}]}


def test_block_axes_switch_each_block_off_alone_on_top_of_the_preset_plan():
    anatomy = tiny("recurrent_gemma").anatomy
    found = conditions(Options("attention-layers"), anatomy, BASE)
    assert [c.label for c in found] == ["base", "L2.attn", "L5.attn"]
    assert [c.value for c in found] == [None, 2, 5]
    assert found[0].plan == BASE
    assert found[1].plan["off"] == BASE["off"] + [{"kind": "attention", "layers": [2]}]
    assert all(c.plan["phase"] == "generation" for c in found)
    ssm = conditions(Options("ssm-layers", layers=(4, 0)), anatomy, {})
    assert [c.value for c in ssm] == [None, 0, 4]
    assert Plan.from_dict(ssm[2].plan, anatomy).blocks_off(anatomy) == [(4, "ssm")]
    assert [c.value for c in conditions(Options("mlp-layers"), anatomy, {})][1:] == list(range(6))


def test_heads_and_kv_heads_axes():
    anatomy = tiny("recurrent_gemma").anatomy  # attention in layers 2 and 5, 4 query heads, 1 KV head
    heads = conditions(Options("heads", layers=(5,)), anatomy, BASE)
    assert [c.label for c in heads][1:] == ["L5.attn.h0", "L5.attn.h1", "L5.attn.h2", "L5.attn.h3"]
    assert heads[2].value == [5, 1] and heads[2].plan["heads_off"] == [[5, 1]]
    assert len(conditions(Options("heads"), anatomy, {})) == 1 + 8
    jamba = tiny("jamba").anatomy  # attention in layer 2: 4 query heads in 2 KV groups
    kv = conditions(Options("kv-heads"), jamba, {"heads_off": [[2, 3]]})
    assert [c.label for c in kv][1:] == ["L2.attn.kv0", "L2.attn.kv1"]
    assert Plan.from_dict(kv[1].plan, jamba).heads_removed(jamba) == {2: {0, 1, 3}}


def test_k_axis_replaces_the_preset_sparsify_and_keeps_its_metric():
    anatomy = tiny("jamba").anatomy
    base = {"phase": "generation", "sparsify": {"k": 1, "metric": "l2"}}
    found = conditions(Options("k"), anatomy, base)
    assert [c.value for c in found][1:] == [0, 1, 2, 3, 4]
    assert found[1].plan == {"phase": "generation", "sparsify": {"k": 0, "metric": "l2"}}
    assert conditions(Options("k", values=(0, 4), metric="entropy"), anatomy, {})[2].plan["sparsify"] == {
        "k": 4, "metric": "entropy"}


def test_keep_top_keeps_the_top_percent_of_the_ranking():
    anatomy = tiny("recurrent_gemma").anatomy
    ranked = [((5, 3), 0.9), ((2, 1), 0.8), ((2, 0), 0.1), ((5, 0), 0.05)] + [
        ((layer, h), 0.0) for layer, h in ((2, 2), (2, 3), (5, 1), (5, 2))]
    found = conditions(Options("keep-top", values=(25, 50)), anatomy, BASE, ranked)
    assert [c.value for c in found][1:] == [25, 50]
    assert found[1].plan["keep_heads"] == [[2, 1], [5, 3]] == [list(h) for h in keep_set(ranked, 0.25)]
    assert found[1].label == "top 25 % by retrieval (2 heads)"
    assert found[2].plan["off"] == BASE["off"]
    assert conditions(Options("keep-top", values=(10,)), anatomy, {}, ranked)[1].label == "top 10 % by retrieval (1 head)"


@pytest.mark.parametrize("axis, options, size", [
    ("heads", {}, lambda plan: len(plan["heads_off"])),
    ("attention-layers", {}, lambda plan: len(plan["off"][-1]["layers"])),
    ("keep-top", {"values": (25,)}, lambda plan: len(plan["keep_heads"])),
    ("k", {"values": (2,)}, lambda plan: len(plan.get("keep_heads", ())) or 2 * plan["sparsify"]["k"]),
])
def test_controls_are_random_sets_of_the_same_size_and_seeded(axis, options, size):
    anatomy = tiny("recurrent_gemma").anatomy
    ranked = [((layer, h), float(h)) for layer in (2, 5) for h in range(4)]
    found = conditions(Options(axis, controls=3, **options), anatomy, {}, ranked)
    assert found == conditions(Options(axis, controls=3, **options), anatomy, {}, ranked)  # deterministic
    real = [c for c in found[1:] if c.control == 0]
    assert len(found) == 1 + 4 * len(real)
    for i, condition in enumerate(real):
        controls = found[2 + 4 * i: 5 + 4 * i]
        assert [c.control for c in controls] == [1, 2, 3]
        assert all(c.value == condition.value and c.label.startswith(condition.label) for c in controls)
        assert all(size(c.plan) == size(condition.plan) for c in controls)  # k: k heads in each of 2 layers
        assert axis != "k" or all("sparsify" not in c.plan for c in controls)  # a static random keep-set
    other = conditions(Options(axis, controls=3, seed=1, **options), anatomy, {}, ranked)
    if axis != "attention-layers":  # two layers only: seeds may well agree
        assert [c.plan for c in other] != [c.plan for c in found]


@pytest.mark.parametrize("options, message", [
    ({"axis": "head"}, "unknown sweep axis 'head' .*did you mean 'heads'"),
    ({"axis": "k", "layers": (2,)}, "--layers does not apply to axis k"),
    ({"axis": "heads", "values": (1,)}, "--values does not apply to axis heads"),
    ({"axis": "k", "values": (1.5,)}, "k = 1.5 is not a whole number"),
    ({"axis": "k", "values": (-1,)}, "k = -1 is not a whole number"),
    ({"axis": "keep-top", "values": (0,)}, "0 % is not a percentage"),
    ({"axis": "keep-top", "values": (150,)}, "150 % is not a percentage"),
    ({"axis": "keep-top", "values": (5, 5)}, "5 appears twice"),
    ({"axis": "heads", "layers": (2.5,)}, "2.5 is not a layer index"),
    ({"axis": "k", "metric": "l3"}, "--metric: 'l3'"),
    ({"axis": "k", "score": "retrieval"}, "--score does not apply to axis k"),
    ({"axis": "keep-top", "score": "mass"}, "--score: 'mass'"),
    ({"axis": "heads", "controls": -1}, "--controls: -1 is out of range"),
])
def test_bad_options_are_refused_without_a_model(options, message):
    with pytest.raises(LabError, match=message):
        Options(**options).validate()


@pytest.mark.parametrize("options, message", [
    ({"axis": "heads", "layers": (9,)}, r"--layers: layer 9 is out of range \(0..3\)"),
    ({"axis": "heads", "layers": (0,)}, "--layers: layer 0 has no attention block .these do: 2"),
    ({"axis": "ssm-layers", "layers": (2,)}, "layer 2 has no ssm block"),
    ({"axis": "k", "values": (5,)}, r"k = 5 is out of range \(0..4"),
])
def test_bad_options_are_refused_against_the_model(options, message):
    with pytest.raises(LabError, match=message):
        conditions(Options(**options), tiny("jamba").anatomy, {})


def test_a_model_without_attention_has_no_heads_to_sweep():
    with pytest.raises(LabError, match="mamba has no attention heads to sweep"):
        conditions(Options("heads"), tiny("mamba").anatomy, {})
    with pytest.raises(LabError, match="mamba has no attention blocks to sweep"):
        conditions(Options("attention-layers"), tiny("mamba").anatomy, {})


def test_numbers_parses_comma_lists_and_refuses_words():
    assert sweeps.numbers("5, 10,15%,2.5", "--values") == (5, 10, 15, 2.5)
    assert isinstance(sweeps.numbers("15.0", "--values")[0], int)
    for text in ("5,x", "", "nan", "inf"):
        with pytest.raises(LabError, match="--values: .* is not a number"):
            sweeps.numbers(text, "--values")


# 3. a sweep is runs in the database, the base first, linked by a sweep id

def test_sweep_runs_each_condition_as_a_linked_run_with_the_base_first(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    preset = rg_preset({"phase": "generation"}, mmlu=MMLU)
    final, events = sweep(preset, store, axis="kv-heads")
    result = final.result
    assert final.status == "done" and result["sweep"] == final.sweep_id and result["axis"] == "kv-heads"
    assert [s.label for s in events if isinstance(s, sweeps.Stage)] == ["base", "L2.attn.kv0", "L5.attn.kv0"]
    assert result["base"]["label"] == "base" and result["base"]["plan"] == {"mode": "zero", "phase": "generation"}
    assert [c["value"] for c in result["conditions"]] == [[2, 0], [5, 0]]
    runs = {run["id"]: run for run in store.runs()}
    assert len(runs) == 3 and result["base"]["run"] == min(runs)  # the base ran first
    for condition in result["conditions"]:
        assert condition["plan"]["heads_off"] == [[condition["value"][0], h] for h in range(4)]  # the group's heads
        assert condition["plan"]["phase"] == "generation"
        for probe in ("needle", "mmlu"):
            figures, base = condition[probe], result["base"][probe]
            rows = store.trials(condition["run"], probe)
            assert figures["trials"] == len(rows) > 0
            assert figures["accuracy"] == round(sum(r["exact" if probe == "needle" else "correct"] for r in rows)
                                                / len(rows), 4)
            assert figures["delta"] == round(figures["accuracy"] - base["accuracy"], 4)
            low, high = figures["ci95"]
            assert figures["excludes_base"] == (not low <= base["accuracy"] <= high)
    assert [s["id"] for s in store.sweeps()] == [final.sweep_id]
    assert sweeps.result(store, final.sweep_id) == result  # read back from the database alone


def test_a_condition_gives_the_same_results_as_lab_run_of_its_plan(tmp_path):
    """A condition is an ordinary run: the same preset + plan run by hand is the same run, not a new one."""
    store = Store(tmp_path / "r.sqlite")
    session = Session(tiny("recurrent_gemma"))
    final, _ = sweep(rg_preset(), store, session, axis="attention-layers")
    condition = final.result["conditions"][1]
    by_hand = rg_preset({"off": [{"kind": "attention", "layers": [5]}]})
    with session.claim("by hand") as job:
        events = list(session.run(by_hand, store, job))
    assert events[0].run_id == condition["run"] and events[0].skipped == events[0].total
    assert condition["label"] == "L5.attn" and condition["plan"]["off"] == [{"kind": "attention", "layers": [5]}]
    assert events[-1].summary["needle"]["accuracy"] == condition["needle"]["accuracy"]


def test_a_sweep_resumes_its_row_its_conditions_and_their_trials(tmp_path):
    from lab.runner import Progress, Started

    store = Store(tmp_path / "r.sqlite")
    session = Session(tiny("recurrent_gemma"))
    preset = rg_preset(needle=replace(NEEDLE, batch_size=1))  # two batches per condition
    position = None
    for event in sweeps.run(preset, Options("heads", layers=(2,)), session, store):
        position = event.position if isinstance(event, sweeps.Stage) else position
        if isinstance(event, Progress) and position == 2:
            session.cancel()  # as the console's x does: the third condition stops after its first batch
    final = event
    assert final.status == "cancelled" and final.result["status"] == "cancelled"
    [row] = store.sweeps()
    assert row["linked"] == 3 and row["conditions"] == 5 and row["status"] == "cancelled"
    cut = final.result["conditions"][-1]
    assert cut["label"] == "L2.attn.h1" and cut["status"] == "cancelled" and cut["needle"]["trials"] == 1

    again, events = sweep(preset, store, session, axis="heads", layers=(2,))
    assert again.sweep_id == final.sweep_id and again.status == "done" and len(store.sweeps()) == 1
    assert [e.label for e in events if isinstance(e, sweeps.Stage) and e.skipped] == ["base", "L2.attn.h0"]
    started = [e for e in events if isinstance(e, Started)]
    assert started[0].run_id == cut["run"] and started[0].skipped == 1  # the cut condition resumes trial by trial
    assert all(c["status"] == "done" and c["needle"]["trials"] == 2 for c in again.result["conditions"])
    assert len(store.runs()) == 5


def test_controls_that_repeat_a_condition_share_its_run(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    final, _ = sweep(rg_preset(), store, axis="kv-heads", controls=2)  # 2 KV groups: controls repeat them
    runs = {tuple(map(tuple, c["plan"]["heads_off"])): c["run"] for c in final.result["conditions"]}
    assert len(final.result["conditions"]) == 6 and len(runs) == 2 and len(store.runs()) == 3
    assert all(runs[tuple(map(tuple, c["plan"]["heads_off"]))] == c["run"] for c in final.result["conditions"])


def test_a_different_axis_or_values_is_another_sweep_sharing_the_base_run(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    session = Session(tiny("recurrent_gemma"))
    first, _ = sweep(rg_preset(), store, session, axis="k", values=(0,))
    second, events = sweep(rg_preset(), store, session, axis="k", values=(4,))
    assert first.sweep_id != second.sweep_id
    assert first.result["base"]["run"] == second.result["base"]["run"]
    assert [e.skipped for e in events if isinstance(e, sweeps.Stage)] == [True, False]


def test_keep_top_scores_the_heads_as_a_stored_run_first(tmp_path):
    from lab.probes.heads import HeadsSpec, ranking, scores
    from lab.summary import summarize

    store = Store(tmp_path / "r.sqlite")
    heads = HeadsSpec(lengths=(300,), depths=(50,), trials=1, max_new_tokens=6)
    preset = rg_preset(heads=heads)
    final, events = sweep(preset, store, axis="keep-top", values=(25, 50), score="needle_mass")
    assert [e.label for e in events if isinstance(e, sweeps.Stage)][0] == "head scores"
    scores_run = final.result["options"]["scores_run"]
    assert store.run(scores_run)["name"].startswith("random:recurrent_gemma: head scores")
    ranked = ranking(scores(summarize(store.trials(scores_run))["heads"]), "needle_mass")
    kept = [c["plan"]["keep_heads"] for c in final.result["conditions"]]
    assert kept == [[list(h) for h in keep_set(ranked, p)] for p in (0.25, 0.5)]
    assert all("heads" not in store.trials(c["run"])[0]["probe"] for c in final.result["conditions"])


def test_a_preset_without_needle_or_mmlu_is_refused(tmp_path):
    preset = replace(rg_preset(), needle=None)
    with pytest.raises(LabError, match=r"a sweep needs a \[needle\] or \[mmlu\] table"):
        sweep(preset, Store(tmp_path / "r.sqlite"), axis="heads")


# 4. the command line

def preset_file(tmp_path, model="random:recurrent_gemma") -> str:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "demo"\n[model]\nname = "{model}"\n[needle]\ntask = "passkey"\nlengths = [300]\n'
                    'depths = [0, 100]\nmode = "fast"\nmax_new_tokens = 6\nbatch_size = 2\n')
    return str(path)


def test_cli_sweep_json_sweeps_and_csv(tmp_path, capsys):
    db = str(tmp_path / "r.sqlite")
    assert main(["sweep", preset_file(tmp_path), "--over", "attention-layers", "--layers", "5", "--json",
                 "--db", db]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # nothing but the JSON with --json
    result = json.loads(out)
    assert set(result) >= {"sweep", "axis", "base", "conditions"} and result["axis"] == "attention-layers"
    [condition] = result["conditions"]
    assert condition["label"] == "L5.attn" and condition["value"] == 5
    assert set(condition["needle"]) >= {"accuracy", "ci95", "delta", "excludes_base"}
    assert main(["sweeps", "--db", db, "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["id"] == result["sweep"] and listed["linked"] == listed["conditions"] == 2
    assert main(["sweeps", str(result["sweep"]), "--csv", "--db", db]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["label"] for r in rows] == ["base", "L5.attn"]
    assert float(rows[1]["needle_accuracy"]) == condition["needle"]["accuracy"]
    assert json.loads(rows[1]["plan"]) == condition["plan"]
    assert main(["sweeps", str(result["sweep"]), "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert main(["export", "--sweep", str(result["sweep"]), "--db", db]) == 0  # the same CSV through lab export
    assert list(csv.DictReader(io.StringIO(capsys.readouterr().out))) == rows
    assert main(["export", "--db", db]) == 2
    assert "needs a run id" in capsys.readouterr().err


def test_cli_sweep_prints_a_table_and_a_line_per_condition_without_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    db = str(tmp_path / "r.sqlite")
    assert main(["sweep", preset_file(tmp_path), "--over", "k", "--values", "0,4", "--db", db]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["sweep: 1/3 base", "sweep: 2/3 k=0", "sweep: 3/3 k=4"]
    assert "sweep 1 (done)" in out and "k=0" in out and "needle (95 % CI)" in out


@pytest.mark.parametrize("argv, message", [
    (["--over", "head"], "unknown sweep axis 'head' .*did you mean 'heads'"),
    (["--over", "heads", "--layers", "9"], "--layers: layer 9 is out of range"),
    (["--over", "keep-top", "--values", "5,ten"], "--values: 'ten' is not a number"),
    (["--over", "k", "--values", "9"], "k = 9 is out of range"),
    (["--over", "keep-top", "--values", "0"], "0 % is not a percentage"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    import re

    db = tmp_path / "r.sqlite"
    assert main(["sweep", preset_file(tmp_path)] + argv + ["--db", str(db)]) == 2
    assert re.search(message, one_line_error(capsys))


def test_cli_sweeps_on_an_unknown_id_or_a_file_without_sweeps(tmp_path, capsys):
    import sqlite3

    db = tmp_path / "old.sqlite"
    with Store(db) as store:
        store.open_run("f", "run", "random:jamba", {}, "", {})
    conn = sqlite3.connect(db)
    conn.executescript("DROP TABLE sweep_runs; DROP TABLE sweeps; PRAGMA user_version = 1;")  # a version-1 file
    conn.close()
    before = db.read_bytes()
    assert main(["sweeps", "--json", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["sweeps", "3", "--db", str(db)]) == 2
    assert f"no sweep 3 in {db}" in one_line_error(capsys)
    assert main(["sweeps", "--csv", "--db", str(db)]) == 2
    assert "--csv needs a sweep id" in one_line_error(capsys)
    assert db.read_bytes() == before


# 5. user text is printed as text; progress

MARKUP = "sweep [/oops] [bold]"


def test_sweep_tables_and_csv_print_user_text_as_text():
    condition = {"label": MARKUP, "value": [2, 1], "control": 0, "run": 2, "status": "done", "plan": {},
                 "needle": {"accuracy": 0.5, "ci95": [0.1, 0.9], "trials": 2, "delta": -0.5, "excludes_base": True}}
    result = {"sweep": 1, "name": MARKUP, "status": "done", "base": {**condition, "label": "base", "value": None,
                                                                     "needle": {"accuracy": 1.0, "ci95": [0.3, 1.0],
                                                                                "trials": 2}},
              "conditions": [condition]}
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(sweep_table(result))
    console.print(sweeps_table([{"id": 1, "name": MARKUP, "model": MARKUP, "axis": "heads", "status": "done",
                                 "linked": 1, "conditions": 2, "started": 0}], MARKUP))
    text = console.file.getvalue()
    assert text.count(MARKUP) == 5 and "-50.0 pp *" in text and "50.0 % (10-90)" in text
    out = io.StringIO()
    write_csv(result, out)
    assert MARKUP in out.getvalue()


def test_drive_is_quiet_with_json_and_returns_the_result(capsys):
    finished = sweeps.SweepFinished(1, "done", {})
    events = [sweeps.Stage(None, 0, "head scores", True), sweeps.SweepStarted(1, 2),
              sweeps.Stage(0, 2, MARKUP, False), finished]
    assert drive(iter(events), quiet=True) is finished
    assert capsys.readouterr() == ("", "")
    assert drive(iter(events), quiet=False) is finished
    assert capsys.readouterr().err == f"sweep: head scores (done already)\nsweep: 1/2 {MARKUP}\n"


def test_drive_shows_conditions_done_of_total_on_a_terminal(monkeypatch):
    from rich.progress import Progress

    from lab import report
    from lab.runner import Progress as TrialProgress, Started

    bars = []
    monkeypatch.setattr(report, "progress_bar", lambda: bars.append(Progress(console=Console(file=io.StringIO())))
                        or bars[-1])
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    seen = []
    events = [sweeps.SweepStarted(1, 3), sweeps.Stage(0, 3, "base", True), sweeps.Stage(1, 3, MARKUP, False),
              Started(2, 4, 1, "1/16 heads off"), TrialProgress("needle", [], 3, 4, None),
              sweeps.Stage(2, 3, "L2.attn.h1", False), sweeps.SweepFinished(1, "done", {})]

    def watched():
        for event in events:
            yield event
            seen.append([(t.description, t.completed, t.total) for t in bars[0].tasks])

    drive(watched(), quiet=False)
    assert seen[2] == [(f"2/3 {MARKUP}".replace("[", "\\["), 1, 3), ("", 0, None)]
    assert seen[4][1] == ("1/16 heads off", 3, 4)
    assert seen[-1][0][1:] == (3, 3)


# 6. measured on the toy: the paper's curve from k = 0 to k = heads

def test_toy_recurrentgemma_k_sweep_goes_from_nothing_to_everything(tmp_path):
    preset = presets.load("toy-recurrentgemma-sparse-15")
    preset = replace(preset, mmlu=None, needle=replace(preset.needle, lengths=(300,), depths=(0, 25, 50, 75, 100),
                                                       trials=2, mode="fast"))
    final, _ = sweep(preset, Store(tmp_path / "r.sqlite"), Session.open(preset.model), axis="k", values=(0, 8))
    k0, k8 = final.result["conditions"]
    assert final.result["base"]["plan"]["phase"] == preset.plan["phase"] == k0["plan"]["phase"]
    assert k0["needle"]["trials"] == k8["needle"]["trials"] == 10
    assert k0["needle"]["accuracy"] <= 0.05 and k8["needle"]["accuracy"] >= 0.95


def test_an_experts_sweep_on_jamba_runs_one_condition_per_expert(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    preset = presets.Preset(name="demo", model=ModelSpec("random:jamba"), plan={}, needle=NEEDLE)
    final, events = sweep(preset, store, axis="experts", layers=(3,), expert_mode="reroute")  # 4 experts in layer 3
    assert [s.label for s in events if isinstance(s, sweeps.Stage)] == ["base"] + [f"L3.moe.e{e}" for e in range(4)]
    result = final.result
    assert final.status == "done" and [c["value"] for c in result["conditions"]] == [[3, e] for e in range(4)]
    for condition in result["conditions"]:
        assert condition["plan"]["experts_off"] == [condition["value"]]
        assert condition["plan"]["expert_mode"] == "reroute" and condition["needle"]["trials"] == 2
    assert result["options"]["expert_mode"] == "reroute"


# 7. throughput: what `lab sweep` prints to compare --nproc 1 and N (lab.sweeps.distributed)

def test_clock_counts_the_trials_run_not_those_skipped(monkeypatch):
    import importlib

    from lab import runner

    run = importlib.import_module("lab.sweeps.run")  # the module (lab.sweeps.run is also the function)
    times = iter([10.0, 14.0])
    monkeypatch.setattr(run.time, "monotonic", lambda: next(times))
    clock = run.Clock()
    events = [sweeps.SweepStarted(1, 3), sweeps.Stage(0, 3, "base", True), runner.Started(2, 6, 2, "plan"),
              runner.Started(3, 6, 6, "plan"), sweeps.SweepFinished(1, "done", {})]
    assert list(clock.watch(iter(events))) == events
    assert clock.trials == 4 and clock.seconds == 4.0
    assert clock.line(1) == "4 trials in 4.0 s on 1 replica (1.00 trials/s)"
    assert clock.line(2).endswith("on 2 replicas (1.00 trials/s)")


def test_clock_names_the_head_scoring_a_keep_top_sweep_starts_with(monkeypatch):
    """The line said '8 trials in 0.3 s' after 23 s of head scoring."""
    import importlib

    run = importlib.import_module("lab.sweeps.run")
    times = iter([2.0, 25.0, 25.5])
    monkeypatch.setattr(run.time, "monotonic", lambda: next(times))
    clock = run.Clock()
    events = [sweeps.Stage(None, 0, "head scores", False), sweeps.SweepStarted(1, 3),
              sweeps.SweepFinished(1, "done", {})]
    list(clock.watch(iter(events)))
    assert clock.line(1) == "0 trials in 0.5 s on 1 replica (0.00 trials/s), after 23.0 s of head scoring"


@pytest.mark.parametrize("excludes", [True, False])
def test_the_sweep_tables_footnote_comes_with_a_starred_row(excludes):
    condition = {"label": "k=1", "value": 1, "control": 0, "run": 2, "status": "done", "plan": {},
                 "needle": {"accuracy": 0.5, "ci95": [0.1, 0.9], "trials": 2, "delta": -0.5, "excludes_base": excludes}}
    result = {"sweep": 1, "name": "s", "status": "done", "base": None, "conditions": [condition]}
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(sweep_table(result))
    assert ("interval excludes the base" in console.file.getvalue()) == excludes


def test_a_condition_whose_run_did_not_finish_is_shown_as_partial():
    """A cancelled condition (30 of 80 trials) was listed like a finished one, starred against the base."""
    condition = {"label": "k=0", "value": 0, "control": 0, "run": 2, "status": "cancelled", "plan": {},
                 "needle": {"accuracy": 0.0, "ci95": [0.0, 0.11], "trials": 30, "delta": -1.0, "excludes_base": True}}
    result = {"sweep": 1, "name": "s", "status": "cancelled", "base": None, "conditions": [condition]}
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(sweep_table(result))
    out = console.file.getvalue()
    assert "k=0 (cancelled, partial)" in out and "*" not in out
