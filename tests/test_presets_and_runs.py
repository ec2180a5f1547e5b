import json
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest

from lab import presets
from lab.cli import main
from lab.errors import LabError
from lab.interventions import BlocksOff, Plan, Sparsify
from lab.runner import Finished, Progress, Started, run
from lab.store import Store

from conftest import DEMO_PRESET, tiny

PRESET = DEMO_PRESET.replace("[needle]", '[plan]\noff = [{kind = "attention"}]\nphase = "generation"\n[needle]')


def test_plan_roundtrips_through_toml():
    plan = Plan(off=(BlocksOff("attention"), BlocksOff("ssm", (0, 3))), heads_off=((2, 1),), keep_heads=((2, 0),),
                sparsify=Sparsify(1, "l2"), mode="mean", phase="prefill")
    preset = presets.Preset(name="x").with_plan(plan)
    again = presets.parse(preset.to_toml())
    assert again.plan_for(tiny("jamba").anatomy) == plan
    assert again == preset


def test_preset_roundtrips():
    preset = presets.parse(PRESET)
    assert presets.parse(preset.to_toml()) == preset
    assert preset.needle.lengths == (300, 400) and preset.mmlu.shots == 1


@pytest.mark.parametrize("text, message", [
    ("nmae = 'x'", "unknown preset key 'nmae'"),
    ("[model]\nnmae = 'x'", r"\[model\]: unknown key 'nmae'"),
    ("[plan]\nof = []", "plan: unknown key 'of'"),
    ("[needle]\ntask = 'haystack'", "needle.task"),
    ("[needle]\nlengths = 5", "needle.lengths: expected a list"),
    ("[plan]\nheads_off = [[1]]", "expected \\[layer, head\\] pairs"),
    ("[plan\n", "malformed TOML"),
    ("[mmlu]\nshots = 9", "mmlu.shots"),
])
def test_bad_presets_name_the_key(text, message):
    with pytest.raises(LabError, match=message):
        presets.parse(text)


@pytest.mark.parametrize("plan, message", [
    ({"off": [{"kind": "attention", "layers": [7]}]}, "layer 7 is out of range"),
    ({"off": [{"kind": "attention", "layers": [0]}]}, "layer 0 has no attention"),
    ({"heads_off": [[2, 9]]}, "head 9 is out of range"),
    ({"heads_off": [[1, 0]]}, "layer 1 has no attention heads"),
    ({"sparsify": {"k": 5}}, "sparsify.k: 5 is out of range"),
    ({"phase": "decode"}, "plan.phase"),
])
def test_plans_out_of_range(plan, message):
    with pytest.raises(LabError, match=message):
        Plan.from_dict(plan, tiny("jamba").anatomy)


def _run(preset, store, **kwargs):
    return list(run(preset, store, loaded=tiny("jamba"), **kwargs))


def test_run_streams_and_resumes(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    preset = presets.parse(PRESET)
    events = _run(preset, store)
    assert isinstance(events[0], Started) and events[0].skipped == 0 and events[0].total == 6 + 8
    assert isinstance(events[-1], Finished) and events[-1].status == "done"
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].done == 14 and all(e.eta_s is not None for e in progress)
    summary = events[-1].summary
    assert summary["needle"]["trials"] == 6 and set(summary["needle"]["by_length"]) == {"300", "400"}
    assert summary["mmlu"]["questions"] == 8
    # remove two trials: a rerun computes only those
    store.db.execute("DELETE FROM trials WHERE key IN ('passkey/L400/d100/t0', 'stem__toy_minerals/1')")
    again = _run(preset, store)
    assert again[0].skipped == 12 and again[0].run_id == events[0].run_id
    assert sum(len(e.rows) for e in again if isinstance(e, Progress)) == 2
    assert again[-1].summary == summary


