"""One model, one job at a time: overlapping plans and concurrent jobs must not corrupt the weights."""

import threading
from contextlib import ExitStack

import pytest
import torch

from lab.errors import LabError
from lab.interventions import Plan, apply_plan

from conftest import tiny


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_second_plan_on_the_same_model_is_refused_and_weights_restored():
    """Two plans entered and left out of order once left head 0 zeroed for the rest of the session."""
    loaded = tiny("jamba")
    model, anatomy = loaded.model, loaded.anatomy
    layer = anatomy.attention_layers[0]
    before = snapshot(model)
    stack = ExitStack()
    stack.enter_context(apply_plan(model, anatomy, Plan(heads_off=((layer, 0),))))
    with pytest.raises(LabError, match="already active"):
        with apply_plan(model, anatomy, Plan(heads_off=((layer, 0), (layer, 1)))):
            pass
    stack.close()
    assert same_weights(model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def head_off_preset():
    from lab import presets
    from lab.models import ModelSpec
    from lab.probes.needle import NeedleSpec

    return presets.Preset(model=ModelSpec("random:jamba"), plan={"heads_off": [[2, 0], [2, 1]]},
                          needle=NeedleSpec(task="passkey", lengths=(300, 400), depths=(0, 100), mode="fast",
                                            batch_size=1))


def test_two_jobs_started_together_one_is_refused_and_weights_restored(tmp_path):
    from lab.session import Busy, Session
    from lab.store import Store

    session = Session(tiny("jamba"))
    before = snapshot(session.loaded.model)
    store = Store(tmp_path / "r.sqlite")
    start = threading.Barrier(2)
    outcomes = {}

    def job(name):
        start.wait()
        try:
            with session.claim(name) as claimed:
                outcomes[name] = list(session.run(head_off_preset(), store, claimed))[-1].status
        except Busy as error:
            outcomes[name] = error

    threads = [threading.Thread(target=job, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [name for name, outcome in outcomes.items() if isinstance(outcome, Busy)]
    finished = [name for name, outcome in outcomes.items() if outcome == "done"]
    assert len(refused) == 1 and len(finished) == 1
    assert f"{finished[0]} is running" in str(outcomes[refused[0]])
    assert session.job is None
    assert same_weights(session.loaded.model, before)
    assert len(store.trials(store.runs()[0]["id"])) == 4


def test_a_claim_during_a_run_is_refused_and_cancel_keeps_finished_trials(tmp_path):
    from lab.runner import Finished, Progress
    from lab.session import Busy, Session
    from lab.store import Store

    session = Session(tiny("jamba"))
    before = snapshot(session.loaded.model)
    store = Store(tmp_path / "r.sqlite")
    assert session.cancel() is None  # nothing to cancel
    job = session.claim("needle probe")
    events = session.run(head_off_preset(), store, job)
    next(events)  # Started
    assert isinstance(next(events), Progress) and job.done == 1 and job.total == 4
    with pytest.raises(Busy, match="needle probe is running"):
        session.claim("mmlu probe")
    assert session.cancel() is job
    rest = list(events)
    assert isinstance(rest[-1], Finished) and rest[-1].status == "cancelled"
    assert session.job is None and session.claim("next").name == "next"
    assert len(store.trials(rest[-1].run_id)) == 1
    assert same_weights(session.loaded.model, before)


@pytest.mark.parametrize("phase", ["both", "generation"])  # lab's fixed-buffer decoder / transformers' generate()
def test_a_cancel_while_a_batch_decodes_stops_it_at_the_next_step_and_drops_it(tmp_path, phase):
    """Quitting waited for the whole batch (a GPU batch of 256 prompts: most of a minute). Now decoding stops
    at its next step, the cut batch is not stored, and the same preset resumes to the full run."""
    from lab import presets, runner
    from lab.models import ModelSpec
    from lab.probes.needle import NeedleSpec
    from lab.store import Store

    loaded = tiny("recurrent_gemma")
    preset = presets.Preset(name="cut", model=ModelSpec("random:recurrent_gemma"), plan={"phase": phase},
                            needle=NeedleSpec(task="passkey", lengths=(300,), depths=(0, 50, 100), trials=2,
                                              max_new_tokens=24, batch_size=6))
    store, cancel, steps = Store(tmp_path / "r.sqlite"), threading.Event(), []

    def count_steps(module, args, kwargs):
        if kwargs["input_ids"].shape[-1] == 1:
            steps.append(1)
            if len(steps) == 3:
                cancel.set()

    handle = loaded.model.register_forward_pre_hook(count_steps, with_kwargs=True)
    try:
        cut = list(runner.run(preset, store, loaded, cancel))
    finally:
        handle.remove()
    assert cut[-1].status == "cancelled" and store.trials(cut[-1].run_id) == []
    assert len(steps) <= 4  # not the 23 decoding steps of the batch (one generate() call per prompt length)
    done = list(runner.run(preset, store, loaded))[-1]
    assert done.status == "done" and done.run_id == cut[-1].run_id and len(store.trials(done.run_id)) == 6
