from lab.probes.heads import head_scores, keep_set, ranking, retrieval_hits
from lab.probes.needle import NeedleSpec

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


def test_scores_cover_every_head_and_mass_sees_the_needle():
    loaded = tiny("jamba")  # full attention: the needle is always visible
    scores = head_scores(loaded, NeedleSpec(task="passkey", lengths=(300,), depths=(50,), max_new_tokens=4))
    assert set(scores) == {(2, h) for h in range(4)}
    for value in scores.values():
        assert 0 < value["needle_mass"] < 1 and value["entropy"] > 0 and value["retrieval"] >= 0