def test_cancel_keeps_finished_batches(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    cancel = threading.Event()
    finished = None
    for event in run(presets.parse(PRESET), store, loaded=tiny("jamba"), cancel=cancel):
        if isinstance(event, Progress):
            cancel.set()
        finished = event
    assert finished.status == "cancelled"
    assert len(store.trials(finished.run_id)) == 2  # the one batch that finished
    assert store.run(finished.run_id)["status"] == "cancelled"


def test_cli_run_json_runs_and_export(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text(PRESET)
    db = str(tmp_path / "r.sqlite")
    assert main(["run", str(path), "--db", db, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"run", "needle", "mmlu"} and summary["run"] == 1
    assert set(summary["needle"]) == {"accuracy", "score", "trials", "by_length", "by_depth"}
    assert set(summary["mmlu"]) == {"accuracy", "questions", "by_category", "by_subject"}
    assert main(["runs", "--db", db, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert runs[0]["name"] == "demo · attention off in 1/1 layers, generation only" and runs[0]["trials"] == 14
    assert main(["export", str(summary["run"]), "--db", db, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("probe,key") and len(lines) == 15
    assert main(["export", "1", "--db", db, "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["trials"]) == 14


@pytest.mark.parametrize("args, message", [
    (["run", "nope.toml"], "preset nope.toml not found"),
    (["inspect", "random:gpt2"], "no tiny config"),
    (["export", "99"], "no run 99"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    Store(tmp_path / "r.sqlite").close()  # lab export reads a database, never creates one
    assert main(args + (["--db", str(tmp_path / "r.sqlite")] if args[0] in ("export",) else [])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_bad_preset_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(PRESET.replace("[plan]", "[plan]\nheads_off = [[2, 7]]"))
    assert main(["run", str(path), "--db", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "head 7 is out of range" in err and err.count("\n") == 1


def test_cli_inspect_json(capsys):
    assert main(["inspect", "random:recurrent_gemma", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "recurrent_gemma" and data["num_layers"] == 6
    assert data["layers"][2]["blocks"][0] == {"kind": "attention", "flavour": "sliding", "heads": 4, "kv_heads": 1,
                                              "head_dim": 16, "window": 32, "path": "model.layers.2.temporal_block"}


def test_cli_heads_writes_a_keep_preset(tmp_path, capsys):
    out = tmp_path / "keep.toml"
    assert main(["heads", "random:jamba", "--score", "entropy", "--keep", "50%", "--lengths", "300",
                 "--depths", "50", "--trials", "1", "--max-new-tokens", "6", "--json", "--write", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["ranking"]) == 4 and len(data["keep"]) == 2
    values = [r["value"] for r in data["ranking"]]
    assert values == sorted(values)  # entropy: lowest first
    plan = presets.load(str(out)).plan_for(tiny("jamba").anatomy)
    assert plan.keep_heads == tuple(tuple(k) for k in data["keep"])


def test_out_of_memory_halves_the_batch():
    import torch

    from lab.runner import run_halving

    sizes = []

    def answer(items, tracker):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [{"key": i} for i in items]

    rows = run_halving(answer, list(range(7)), tracker=None)
    assert [r["key"] for r in rows] == list(range(7))
    assert sizes == [7, 3, 1, 2, 4, 2, 2]  # 7 -> 3 + 4; 3 -> 1 + 2; 4 -> 2 + 2

    def always(items, tracker):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(LabError, match="out of memory on a single prompt"):
        run_halving(always, [1, 2], tracker=None)


def test_automatic_batch_size_fits_free_memory():
    from lab.runner import auto_batch_size, prompts_that_fit

    assert prompts_that_fit(10_000, 1_000) == 8  # 80 % of the free memory
    assert prompts_that_fit(10_000, 20_000) == 1  # never below one prompt
    assert prompts_that_fit(10**12, 1) == 256  # nor above the cap
    loaded = tiny("recurrent_gemma")
    assert auto_batch_size(5, loaded, 4096) == 5  # asked for
    if loaded.device.type == "cpu":
        assert auto_batch_size(0, loaded, 4096) == 8


def test_fixed_buffer_decoding_gets_batches_by_what_it_holds_per_prompt(monkeypatch):
    """A probe that prefills a length at a time and then holds row_bytes per prompt gets as many prompts as half
    the free memory holds for those (the needle grid decodes in one batch), never fewer than one forward fits."""
    import torch

    from lab import runner
    from lab.models.generation import decode_row_bytes
    from lab.probes import needle

    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(runner, "_free_and_peak", lambda loaded, tokens: (100_000, 10_000))
    assert runner.auto_batch_size(0, on_gpu, 4096) == 8  # 80 % of the memory / a forward's peak
    assert runner.auto_batch_size(0, on_gpu, 4096, row_bytes=1_000) == 40  # 80 % of half / what decoding holds
    assert runner.auto_batch_size(0, on_gpu, 4096, row_bytes=100_000) == 8
    loaded = tiny("jamba")
    spec = needle.NeedleSpec(task="passkey", lengths=(256, 300), depths=(0, 50))
    work = needle.NeedleProbe().prepare(loaded, spec).work(set())
    assert work.row_bytes == decode_row_bytes(loaded.model, 300 + spec.max_new_tokens) > 0
    assert needle.NeedleProbe().prepare(loaded, replace(spec, mode="fast")).work(set()).row_bytes == 0


def test_a_length_that_runs_out_of_memory_is_prefilled_in_halves(monkeypatch):
    """lab's fixed-buffer decoder splits a prompt length's rows where their prefill runs out of memory: the same
    answers as in one piece."""
    import torch

    from lab.fast import decode

    loaded = tiny("recurrent_gemma")
    prompts = torch.randint(0, 200, (5, 40), generator=torch.Generator().manual_seed(0)).tolist()
    whole = decode.greedy(loaded.model, [torch.tensor(prompts)], 6, return_logits=True)
    forward, sizes = type(loaded.model).forward, []

    def tight(self, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1:
            sizes.append(input_ids.shape[0])
            if input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("tight")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(loaded.model), "forward", tight)
    parts = decode.greedy(loaded.model, [torch.tensor(prompts)], 6, return_logits=True)
    assert sizes == [5, 2, 3, 1, 2]
    assert torch.equal(whole[0], parts[0]) and torch.allclose(whole[1], parts[1], atol=1e-5)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_automatic_batch_size_measures_one_prompt_on_the_gpu():
    import torch

    from lab.models import ModelSpec, load
    from lab.runner import _free_and_peak, auto_batch_size

    loaded = load(ModelSpec("random:recurrent_gemma", device="cuda"))
    free, short = _free_and_peak(loaded, 256)
    _, long = _free_and_peak(loaded, 4096)
    assert 0 < short < long < free
    size = auto_batch_size(0, loaded, 1024)
    with torch.inference_mode():
        loaded.model(input_ids=torch.zeros((size, 1024), dtype=torch.long, device="cuda"), use_cache=False)


def test_cli_run_prints_a_heads_table_and_markup_paths_as_text(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text('[model]\nname = "random:jamba"\n[heads]\nlengths = [300]\ndepths = [50]\ntrials = 1\n'
                    'max_new_tokens = 6\n')
    db = tmp_path / "a[/oops]" / "r.sqlite"
    assert main(["run", str(path), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert str(db) in out.replace("\n", "")
    assert "heads by retrieval" in out and "trials recalled the needle" in out


def test_an_edited_haystack_file_is_another_experiment(tmp_path, capsys):
    """A run's identity holds what a user's haystack file says: the same file resumes its run, an edited one
    starts another (it used to hand back the old text's results); a generated haystack is unaffected."""
    hay = tmp_path / "hay.txt"
    hay.write_text("The river was calm that morning. " * 300)
    path = tmp_path / "p.toml"
    path.write_text(f'[model]\nname = "toy-recurrentgemma"\n[needle]\ntask = "passkey"\nlengths = [300]\n'
                    f'depths = [50]\nmax_new_tokens = 6\nhaystack = "{hay}"\n')
    db = tmp_path / "r.sqlite"

    def run_id() -> int:
        assert main(["run", str(path), "--db", str(db), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["run"]

    first = run_id()
    assert run_id() == first
    hay.write_text("A different text about the harbour. " * 300)
    assert run_id() != first
    assert "haystack_text" not in json.dumps(presets.load("toy-recurrentgemma-base").to_dict())


def test_a_plan_written_whole_or_with_its_defaults_left_out_is_one_run():
    """A file's `[plan]` without mode and phase, and the console's plan (which writes them), are one plan: one
    fingerprint, so either resumes the other's trials."""
    sparse = presets.parse("[model]\nname = 'random:jamba'\n[plan]\nheads_off = [[2, 1]]\n[needle]\ntask = 'passkey'\n")
    whole = replace(sparse, plan=Plan(heads_off=((2, 1),)).to_dict())
    assert "mode" in whole.plan and "mode" not in sparse.plan
    assert sparse.fingerprint() == whole.fingerprint()
    assert sparse.fingerprint() != replace(sparse, plan=Plan(heads_off=((2, 0),)).to_dict()).fingerprint()


def test_an_mmlu_folder_whose_questions_changed_is_another_run(tmp_path):
    """mmlu.source named a folder by its name only: other questions under it resumed the old run's answers."""
    (tmp_path / "mm" / "test").mkdir(parents=True)
    questions = tmp_path / "mm" / "test" / "anatomy_test.csv"
    questions.write_text("What is 1+1?,1,2,3,4,B\n")
    preset = presets.Preset(name="p", mmlu=presets.MMLUSpec(source=str(tmp_path / "mm"), shots=0))
    before = preset.fingerprint()
    assert preset.fingerprint() == before
    questions.write_text("What is 2+2?,1,2,3,4,D\n")
    assert preset.fingerprint() != before
