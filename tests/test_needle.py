import random

import pytest
from lab.errors import LabError
from lab.interventions import Plan, apply_plan
from lab.probes import needle, scoring
from lab.probes.needle import NeedleSpec, PromptBuilder

from conftest import tiny


@pytest.fixture(scope="module")
def tok():
    return tiny("recurrent_gemma").tokenizer


@pytest.mark.parametrize("task", needle.TASKS)
@pytest.mark.parametrize("jrt", [False, True])
def test_prompt_lengths_are_exact(tok, task, jrt):
    builder = PromptBuilder(tok, NeedleSpec(task=task, jrt=jrt, keys=2))
    for length in (1200, 1201, 1537):
        for depth in (0, 37, 100):
            trial = builder.build(length, depth, 0)
            assert len(trial.ids) == length
            assert len(trial.needle_spans) >= (2 if jrt else 1)


@pytest.mark.parametrize("task", ["sentence", "passkey", "multikey"])
def test_needle_sits_at_depth_on_a_sentence_boundary(tok, task):
    builder = PromptBuilder(tok, NeedleSpec(task=task))
    for depth in (0, 25, 50, 75, 100):
        trial = builder.build(2000, depth, 0)
        start, end = trial.needle_spans[0]
        assert trial.values[0] in tok.decode(trial.ids[start:end])  # the real needle holds the answer
        before = tok.decode(trial.ids[:start]).rstrip()
        if depth < 100:  # depth 100 appends after the (cut) end of the haystack, as gkamradt's harness does
            assert before.endswith((".", ":")), before[-30:]
        if task != "multikey":  # distractor needles shift the real one; without them it sits at the depth
            (c0, c1), = trial.contexts
            haystack = (c1 - c0) - (end - start)
            target = int(haystack * depth / 100)
            assert target - 100 <= start - c0 <= target  # moved back by less than one sentence (< 100 bytes)


def test_depths_written_as_floats_are_the_same_trials_and_the_same_run(tok):
    """The console's form reads depths as floats (50.0), a preset file as integers (50): the same prompts, the
    same results (fingerprint), the same depths stored."""
    from lab import presets

    ints = NeedleSpec(task="passkey", depths=(0, 50, 12.5))
    floats = NeedleSpec(task="passkey", depths=(0.0, 50.0, 12.5))
    assert floats.depths == (0, 50, 12.5) and [type(d) for d in floats.depths] == [int, int, float]
    for depth_int, depth_float in zip(ints.depths, (0.0, 50.0, 12.5)):
        a, b = (PromptBuilder(tok, ints).build(800, d, 0) for d in (depth_int, depth_float))
        assert (a.ids, a.answer) == (b.ids, b.answer)
    assert (presets.Preset(name="a", needle=ints).fingerprint()
            == presets.Preset(name="a", needle=floats).fingerprint())


def test_prompts_are_deterministic_and_vary_by_trial(tok):
    a = PromptBuilder(tok, NeedleSpec(task="passkey")).build(800, 50, 0)
    b = PromptBuilder(tok, NeedleSpec(task="passkey")).build(800, 50, 0)
    c = PromptBuilder(tok, NeedleSpec(task="passkey")).build(800, 50, 1)
    assert a.ids == b.ids and a.ids != c.ids and a.answer != c.answer


def test_sentence_prompt_matches_the_paper_format(tok):
    trial = PromptBuilder(tok, NeedleSpec()).build(1000, 50, 0)
    text = tok.decode(trial.ids)
    assert text.startswith("CONTEXT: ")
    assert text.endswith("\n\nQUESTION: What is the best thing to do in San Francisco?\n\n"
                         "ANSWER: Here is the most relevant sentence in the context:")
    assert trial.answer == " " + needle.PAPER_NEEDLE


def test_jrt_repeats_the_context(tok):
    trial = PromptBuilder(tok, NeedleSpec(jrt=True)).build(1500, 50, 0)
    text = tok.decode(trial.ids)
    assert text.count("CONTEXT:") == 2 and text.count("QUESTION:") == 2 and text.count("ANSWER:") == 1


def test_too_short_is_one_line(tok):
    with pytest.raises(LabError, match="too short"):
        PromptBuilder(tok, NeedleSpec(task="multiquery")).build(100, 0, 0)


def test_user_haystack(tok, tmp_path):
    (tmp_path / "a.txt").write_text("Alpha beta gamma. Delta epsilon zeta. Eta theta iota.")
    trial = PromptBuilder(tok, NeedleSpec(task="passkey", haystack=str(tmp_path))).build(600, 50, 0)
    assert "Delta epsilon zeta." in tok.decode(trial.ids)
    with pytest.raises(LabError, match="not found"):
        PromptBuilder(tok, NeedleSpec(task="passkey", haystack=str(tmp_path / "nope"))).build(600, 50, 0)


def test_scoring_on_hand_made_outputs():
    answer = needle.PAPER_NEEDLE
    assert scoring.paper_score(" the best thing to do in san francisco is eat a sandwich and sit in dolores park "
                               "on a sunny day", answer) == 5
    assert scoring.paper_score("Eat a sandwich, then sit in Dolores Park.", answer) == 2
    assert scoring.paper_score("Go to Dolores Park on a sunny day!", answer) == 1.5
    assert scoring.paper_score("I do not know", answer) == 0
    assert scoring.exact("The pass key is 12345.", "12345") == 1
    assert scoring.exact("1234", "12345") == 0
    # exact: the answer as a whole word sequence; contains: anywhere (the README's "330400" and "33040")
    assert scoring.exact(" 330400", "33040") == 0 and scoring.contains(" 330400", "33040") == 1
    assert scoring.exact(" 82411Rh", "82411") == 0 and scoring.contains(" 82411Rh", "82411") == 1
    assert scoring.exact("Eat a sandwich and sit in Dolores Park!", "sit in dolores park") == 1
    assert scoring.fraction_found("values: 111, 333", ["111", "222", "333", "444"]) == 0.5


