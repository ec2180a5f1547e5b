"""Sweeps spread over torch.distributed workers (gloo, two processes on the CPU): the same results as one
process, every trial stored once by rank 0, a failing worker named in one line, and the same command resumes.
Process start-up is slow on a small CPU, so each test launching workers checks several things."""

import json
import sqlite3

import pytest

from lab import presets
from lab.cli import main
from lab.probes.mmlu import MMLUSpec
from lab.probes.needle import NeedleSpec
from lab.sweeps import distributed

PRESET = """name = "spread"
[model]
name = "random:recurrent_gemma"
[needle]
task = "passkey"
lengths = [300]
depths = [0, 100]
mode = "fast"
max_new_tokens = 6
batch_size = 2
"""
MMLU = '[mmlu]\nsource = "toy"\nlimit = 1\nshots = 1\nbatch_size = 3\n'
HEADS = '[heads]\nlengths = [300]\ndepths = [50]\ntrials = 1\nmax_new_tokens = 6\n'


def preset_file(tmp_path, text=PRESET) -> str:
    path = tmp_path / "spread.toml"
    path.write_text(text)
    return str(path)


def trials(db) -> dict:
    """{(run fingerprint, probe, key): trial data} of a results database, and the number of rows."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT r.fingerprint, t.probe, t.key, t.data, t.created FROM trials t "
                            "JOIN runs r ON r.id = t.run_id").fetchall()
    return {(fp, probe, key): (json.loads(data), created) for fp, probe, key, data, created in rows}, len(rows)


def without_run(condition: dict) -> dict:
    """A condition's result without its run id (a resumed run's row id may differ from a fresh one's)."""
    return {k: v for k, v in condition.items() if k != "run"}


def statuses(db) -> tuple[list, list]:
    with sqlite3.connect(db) as conn:
        return (conn.execute("SELECT name, status FROM runs ORDER BY id").fetchall(),
                conn.execute("SELECT status FROM sweeps").fetchall())


