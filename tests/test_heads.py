from lab import presets
from lab.models import ModelSpec
from lab.probes.heads import HeadsSpec, keep_set, ranking, retrieval_hits, scores
from lab.runner import Finished, Progress, run
from lab.store import Store

from conftest import tiny


def test_retrieval_hits_count_copies_from_the_needle():
    ids = [5, 6, 7, 8, 9, 1, 2]
    span = {1, 2, 3}
    answer = [6, 8, 9]
    assert retrieval_hits([1, 3, 4], ids, answer, span) == 2  # 4 is outside the needle
    assert retrieval_hits([2, 3, 3], ids, answer, span) == 1  # position 2 holds 7, not 6


def test_ranking_and_keep_set():
    scores = {(2, 0): {"retrieval": 0.1, "entropy": 2.0, "needle_mass": 0.3},
              (2, 1): {"retrieval": 0.5, "entropy": 1.0, "needle_mass": 0.1},
              (5, 0): {"retrieval": 0.0, "entropy": 3.0, "needle_mass": 0.9}}
    assert [h for h, _ in ranking(scores, "retrieval")] == [(2, 1), (2, 0), (5, 0)]
    assert [h for h, _ in ranking(scores, "entropy")] == [(2, 1), (2, 0), (5, 0)]
    assert [h for h, _ in ranking(scores, "needle_mass")] == [(5, 0), (2, 0), (2, 1)]
    assert keep_set(ranking(scores, "needle_mass"), 0.15) == [(5, 0)]


def test_head_scoring_is_a_stored_run_covering_every_head(tmp_path):
    loaded = tiny("jamba")  # full attention: the needle is always visible
    preset = presets.Preset(model=ModelSpec("random:jamba"),
                            heads=HeadsSpec(lengths=(300,), depths=(10, 50, 90), trials=1, max_new_tokens=6))
    store = Store(tmp_path / "r.sqlite")
    events = list(run(preset, store, loaded))
    assert sum(isinstance(e, Progress) for e in events) == 1 and isinstance(events[-1], Finished)
    run_id = events[-1].run_id
    rows = store.trials(run_id, "heads")
    assert [r["key"] for r in rows] == ["passkey/L300/d10/t0", "passkey/L300/d50/t0", "passkey/L300/d90/t0"]
    assert set(rows[0]["heads"]) == {f"L2.attn.h{h}" for h in range(4)}
    found = scores(events[-1].summary["heads"])
    assert set(found) == {(2, h) for h in range(4)}
    for value in found.values():
        assert 0 < value["needle_mass"] < 1 and value["entropy"] > 0 and value["retrieval"] >= 0
    again = list(run(preset, store, loaded))  # resumed: nothing left to score, same summary
    assert not any(isinstance(e, Progress) for e in again)
    assert again[-1].summary == events[-1].summary


def test_head_scores_are_taken_under_the_plans_needle_attention(tmp_path):
    """With the needle omitted in both phases no head puts weight on it (the op had no needle to find: head
    scoring did not hand the prompts' needle spans to the plan)."""
    loaded = tiny("jamba")
    heads = HeadsSpec(lengths=(300,), depths=(50,), trials=1, max_new_tokens=6)
    for plan, omitted in (({}, False), ({"needle_attention": {"generation": "omit", "prefill": "follow"}}, True)):
        preset = presets.Preset(model=ModelSpec("random:jamba"), plan=plan, heads=heads)
        events = list(run(preset, Store(tmp_path / "r.sqlite"), loaded))
        masses = [value["needle_mass"] for value in scores(events[-1].summary["heads"]).values()]
        assert all(mass == 0 for mass in masses) if omitted else all(mass > 0 for mass in masses)
