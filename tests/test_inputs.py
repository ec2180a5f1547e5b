"""Bad input is a one-line error naming what is wrong; a preset cannot switch on remote code or pickles."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lab import presets
from lab.cli import main
from lab.errors import LabError
from lab.probes import mmlu, needle
from lab.probes.haystack import file_sentences
from lab.probes.needle import NeedleSpec

from conftest import tiny

ROOT = Path(__file__).resolve().parent.parent
UNREADABLE = "/proc/self/mem"  # a regular file that fails to read, even for root
TINY_RUN = """
name = "tiny"
[model]
name = "random:recurrent_gemma"
[needle]
task = "passkey"
lengths = [260]
depths = [50]
max_new_tokens = 6
"""


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and one 'lab: ' line on stderr; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lab: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def write(tmp_path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- 1. remote code and pickles only from the command line ----------------------------------------------

@pytest.mark.parametrize("flag, option", [("trust_remote_code", "--trust-remote-code"),
                                          ("allow_pickle", "--allow-pickle")])
def test_preset_cannot_switch_on_remote_code_or_pickles(tmp_path, capsys, flag, option):
    with pytest.raises(LabError, match=f"\\[model\\] {flag} is not allowed in a preset; pass {option} on the"):
        presets.parse(f"[model]\n{flag} = true")
    path = write(tmp_path, TINY_RUN.replace("[model]", f"[model]\n{flag} = true"))
    err = one_line_error(capsys, ["run", path, "--db", str(tmp_path / "r.sqlite")])
    assert flag in err and option in err


def test_old_presets_with_the_flags_false_still_load_and_are_not_written_back():
    preset = presets.parse("[model]\nname = 'x'\ntrust_remote_code = false\nallow_pickle = false")
    assert not preset.model.trust_remote_code and not preset.model.allow_pickle
    text = presets.Preset(model=presets.ModelSpec("x", trust_remote_code=True, allow_pickle=True)).to_toml()
    assert "trust_remote_code" not in text and "allow_pickle" not in text


def test_a_new_model_takes_only_the_command_line_flags():
    preset = presets.Preset(model=presets.ModelSpec("x", trust_remote_code=True, allow_pickle=True))
    moved = preset.with_model("some/dir")
    assert moved.model.name == "some/dir" and not moved.model.trust_remote_code and not moved.model.allow_pickle
    asked = preset.with_model("some/dir", trust_remote_code=True)
    assert asked.model.trust_remote_code and not asked.model.allow_pickle


def test_lab_run_passes_the_command_line_flags_to_the_model(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_open(spec):  # the session loads the model: see what it is asked for
        seen.append(spec)
        raise LabError("stop here")

    monkeypatch.setattr("lab.session.Session.open", staticmethod(fake_open))
    path = write(tmp_path, TINY_RUN)
    db = str(tmp_path / "r.sqlite")
    one_line_error(capsys, ["run", path, "--db", db, "--model", "random:jamba"])
    one_line_error(capsys, ["run", path, "--db", db, "--trust-remote-code", "--allow-pickle"])
    assert [(m.name, m.trust_remote_code, m.allow_pickle) for m in seen] == [
        ("random:jamba", False, False), ("random:recurrent_gemma", True, True)]


# ---- 2. format version ---------------------------------------------------------------------------------

def test_presets_carry_a_format_version():
    text = presets.Preset(name="v").to_toml()
    assert text.startswith("version = 1\n")
    assert presets.parse(text) == presets.parse(text.replace("version = 1\n", ""))


@pytest.mark.parametrize("version, message", [(2, "preset format version 2 is newer than this lab reads \\(1\\)"),
                                               (0, "version: expected 1"), ("'1'", "version: expected 1")])
def test_unknown_versions_are_refused(version, message):
    with pytest.raises(LabError, match=message):
        presets.parse(f"version = {version}")


# Fingerprints of the shipped presets, computed on main before the version key and the flag rules:
# result databases find their runs by them, so they must never change.
# the two paper presets changed on purpose when they took the paper's protocol (issue 17: prompts, buffer,
# then bf16 entropy scores): their old fingerprints were 44e578cab33787c4 and a0c8a3170f574fca, so old
# trials are not resumed into them; again when they took the paper's one haystack text (haystack_per = trial,
# third session): recurrentgemma-2b-jrt was 92d6f9400cb6b4cd
PINNED = {"toy-recurrentgemma-base": "cb8e7ba83a697a72", "toy-jamba-sparse-15": "d3ed91f381b0e8fd",
          "recurrentgemma-2b-jrt": "a836c8bf56c6601f", "jamba-mini-1.6-mmlu-k0": "ab241ace8c00a7b0"}


def test_fingerprints_of_shipped_presets_are_unchanged():
    for name, fingerprint in PINNED.items():
        preset = presets.load(name)
        assert preset.fingerprint() == fingerprint, name
        assert presets.parse(preset.to_toml()).fingerprint() == fingerprint, name  # after a save as well


# ---- 3. wrong types name the key -------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("name = 5", "name: expected a string"),
    ("[needle]\nlengths = ['a']", "needle.lengths: expected a list of integers"),
    ("[needle]\nlengths = [300.5]", "needle.lengths: expected a list of integers"),
    ("[needle]\nlengths = [[300]]", "needle.lengths: expected a list of integers"),
    ("[needle]\nlengths = [true]", "needle.lengths: expected a list of integers"),
    ("[needle]\ndepths = ['x']", "needle.depths: expected a list of numbers"),
    ("[needle]\nseed = 1.5", "needle.seed: expected an integer"),
    ("[mmlu]\nsubjects = [1]", "mmlu.subjects: expected a list of strings"),
    ("[model]\nattn_implementation = 5", "model.attn_implementation: expected a string"),
    ("[model]\nfast = 'no'", "model.fast: expected true or false"),
    ("[plan]\nkeep_heads = 5", "plan.keep_heads: expected a list"),
    ("[plan]\nsparsify = {k = 'two'}", "plan.sparsify.k: expected an integer"),
    ("[plan]\nsparsify = {k = 1.7}", "plan.sparsify.k: expected an integer"),
    ("[plan]\nsparsify = {k = 1, metric = 2}", "plan.sparsify.metric: expected a string"),
    ("[plan]\nmode = 5", "plan.mode: expected a string"),
    ("[plan]\nphase = 'decode'", "plan.phase: 'decode' is not one of"),
    ("[plan]\noff = [{kind = 'attn'}]", "plan.off: kind 'attn' is not one of"),
    ("[needle]\ntask = 'multikey'\nkeys = 1000", "needle.keys: 1000 is more than the 400 keys task multikey has"),
])
def test_wrong_types_name_the_key(text, message):
    with pytest.raises(LabError, match=message):
        presets.parse(text)


def test_more_keys_than_fit_the_length_is_one_line():
    builder = needle.PromptBuilder(tiny("recurrent_gemma").tokenizer, NeedleSpec(task="multikey", keys=100))
    with pytest.raises(LabError, match="context length 300 is too short for task multikey"):
        builder.build(300, 50, 0)


def test_unreadable_or_non_utf8_preset_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert "not UTF-8" in one_line_error(capsys, ["run", str(bad)])
    assert f"{UNREADABLE}: cannot read" in one_line_error(capsys, ["run", UNREADABLE])


def test_heads_keep_must_be_a_percentage(capsys):
    assert "--keep: 'abc' is not a percentage" in one_line_error(capsys, ["heads", "random:jamba", "--keep", "abc"])
    assert "--keep" in one_line_error(capsys, ["heads", "random:jamba", "--keep", "150%"])


def test_heads_write_is_checked_before_scoring(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("scored heads before checking --write")

    monkeypatch.setattr("lab.probes.heads.head_scores", never)
    monkeypatch.setattr("lab.models.load", never)
    base = ["heads", "random:jamba", "--keep", "50%", "--write"]
    assert "is a directory" in one_line_error(capsys, base + [str(tmp_path)])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write" in one_line_error(capsys, base + [str(blocker / "sub" / "keep.toml")])
    assert "--write needs --keep" in one_line_error(capsys, ["heads", "random:jamba", "--write", "k.toml"])
    assert "--write: give the path" in one_line_error(capsys, base + [""])  # wrote nothing and said nothing


# ---- 4. bounds -------------------------------------------------------------------------------------------

def test_lengths_have_an_upper_bound():
    with pytest.raises(LabError, match="above lab's limit of 1,048,576 tokens"):
        NeedleSpec(lengths=(1_000_000_000_000,)).validate()
    with pytest.raises(LabError, match="above lab's limit of 1,048,576 tokens"):
        NeedleSpec(lengths=(1_048_576,), max_new_tokens=1).validate()
    NeedleSpec(lengths=(1_048_536,), max_new_tokens=40).validate()


def test_check_fits_against_max_position_embeddings():
    jamba = tiny("jamba")
    limit = jamba.model.config.max_position_embeddings
    needle.check_fits(NeedleSpec(lengths=(300, limit - 40), max_new_tokens=40), jamba)
    with pytest.raises(LabError, match=f"{limit - 39} \\+ 40 new tokens is more than the model's {limit} positions"):
        needle.check_fits(NeedleSpec(lengths=(300, limit - 39), max_new_tokens=40, jrt=True), jamba)
    # RecurrentGemma attends in a local window: it declares no position limit, so any length fits
    assert getattr(tiny("recurrent_gemma").model.config, "max_position_embeddings", None) is None
    needle.check_fits(NeedleSpec(lengths=(1_000_000,)), tiny("recurrent_gemma"))


def test_heads_checks_the_model_positions_before_scoring(capsys):
    err = one_line_error(capsys, ["heads", "random:jamba", "--lengths", "300000"])
    assert "more than the model's 262144 positions" in err


def test_jrt_prompts_keep_their_length(tmp_path):
    """check_fits counts max(lengths): a JRT prompt holds both context copies within its length."""
    trial = needle.PromptBuilder(tiny("jamba").tokenizer, NeedleSpec(jrt=True)).build(500, 50, 0)
    assert len(trial.ids) == 500 and len(trial.contexts) == 2


def test_haystack_of_dev_zero_fails_at_once():
    """In a child process with 8 GiB of address space (a CUDA build of torch maps more than 1 GiB on import):
    without the cap it would read until memory runs out."""
    def limit_memory():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    code = ("from lab.errors import LabError; from lab.probes.haystack import file_sentences\n"
            "try: next(file_sentences('/dev/zero'))\nexcept LabError as e: print(e)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limit_memory, timeout=120)
    assert done.stdout == ("haystack /dev/zero is not a regular file (a FIFO or device would block or never end)\n"), \
        done.stderr[-300:]


def test_big_haystack_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("lab.probes.haystack.MAX_HAYSTACK_BYTES", 100)
    (tmp_path / "a.txt").write_text("A sentence. " * 5)
    (tmp_path / "b.txt").write_text("Another one. " * 5)
    assert next(file_sentences(tmp_path / "a.txt")) == "A sentence."
    with pytest.raises(LabError, match=f"haystack {tmp_path} is larger than 100 bytes"):
        next(file_sentences(tmp_path))


# ---- 5. silently accepted ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [(b"one. two.\x00three.", "NUL bytes"),
                                           ("caf\xe9. ok.".encode("latin-1"), "not UTF-8")])
def test_binary_haystack_is_refused(tmp_path, data, message):
    path = tmp_path / "h.txt"
    path.write_bytes(data)
    with pytest.raises(LabError, match=message):
        next(file_sentences(path))


def test_unreadable_haystack_is_one_line(tmp_path):
    with pytest.raises(LabError, match=f"haystack {UNREADABLE}: cannot read"):
        next(file_sentences(UNREADABLE))
    (tmp_path / "a.txt").write_text("One. Two.")
    (tmp_path / "folder.txt").mkdir()  # a folder whose name ends in .txt is not a haystack file
    assert next(file_sentences(tmp_path)) == "One."


def _mmlu_folder(tmp_path, files: dict[str, bytes]) -> Path:
    for part in ("dev", "test"):
        (tmp_path / part).mkdir()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("files", [{}, {"dev/x_dev.csv": b"", "test/x_test.csv": b""}])
def test_mmlu_folder_without_questions_is_refused(tmp_path, files):
    folder = _mmlu_folder(tmp_path, files)
    with pytest.raises(LabError, match=f"no MMLU questions in {folder}"):
        mmlu.load_questions(mmlu.MMLUSpec(source=str(folder)))


@pytest.mark.parametrize("data, message", [("q,a,b,c,d,A\ncaf\xe9,a,b,c,d,B\n".encode("latin-1"), "not UTF-8"),
                                           (b"q,a,b,c,d,A\nq\x00,a,b,c,d,B\n", "NUL")])
def test_mmlu_csv_that_is_not_text_is_one_line(tmp_path, data, message):
    folder = _mmlu_folder(tmp_path, {"dev/x_dev.csv": b"q,a,b,c,d,A\n", "test/x_test.csv": data})
    with pytest.raises(LabError, match=f"x_test.csv.*{message}"):
        mmlu.load_questions(mmlu.MMLUSpec(source=str(folder)))


def test_unreadable_mmlu_csv_is_one_line(tmp_path):
    folder = _mmlu_folder(tmp_path, {"dev/x_dev.csv": b"q,a,b,c,d,A\n"})
    (folder / "test" / "x_test.csv").symlink_to(UNREADABLE)
    with pytest.raises(LabError, match="x_test.csv: cannot read"):
        mmlu.load_questions(mmlu.MMLUSpec(source=str(folder)))


@pytest.mark.parametrize("field, values, message", [
    ("depths", (50.00001, 50), "needle.depths: 50.00001 and 50 are the same trial \\(d50\\)"),
    ("depths", (10, 20, 10), "needle.depths: 10 and 10 are the same trial"),
    ("lengths", (300, 400, 300), "needle.lengths: 300 appears twice"),
])
def test_duplicate_cells_are_refused(field, values, message):
    with pytest.raises(LabError, match=message):
        NeedleSpec(**{field: values}).validate()


# ---- 7. lab run --json names the run ---------------------------------------------------------------------

def test_run_json_names_the_run(tmp_path, capsys):
    path = write(tmp_path, TINY_RUN)
    db = str(tmp_path / "r.sqlite")
    assert main(["run", path, "--db", db, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["run"] == 1 and set(first) == {"run", "needle"}
    assert main(["export", str(first["run"]), "--db", db, "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["trials"]) == 1


# ---- found by the hostile-input pass ------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["export", "abc"], "lab: export: argument run: invalid int value: 'abc' (see lab export --help)"),
    (["--color", "foo"], "lab: argument --color: invalid choice: 'foo'"),
    (["runs", "--db", ""], "lab: --db is empty"),
    (["heads", "random:jamba", "--score", "foo"], "lab: --score: 'foo' is not one of retrieval, entropy, needle_mass"),
])
def test_bad_command_lines_are_one_line(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors leave through sys.exit
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_meta_models_are_refused_where_weights_are_needed(tmp_path, capsys):
    path = write(tmp_path, TINY_RUN.replace('name = "random:recurrent_gemma"',
                                           'name = "random:recurrent_gemma"\ndevice = "meta"'))
    for argv in (["run", path, "--db", str(tmp_path / "r.sqlite")], ["bench", "random:jamba", "--device", "meta"]):
        assert main(argv) == 2
        assert "meta device has no weights" in capsys.readouterr().err


def test_heads_write_where_nothing_can_be_written_is_one_line(tmp_path, capsys):
    from lab import presets

    with pytest.raises(LabError, match="cannot write the preset /proc/x.toml"):
        presets.save(presets.Preset(), "/proc/x.toml")


def test_a_fifo_haystack_is_refused_not_waited_on(tmp_path):
    import os

    from lab.probes.haystack import file_sentences

    fifo = tmp_path / "hay.txt"
    os.mkfifo(fifo)
    with pytest.raises(LabError, match="is not a regular file"):
        next(file_sentences(fifo))


@pytest.mark.parametrize("make, message", [
    (lambda csv: csv.write_text('"' + "x" * 200_000 + '",a,b,c,d,A\n'), "field larger than field limit"),
    (lambda csv: csv.symlink_to("/dev/zero"), "is not a regular file"),
])
def test_mmlu_files_that_are_too_big_are_one_line(tmp_path, make, message):
    from lab.probes import mmlu

    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    (tmp_path / "dev" / "x_dev.csv").write_text("q,a,b,c,d,A\n")
    make(tmp_path / "test" / "x_test.csv")
    with pytest.raises(LabError, match=message):
        mmlu.load_questions(mmlu.MMLUSpec(source=str(tmp_path), shots=0))


@pytest.mark.parametrize("changes, message", [({"trials": 9223372036854775807}, "above lab's limit of 1,000,000"),
                                              ({"haystack": ""}, "needle.haystack is empty"),
                                              ({"needle": " "}, "needle.needle is empty"),
                                              ({"question": ""}, "needle.question is empty")])
def test_absurd_grids_and_empty_haystacks_are_refused(changes, message):
    with pytest.raises(LabError, match=message):
        NeedleSpec(**changes).validate()


@pytest.mark.parametrize("arch, plan, message", [
    ("recurrent_gemma", {"off": [{"kind": "moe"}]}, "plan.off: recurrent_gemma has no moe blocks"),
    ("mamba", {"off": [{"kind": "attention"}]}, "plan.off: mamba has no attention blocks"),
    ("mamba", {"sparsify": {"k": 0}}, "plan.sparsify: mamba has no attention layers"),
    ("mamba", {"needle_attention": {"generation": "omit"}}, "plan.needle_attention: mamba has no attention layers")])
def test_a_plan_op_that_matches_nothing_is_refused(arch, plan, message):
    """It ran as the base model under the plan's name (and needle attention on Mamba ended in a traceback)."""
    from lab.interventions import Plan

    loaded = tiny(arch)
    with pytest.raises(LabError, match=message):
        Plan.from_dict(plan, loaded.anatomy)