@pytest.mark.slow
def test_two_workers_give_the_sweep_of_one_process_and_store_every_trial_once(tmp_path, capfd):
    """keep-top: head scoring spread first, then the conditions (one control repeats nothing here), with
    needle and MMLU per condition; --json prints nothing but the JSON, on stdout, from rank 0 alone."""
    command = ["sweep", preset_file(tmp_path, PRESET + MMLU + HEADS), "--over", "keep-top", "--values", "25,50",
               "--controls", "1", "--json"]
    one, two = tmp_path / "one.sqlite", tmp_path / "two.sqlite"
    assert main(command + ["--db", str(one)]) == 0
    single = json.loads(capfd.readouterr().out)
    assert main(command + ["--nproc", "2", "--db", str(two)]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    spread = json.loads(out)
    assert spread["conditions"] == single["conditions"] and spread["base"] == single["base"]
    assert len(spread["conditions"]) == 4 and all(c["status"] == "done" for c in spread["conditions"])
    assert all(c["needle"]["trials"] == 2 and c["mmlu"]["trials"] > 3 for c in spread["conditions"])
    (by_one, rows_one), (by_two, rows_two) = trials(one), trials(two)
    assert rows_two == len(by_two) == rows_one  # each trial once
    assert {k: data for k, (data, _) in by_two.items()} == {k: data for k, (data, _) in by_one.items()}
    assert any(probe == "heads" for _, probe, _ in by_two)  # the head scores were spread too
    assert statuses(two) == statuses(one)


@pytest.mark.slow
def test_a_failing_worker_ends_the_sweep_naming_its_rank_and_the_same_command_resumes(tmp_path, capfd,
                                                                                       monkeypatch):
    db = tmp_path / "r.sqlite"
    command = ["sweep", preset_file(tmp_path), "--over", "heads", "--layers", "2", "--nproc", "2", "--db", str(db)]
    monkeypatch.setenv(distributed.FAIL_RANK, "1")  # rank 1 fails its second task: round 2 of 3
    assert main(command) == 2
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == ("lab: sweep worker rank 1 failed (RuntimeError: failure injected by LAB_SWEEP_FAIL_RANK); "
                       "what was stored is kept: run the same command again to resume")
    assert not any("Traceback" in line for line in err)
    runs, [(sweep,)] = statuses(db)
    assert sweep == "failed" and [status for _, status in runs] == ["done", "done", "done", "failed"]
    stored, count = trials(db)
    assert count == 6  # base, h0 (round 1), h1 (rank 0's task of round 2): two trials each

    monkeypatch.delenv(distributed.FAIL_RANK)
    assert main(command) == 0
    out = capfd.readouterr().out
    assert "sweep 1 (done)" in out and "4 trials in" in out and "on 2 replicas" in out  # h2 and h3 only
    resumed, count = trials(db)
    assert count == len(resumed) == 10 and all(resumed[key] == row for key, row in stored.items())
    runs, [(sweep,)] = statuses(db)
    assert sweep == "done" and len(runs) == 5 and {status for _, status in runs} == {"done"}
    assert main(["sweep", preset_file(tmp_path), "--over", "heads", "--layers", "2", "--json",
                 "--db", str(tmp_path / "one.sqlite")]) == 0
    single = json.loads(capfd.readouterr().out)
    assert main(["sweeps", "1", "--json", "--db", str(db)]) == 0
    resumed_result = json.loads(capfd.readouterr().out)["conditions"]
    assert [without_run(c) for c in resumed_result] == [without_run(c) for c in single["conditions"]]


def test_one_rank_world_runs_the_sweep_as_one_process_does_sharing_repeated_plans(tmp_path, capsys, monkeypatch):
    """torchrun's entry with WORLD_SIZE=1, in this process: the distributed Execute alone (no start-up cost);
    controls that repeat a condition share its run, as in one process; a second time everything is skipped."""
    import socket

    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    command = ["sweep", preset_file(tmp_path), "--over", "kv-heads", "--controls", "2", "--json"]
    assert main(command + ["--db", str(tmp_path / "one.sqlite")]) == 0
    single = json.loads(capsys.readouterr().out)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    db = tmp_path / "world.sqlite"
    for _ in range(2):
        assert main(command + ["--db", str(db)]) == 0
        ranked = json.loads(capsys.readouterr().out)
        assert ranked["conditions"] == single["conditions"] and len(ranked["conditions"]) == 6
    runs, _ = statuses(db)
    assert len(runs) == 3 and trials(db)[1] == 6


@pytest.mark.parametrize("argv, env, message", [
    (["--nproc", "0"], {}, "--nproc and --gpus-per-replica must be at least 1"),
    (["--gpus-per-replica", "2"], {}, "--gpus-per-replica 2 with device auto needs GPUs; none is visible here"),
    (["--nproc", "2"], {"RANK": "0", "WORLD_SIZE": "2"}, "this process is a torch.distributed worker already"),
])
def test_bad_placement_is_one_line_before_any_worker_starts(tmp_path, capsys, monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["sweep", preset_file(tmp_path), "--over", "heads", *argv, "--db", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "r.sqlite").exists()


def test_a_database_lab_cannot_write_fails_before_any_worker_starts(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["sweep", preset_file(tmp_path), "--over", "heads", "--nproc", "2", "--db", str(folder)]) == 2
    assert f"cannot open the results database {folder}" in capsys.readouterr().err


def test_replicas_must_fit_the_visible_gpus_and_the_preset_device(monkeypatch):
    from lab.errors import LabError
    from lab.models import ModelSpec

    monkeypatch.setattr(distributed, "gpus", lambda: ["0", "1"])
    assert distributed.check_devices(ModelSpec(device="auto"), 2, 1) is True
    assert distributed.check_devices(ModelSpec(device="cpu"), 4, 1) is False  # CPU replicas, gloo
    with pytest.raises(LabError, match="2 replicas x 2 GPUs need 4 GPUs; 2 are visible here"):
        distributed.check_devices(ModelSpec(device="auto"), 2, 2)
    with pytest.raises(LabError, match="device 'cuda:1' does not fit --nproc"):
        distributed.check_devices(ModelSpec(device="cuda:1"), 2, 1)


def test_tasks_are_batches_or_even_shares_of_at_most_auto_chunk():
    fixed = presets.Preset(name="a", needle=NeedleSpec(batch_size=2), mmlu=MMLUSpec())
    auto = presets.Preset(name="b", needle=NeedleSpec())
    tasks = distributed._tasks([fixed, auto], [{"needle": 5, "mmlu": 40}, {"needle": 130}], ranks=2)
    spans = [(t.job, t.probe, t.start, t.stop) for t in tasks]
    assert spans[:3] == [(0, "needle", 0, 2), (0, "needle", 2, 4), (0, "needle", 4, 5)]
    assert spans[3:5] == [(0, "mmlu", 0, 40), (1, "needle", 0, 64)]  # 175 trials over 2 ranks: 64 at most
    assert spans[5:] == [(1, "needle", 64, 128), (1, "needle", 128, 130)]
    few = distributed._tasks([auto], [{"needle": 6}], ranks=4)
    assert [(t.start, t.stop) for t in few] == [(0, 2), (2, 4), (4, 6)]
