import pytest
import torch

from lab.errors import LabError
from lab.interventions import Plan, apply_plan
from lab.models.tiny import byte_tokenizer
from lab.probes import mmlu
from lab.probes.mmlu import MMLUSpec, Question

from conftest import tiny

FIXTURE = Question("high_school_physics", 0, " What is the unit of force? ", ("joule", "newton", "watt", "pascal"), 1)
SHOT = Question("high_school_physics", 0, "Which is a vector?", ("mass", "speed", "velocity", "time"), 2)


def test_prompt_matches_lm_eval_byte_for_byte():
    expected = ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                "Which is a vector?\nA. mass\nB. speed\nC. velocity\nD. time\nAnswer: C\n\n"
                "What is the unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:")
    assert mmlu.prompt(FIXTURE, [SHOT]) == expected
    assert mmlu.prompt(FIXTURE, []).endswith("about high school physics.\n\nWhat is the unit of force?\nA. joule"
                                              "\nB. newton\nC. watt\nD. pascal\nAnswer:")


def test_categories():
    assert len(mmlu._SUBCATEGORY) == 57
    assert mmlu.category("college_physics") == "stem"
    assert mmlu.category("jurisprudence") == "humanities"
    assert mmlu.category("sociology") == "social_sciences"
    assert mmlu.category("nutrition") == "other"
    assert mmlu.category("humanities__toy_treaties") == "humanities"


def _write_original_layout(root):
    for split, rows in (("dev", 5), ("test", 3)):
        folder = root / "data" / split
        folder.mkdir(parents=True)
        for subject in ("anatomy", "astronomy"):
            lines = [f"{subject} question {i}?,w,x,y,z,{'ABCD'[i % 4]}" for i in range(rows)]
            (folder / f"{subject}_{split}.csv").write_text("\n".join(lines) + "\n")


def test_original_layout_loads(tmp_path):
    _write_original_layout(tmp_path)
    questions, dev = mmlu.load_questions(MMLUSpec(source=str(tmp_path), shots=5))
    assert [q.key for q in questions] == ["anatomy/0", "anatomy/1", "anatomy/2", "astronomy/0", "astronomy/1",
                                          "astronomy/2"]
    assert questions[1].answer == 1 and len(dev["anatomy"]) == 5
    limited, _ = mmlu.load_questions(MMLUSpec(source=str(tmp_path), subjects=("astronomy",), limit=2))
    assert [q.key for q in limited] == ["astronomy/0", "astronomy/1"]


def test_toy_set_loads():
    questions, dev = mmlu.load_questions(MMLUSpec())
    assert len(questions) == 200 and all(len(d) == 5 for d in dev.values())
    assert {mmlu.category(q.subject) for q in questions} == {"stem", "humanities", "social_sciences", "other"}


def test_hf_cache_layout_loads(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    snapshot = tmp_path / "datasets--cais--mmlu" / "snapshots" / "abc123"
    (snapshot / "all").mkdir(parents=True)
    (tmp_path / "datasets--cais--mmlu" / "refs").mkdir()
    (tmp_path / "datasets--cais--mmlu" / "refs" / "main").write_text("abc123")
    for split, n in (("dev", 5), ("test", 2)):
        table = pa.table({"question": [f"q{i}" for i in range(n)], "subject": ["virology"] * n,
                          "choices": [["a", "b", "c", "d"]] * n, "answer": [i % 4 for i in range(n)]})
        pq.write_table(table, snapshot / "all" / f"{split}-00000-of-00001.parquet")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    questions, dev = mmlu.load_questions(MMLUSpec(source="cais/mmlu"))
    assert [(q.key, q.answer) for q in questions] == [("virology/0", 0), ("virology/1", 1)]
    assert len(dev["virology"]) == 5


def test_missing_data_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(LabError, match="original release layout"):
        mmlu.load_questions(MMLUSpec(source=str(tmp_path)))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LabError, match="not in the HF cache"):
        mmlu.load_questions(MMLUSpec(source="cais/mmlu"))
    with pytest.raises(LabError, match="unknown subject"):
        mmlu.load_questions(MMLUSpec(subjects=("astrology",)))


def _score(loaded, items, batch_size, shots=2):
    scorer = mmlu.Scorer(loaded.tokenizer, shots)
    rows = []
    with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
        for i in range(0, len(items), batch_size):
            batch = [(q, scorer.ids(q, dev)) for q, dev in items[i:i + batch_size]]
            rows += mmlu.run_batch(loaded, scorer, batch, tracker)
    return rows


@pytest.mark.parametrize("arch", ["recurrent_gemma", "jamba"])
def test_right_padded_batches_equal_one_by_one(arch):
    loaded = tiny(arch)
    questions, dev = mmlu.load_questions(MMLUSpec(limit=2))
    items = [(q, dev[q.subject]) for q in questions]
    batched, single = _score(loaded, items, 8), _score(loaded, items, 1)
    assert len({r["tokens"] for r in batched}) > 1  # lengths differ, so the batch really was padded
    for a, b in zip(batched, single):
        assert a["prediction"] == b["prediction"]
        assert torch.allclose(torch.tensor(a["loglik"]), torch.tensor(b["loglik"]), atol=1e-3)


def test_one_forward_scores_all_four_choices():
    loaded = tiny("jamba")
    questions, dev = mmlu.load_questions(MMLUSpec(limit=1))
    q = questions[0]
    scorer = mmlu.Scorer(loaded.tokenizer, 0)
    row = _score(loaded, [(q, dev[q.subject])], 1, shots=0)[0]
    context = loaded.tokenizer(mmlu.prompt(q, []))["input_ids"]
    with torch.no_grad():
        for i, letter in enumerate("ABCD"):  # one forward per choice gives the same log-likelihoods
            cont = loaded.tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + cont])
            logp = loaded.model(input_ids=ids).logits[0, -2].log_softmax(-1)[cont[-1]]
            assert abs(float(logp) - row["loglik"][i]) < 1e-3
    assert scorer.choice_ids[1] == [65, 66, 67, 68]


def test_a_question_is_never_its_own_shot():
    """split = "dev" asks the questions the shots come from: each question's shots are the others (it had its
    own answer in its prompt and scored 100 %)."""
    questions, dev = mmlu.load_questions(MMLUSpec(split="dev", limit=2, shots=5))
    scorer = mmlu.Scorer(byte_tokenizer(), 5)
    for q in questions:
        text = scorer.tok.decode(scorer.ids(q, dev[q.subject]))
        assert text.count(q.question.strip()) == 1
        assert text.count("Answer: ") - 1 == len(dev[q.subject]) - 1  # the shots' answers, then the question's