def test_needle_attention_under_mmlu_is_refused(tmp_path, capsys):
    """MMLU's prompts have no needle: the run said nothing and stored figures under the plan's name (omit: the
    base model's; only: no attention at all)."""
    preset = tmp_path / "p.toml"
    preset.write_text('version = 1\nname = "p"\n[model]\nname = "random:jamba"\n'
                      '[plan.needle_attention]\ngeneration = "only"\n[mmlu]\nlimit = 2\n')
    assert main(["run", str(preset), "--db", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lab: plan.needle_attention acts on the needle's keys and MMLU's prompts have none")
    assert "\n" not in err


def test_max_new_tokens_that_cannot_hold_the_answer_is_refused():
    """Greedy answers cut short score 0 % in generate mode (teacher forcing scored the same grid 100 %)."""
    loaded = tiny("recurrent_gemma")
    spec = NeedleSpec(task="passkey", lengths=(256,), depths=(50,), max_new_tokens=3)
    with pytest.raises(LabError, match=r"max_new_tokens: 3 new tokens cannot hold the answer \(\d+ tokens\)"):
        needle.NeedleProbe().prepare(loaded, spec)
    needle.NeedleProbe().prepare(loaded, replace(spec, mode="fast"))  # teacher forcing scores the whole answer


@pytest.mark.parametrize("plan, message", [
    ({"sparsify": {"k": 1, "extra": 1}}, "plan.sparsify: unknown key 'extra' \\(known: k, metric, score_dtype\\)"),
    ({"needle_attention": {"generation": "omit", "heads": []}},
     "plan.needle_attention.heads: give at least one head \\(leave it out for every head\\)")])
def test_plan_tables_name_what_is_wrong(plan, message):
    from lab.interventions import Plan

    with pytest.raises(LabError, match=message):
        Plan.from_dict(plan)


def test_small_input_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "essays").mkdir()
    with pytest.raises(LabError, match="is a folder without .txt files"):
        next(file_sentences(str(tmp_path / "essays")))
    assert main(["heads", "random:jamba", "--top", "-3"]) == 2
    assert capsys.readouterr().err.strip() == "lab: --top: -3 rows; give at least 1"


def test_a_subject_named_twice_is_refused():
    """Its questions made the same trial keys twice: computed twice, stored once, the run never done."""
    with pytest.raises(LabError, match="mmlu.subjects: humanities__toy_treaties appears twice"):
        mmlu.MMLUSpec(subjects=("humanities__toy_treaties", "humanities__toy_treaties")).validate()


@pytest.mark.parametrize("controls", [-1, 100_000_000])
def test_controls_out_of_range_are_one_line(controls):
    """--controls 100000000 filled memory for minutes before the sweep began."""
    from lab.sweeps.axes import Options

    with pytest.raises(LabError, match=f"--controls: {controls} is out of range"):
        Options("heads", controls=controls).validate()