def _run(loaded, spec, trials):
    with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
        return needle.run_batch(loaded, spec, trials, tracker)


@pytest.mark.parametrize("arch", ["jamba", "recurrent_gemma"])  # generate() / lab's static decoder
def test_batched_equals_unbatched(arch):
    loaded = tiny(arch)
    for mode in ("generate", "fast"):
        spec = NeedleSpec(task="passkey", mode=mode, max_new_tokens=6)
        builder = PromptBuilder(loaded.tokenizer, spec)
        trials = [builder.build(length, d, 0) for length, d in ((400, 0), (300, 50), (400, 100), (350, 30))]
        batched = _run(loaded, spec, trials)
        single = [_run(loaded, spec, [t])[0] for t in trials]
        assert [r["output"] for r in batched] == [r["output"] for r in single]


def test_fast_mode_agrees_with_generation_on_which_trials_pass():
    """Trials whose expected answer is the model's own greedy continuation pass in both modes; others fail."""
    loaded = tiny("recurrent_gemma")
    gen_spec = NeedleSpec(task="passkey", mode="generate", max_new_tokens=5)
    builder = PromptBuilder(loaded.tokenizer, gen_spec)
    trials = [builder.build(400, d, i) for i, d in enumerate((0, 30, 60, 100))]
    greedy = _run(loaded, gen_spec, trials)
    rng = random.Random(0)
    for i, (trial, row) in enumerate(zip(trials, greedy)):
        if i % 2 == 0:  # make the expected answer the model's own continuation
            ids = loaded.tokenizer(row["output"], add_special_tokens=False)["input_ids"]
            trial.answer = loaded.tokenizer.decode(ids)
            trial.values = [trial.answer.strip()]
        else:
            trial.values = [str(rng.randint(10**8, 10**9))]
    gen = _run(loaded, gen_spec, trials)
    fast = _run(loaded, NeedleSpec(task="passkey", mode="fast", max_new_tokens=5), trials)
    assert [r["exact"] for r in gen] == [r["exact"] for r in fast] == [1.0, 0.0, 1.0, 0.0]


def test_chat_template_prompt_keeps_exact_length(tok):
    from lab.models.tiny import byte_tokenizer

    chat = byte_tokenizer()
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    builder = PromptBuilder(chat, NeedleSpec(chat=True))
    trial = builder.build(1200, 50, 0)
    text = chat.decode(trial.ids)
    assert len(trial.ids) == 1200
    assert text.startswith("<|user|>\nCONTEXT:") and "<|assistant|>\nANSWER: Here is the most relevant" in text
    start, end = trial.needle_spans[0]
    assert needle.PAPER_NEEDLE in chat.decode(trial.ids[start:end])
    with pytest.raises(LabError, match="no chat template"):
        PromptBuilder(tok, NeedleSpec(chat=True)).build(1200, 50, 0)


def test_probes_ask_logits_only_where_they_score():
    """The output projection sees one position per MMLU question and per generated prefill, and the answer
    span under teacher forcing: a 256k vocabulary over every prompt position would not fit in memory."""
    from lab.probes import mmlu

    loaded = tiny("recurrent_gemma")
    seen = []
    handle = loaded.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
    try:
        questions, dev = mmlu.load_questions(mmlu.MMLUSpec(limit=1))
        scorer = mmlu.Scorer(loaded.tokenizer, 2)
        items = [(q, scorer.ids(q, dev[q.subject])) for q in questions[:3]]
        with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
            mmlu.run_batch(loaded, scorer, items, tracker)
            assert seen == [(3, 1)]
            spec = NeedleSpec(task="passkey", mode="fast")
            trial = PromptBuilder(loaded.tokenizer, spec).build(300, 50, 0)
            answer = len(loaded.tokenizer(trial.answer, add_special_tokens=False)["input_ids"])
            needle.run_batch(loaded, spec, [trial], tracker)
            assert seen[1] == (1, answer + 1)
            needle.run_batch(loaded, NeedleSpec(task="passkey", max_new_tokens=3), [trial], tracker)
            assert seen[2:] == [(1, 1)] * 3  # prefill, then one position per decode step
    finally:
        handle.remove()


def test_user_haystack_is_read_once_per_file_version(tmp_path, monkeypatch):
    from lab.probes import haystack

    reads = []
    real = haystack.read_text
    monkeypatch.setattr(haystack, "read_text", lambda *args: reads.append(args) or real(*args))
    path = tmp_path / "h.txt"
    path.write_text("First one. Second one.")
    builder = PromptBuilder(tiny("recurrent_gemma").tokenizer, NeedleSpec(task="passkey", haystack=str(path)))
    for depth in (0, 50, 100):
        builder.build(300, depth, 0)
    assert len(reads) == 1
    path.write_text("First one. Second one, changed.")
    assert next(haystack.file_sentences(path)) == "First one." and len(reads) == 2


@pytest.mark.parametrize("task, output, exact, contains", [
    ("passkey", " 330400", 0.0, 1.0), ("passkey", " 33040, then more", 1.0, 1.0), ("passkey", " 3304", 0.0, 0.0)])
def test_a_trials_exact_score_is_the_whole_answer_and_contains_is_kept_apart(task, output, exact, contains):
    """A longer number that holds the key scored exact (1.0) although the README says it does not."""
    trial = needle.Trial("k", 300, 50, 0, [], " 33040", ["33040"])
    result = needle.score(trial, output, task)
    assert (result["exact"], result["contains"]) == (exact, contains)
