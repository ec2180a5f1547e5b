"""The paper's protocols, exactly (issue 17): each option of NeedleSpec / MMLUSpec against the authors' code.

The expected prompts are written from the authors' prompt builder (lamalunderscore/NIAH, Needle_test/prompt.py):
    prompt = f"CONTEXT: {context}\n\nQUESTION: {question}"
    if is_jrt: prompt += f"\n\n{prompt}"
    base: prompt += "\n\nANSWER: Here is the most relevant sentence in the context: "
    chat: prompt += " Output the most relevant sentence in the context, word by word!"   (one user turn)
with context = haystack + "\n{needle}\n" cut to length - 200 tokens.
"""

import re

import pytest
import torch
from lab import presets
from lab.errors import LabError
from lab.interventions import Plan, apply_plan
from lab.models.tiny import byte_tokenizer
from lab.probes import needle, scoring
from lab.probes.needle import PAPER_NEEDLE, PAPER_QUESTION, NeedleSpec, PromptBuilder

from conftest import tiny

INSTRUCTION = "Output the most relevant sentence in the context, word by word!"
PAPER_BASE = dict(length_counts="context", buffer=200, needle_wrap="newline",
                  answer_prefix="Here is the most relevant sentence in the context: ")
PAPER_CHAT = dict(length_counts="context", buffer=200, needle_wrap="newline", chat=True, instruction=INSTRUCTION,
                  answer_line=False)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny("recurrent_gemma").tokenizer  # bytes: decode(ids) is the prompt text exactly


@pytest.fixture(scope="module")
def chat_tok():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def paper_prompt(context: str, jrt: bool = False, chat: bool = False) -> str:
    """Needle_test/prompt.py's evaluate_and_log, before the chat template."""
    prompt = f"CONTEXT: {context}\n\nQUESTION: {PAPER_QUESTION}"
    if jrt:
        prompt += f"\n\n{prompt}"
    return prompt + (f" {INSTRUCTION}" if chat else "\n\nANSWER: Here is the most relevant sentence in the context: ")


def context_text(tok, trial, copy: int = 0) -> str:
    """The context as the paper's template sees it (lab's context starts with the space after "CONTEXT:")."""
    start, end = trial.contexts[copy]
    text = tok.decode(trial.ids[start:end])
    assert text.startswith((" ", "\n"))
    return text.removeprefix(" ")


# ---- 1. just-read-twice: the whole block of the full-length context, twice ------------------------------

def test_paper_jrt_repeats_the_full_length_context_block(tok):
    single = PromptBuilder(tok, NeedleSpec(**PAPER_BASE)).build(1000, 50, 0)
    twice = PromptBuilder(tok, NeedleSpec(jrt=True, jrt_form="repeat", **PAPER_BASE)).build(1000, 50, 0)
    context = context_text(tok, single)
    assert tok.decode(twice.ids) == paper_prompt(context, jrt=True)
    assert [context_text(tok, twice, i) for i in (0, 1)] == [context, context]
    assert len(twice.ids) > 1.9 * len(single.ids)
    assert len(twice.needle_spans) == 2


def test_repeat_form_counted_by_prompt_gives_each_copy_the_single_prompts_context(tok):
    """jrt_form = "repeat" with lab's length rule: each copy holds the context of a `length`-token prompt."""
    single = PromptBuilder(tok, NeedleSpec()).build(900, 30, 0)
    twice = PromptBuilder(tok, NeedleSpec(jrt=True, jrt_form="repeat")).build(900, 30, 0)
    assert len(single.ids) == 900
    assert [context_text(tok, twice, i) for i in (0, 1)] == [context_text(tok, single)] * 2
    split = PromptBuilder(tok, NeedleSpec(jrt=True)).build(900, 30, 0)  # lab's default: the copies share 900
    assert len(split.ids) == 900


# ---- 2. Jamba's chat prompt -----------------------------------------------------------------------------

@pytest.mark.parametrize("jrt", [False, True])
def test_paper_chat_prompt_is_one_user_turn_with_the_instruction(chat_tok, jrt):
    spec = NeedleSpec(jrt=jrt, jrt_form="repeat", **PAPER_CHAT)
    trial = PromptBuilder(chat_tok, spec).build(1200, 50, 0)
    content = paper_prompt(context_text(chat_tok, trial), jrt=jrt, chat=True)
    assert chat_tok.decode(trial.ids) == f"<|user|>\n{content}\n<|assistant|>\n"  # nothing after the turn opens
    assert chat_tok.decode(trial.ids).count(INSTRUCTION) == 1
    assert trial.answer == PAPER_NEEDLE  # a fresh assistant turn: no leading space


def test_lab_chat_prompt_keeps_its_answer_line(chat_tok):
    trial = PromptBuilder(chat_tok, NeedleSpec(chat=True)).build(1200, 50, 0)
    text = chat_tok.decode(trial.ids)
    assert text.endswith("\n<|assistant|>\nANSWER: Here is the most relevant sentence in the context:")
    assert INSTRUCTION not in text and len(trial.ids) == 1200


# ---- 4. the 200-token buffer ------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [300, 677, 4096])
def test_buffer_leaves_haystack_plus_needle_at_length_minus_200(tok, length):
    """At the paper's L = 250 about 30 haystack tokens remain with SentencePiece; 98 bytes of needle need L >= 298."""
    trial = PromptBuilder(tok, NeedleSpec(**PAPER_BASE)).build(length, 50, 0)
    (c0, c1), = trial.contexts
    (n0, n1), = trial.needle_spans
    assert c1 - c0 == length - 200 and n1 - n0 == len(f"\n{PAPER_NEEDLE}\n")
    with pytest.raises(LabError, match="too short"):
        PromptBuilder(tok, NeedleSpec(**PAPER_BASE)).build(200 + n1 - n0 - 1, 50, 0)


def test_buffer_under_the_prompt_rule_shortens_the_prompt(tok):
    assert len(PromptBuilder(tok, NeedleSpec(buffer=128)).build(1000, 50, 0).ids) == 872


# ---- 5. needle and prompt text ----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 44, 100])
def test_paper_needle_is_wrapped_in_newlines_after_a_full_stop(tok, depth):
    trial = PromptBuilder(tok, NeedleSpec(**PAPER_BASE)).build(1105, depth, 0)
    text = tok.decode(trial.ids)
    (start, end), = trial.needle_spans
    assert tok.decode(trial.ids[start:end]) == f"\n{PAPER_NEEDLE}\n"
    before = tok.decode(trial.ids[:start])
    if depth == 100:  # appended after the cut haystack, as the paper's insert_needle does
        assert end == trial.contexts[0][1]
    else:
        assert before.endswith("CONTEXT:" if depth == 0 else ".")
    assert text.endswith("\n\nANSWER: Here is the most relevant sentence in the context: ")  # trailing space
    assert trial.answer == PAPER_NEEDLE  # the prompt ends with the space: the answer starts without one


def test_lab_needle_keeps_its_space(tok):
    trial = PromptBuilder(tok, NeedleSpec()).build(1105, 44, 0)
    (start, end), = trial.needle_spans
    assert tok.decode(trial.ids[start:end]) == " " + PAPER_NEEDLE and trial.answer == " " + PAPER_NEEDLE


# ---- 6. file haystacks as written -------------------------------------------------------------------------

def test_file_haystack_keeps_paragraphs_and_joins_files_as_the_paper(tok, tmp_path):
    (tmp_path / "a.txt").write_text("February 2020\n\nWhat should an essay be? Many say persuasive.\n\n"
                                    "That's what we were taught.\n")
    (tmp_path / "b.txt").write_text("March 2006Rich people. Poor people.")
    spec = NeedleSpec(task="passkey", haystack=str(tmp_path))
    trial = PromptBuilder(tok, spec).build(600, 100, 0)
    text = tok.decode(trial.ids)
    assert (" February 2020\n\nWhat should an essay be? Many say persuasive.\n\nThat's what we were taught.\n"
            "March 2006Rich people. Poor people.February 2020") in text


# ---- 9. the paper's scoring -------------------------------------------------------------------------------

def _compute_score(prediction: str, reference: str) -> float:
    """The authors' Needle_test/eval.py compute_score, as written there."""
    def clean_text(text):
        text = text.lower()
        text = re.sub(r"[^\w\s]", "", text)
        return re.sub(r"\s+", " ", text).strip()

    ref, pred = clean_text(reference), clean_text(prediction)
    score = 0
    if "eat a sandwich" in pred:
        score += 1
    if "dolores park" in pred:
        score += 0.5
        if "sit in dolores park" in pred:
            score += 0.5
    if "on a sunny day" in pred:
        score += 1
    if ref in pred:
        score = 5
    return score


EDGE_CASES = [
    PAPER_NEEDLE, PAPER_NEEDLE.upper(), "The best thing to do in San-Francisco is eat a sandwich and sit in "
    "Dolores Park on a sunny day.", "eat a sandwich, sit in Dolores-Park", "Dolores-Park on a sunny-day",
    "Eat a sandwich and sit in Dolores Park.", "sit in dolores park on a sunny day!", "I don't know.",
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day, "
    "obviously.", "eat a sandwich…sit in Dolores Park", "Dolores Park's lawn on a sunny day", "",
]


def test_paper_score_is_the_authors_compute_score():
    assert [scoring.paper_score(out, PAPER_NEEDLE) for out in EDGE_CASES] == \
           [_compute_score(out, PAPER_NEEDLE) for out in EDGE_CASES]
    assert scoring.paper_score("eat a sandwich, sit in Dolores-Park", PAPER_NEEDLE) == 1.0  # lab's own: 2.0
    assert scoring.paper_normalise("Dolores-Park, on a sunny day!") == "dolorespark on a sunny day"
    assert scoring.exact("Dolores-Park", "Dolores Park") == 1.0  # lab's containment keeps its normalisation


def test_needle_score_is_the_papers_success_rate():
    trial = needle.Trial("k", 250, 0, 0, [], PAPER_NEEDLE, [PAPER_NEEDLE])
    row = needle.score(trial, "Eat a sandwich and sit in Dolores Park.", "sentence")
    assert row == {"exact": 0.0, "contains": 0.0, "score": 2 / 5, "paper_score": 2.0}  # mean(score) is the paper's success rate


# ---- 7. RecurrentGemma's phase boundary: the last prompt token is a generation step ------------------------

def _first_token_logprobs(loaded, spec, trial, plan) -> torch.Tensor:
    """Log-probabilities of the first answer token as run_batch computes them under `plan`."""
    seen = []

    def keep(module, args, output):
        if not seen:
            seen.append(output.logits[0, 0 if spec.mode == "fast" else -1].float().log_softmax(-1))

    handle = loaded.model.register_forward_hook(keep)
    try:
        with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
            needle.run_batch(loaded, spec, [trial], tracker)
    finally:
        handle.remove()
    return seen[0]


def _paper_sampler_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """The reference, without lab's phase tracking: every attention block's output zeroed at the last prompt
    position only (the paper's sampler runs that token as the first, ablated, generation step)."""
    def zero_last(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = torch.cat([out[:, :-1], torch.zeros_like(out[:, -1:])], dim=1)
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    handles = [loaded.model.get_submodule(block.path).register_forward_hook(zero_last)
               for _, block in loaded.anatomy.blocks("attention")]
    try:
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[0, -1].float().log_softmax(-1)


@pytest.mark.parametrize("mode", ["generate", "fast"])
def test_last_prompt_token_boundary_ablates_the_first_answer_step(mode):
    loaded = tiny("recurrent_gemma")
    plan = Plan.from_dict({"phase": "generation", "off": [{"kind": "attention"}]}, loaded.anatomy)
    base = NeedleSpec(task="passkey", mode=mode, max_new_tokens=2)
    trial = PromptBuilder(loaded.tokenizer, base).build(300, 50, 0)
    reference = _paper_sampler_logprobs(loaded, trial.ids)
    paper = _first_token_logprobs(loaded, NeedleSpec(task="passkey", mode=mode, max_new_tokens=2,
                                                     phase_boundary="last-prompt-token"), trial, plan)
    lab = _first_token_logprobs(loaded, base, trial, plan)
    torch.testing.assert_close(paper, reference, atol=1e-4, rtol=0)
    assert (lab - reference).abs().max() > 0.1  # lab's boundary leaves the step that predicts it unablated


# ---- 3. Jamba's MMLU as the paper ran it: lm-eval with apply_chat_template and fewshot_as_multiturn ------------

MMLU_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _bos_tokenizer():
    """Bytes, a chat template with a system role, and a BOS that add_special_tokens puts first."""
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    tok.chat_template = MMLU_TEMPLATE
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def test_mmlu_chat_renders_lm_evals_multiturn_prompt():
    from lab.probes.mmlu import Question, Scorer

    question = Question("high_school_physics", 0, " What is the unit of force? ", ("joule", "newton", "watt", "pascal"), 1)
    shots = [Question("high_school_physics", i, q, ("mass", "speed", "velocity", "time"), i)
             for i, q in enumerate(["Which is a scalar?", "Which is a speed?"])]
    tok = _bos_tokenizer()
    scorer = Scorer(tok, 2, chat=True, bos=False)
    # lm-eval: system = description; per shot user doc_to_text + assistant "A".."D"; the question as a user turn;
    # the generation prompt's trailing "\n" moves into the continuation, whose letters have no leading space
    expected = ("<|system|>\nThe following are multiple choice questions (with answers) about high school physics."
                "\n\n<|end|>\n"
                "<|user|>\nWhich is a scalar?\nA. mass\nB. speed\nC. velocity\nD. time\nAnswer:<|end|>\n"
                "<|assistant|>\nA<|end|>\n"
                "<|user|>\nWhich is a speed?\nA. mass\nB. speed\nC. velocity\nD. time\nAnswer:<|end|>\n"
                "<|assistant|>\nB<|end|>\n"
                "<|user|>\nWhat is the unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:<|end|>\n"
                "<|assistant|>\n")
    assert tok.decode(scorer.ids(question, shots)) == expected
    assert scorer.choice_ids[1] == [tok.convert_tokens_to_ids(letter) for letter in "ABCD"]
    with_bos = Scorer(tok, 2, chat=True, bos=True).ids(question, shots)
    assert with_bos == [tok.bos_token_id] + scorer.ids(question, shots)


def test_mmlu_plain_prompt_is_unchanged_and_bos_is_an_option():
    from lab.probes.mmlu import Question, Scorer, prompt

    question = Question("anatomy", 0, "Which bone?", ("a", "b", "c", "d"), 0)
    tok = _bos_tokenizer()
    plain = Scorer(tok, 0)  # lab's default: the tokenizer's BOS, then the prompt and the space before " A".." D"
    assert plain.ids(question, []) == [tok.bos_token_id] + tok(prompt(question, []) + " ",
                                                                add_special_tokens=False)["input_ids"]
    assert tok.decode(plain.choice_ids[1]) == "ABCD"
    assert Scorer(tok, 0, bos=False).ids(question, []) == plain.ids(question, [])[1:]


def test_mmlu_chat_needs_a_chat_template():
    from lab.probes.mmlu import Scorer

    with pytest.raises(LabError, match="no chat template"):
        Scorer(byte_tokenizer(), 5, chat=True)


# ---- the paper presets --------------------------------------------------------------------------------------

PAPER_MODELS = ("recurrentgemma-2b", "recurrentgemma-9b", "jamba-mini-1.6")
NEEDLE_PRESETS = [f"{m}-{c}" for m in PAPER_MODELS for c in ("base", "attention-off", "jrt", "sparse-15", "ssm-off")]


@pytest.mark.parametrize("name", NEEDLE_PRESETS)
def test_paper_needle_presets_use_the_papers_protocol(name):
    preset = presets.load(name)
    spec = preset.needle
    assert (spec.length_counts, spec.buffer, spec.needle_wrap) == ("context", 200, "newline")
    assert spec.haystack_per == "trial"  # one haystack text for every length and depth, as the paper's essays
    assert spec.jrt == spec.jrt_form.startswith("repeat") == name.endswith("-jrt")
    if name.startswith("jamba"):
        assert (spec.chat, spec.instruction, spec.answer_line, spec.phase_boundary) == \
               (True, INSTRUCTION, False, "prompt")
    else:
        assert (spec.chat, spec.answer_prefix, spec.phase_boundary) == \
               (False, "Here is the most relevant sentence in the context: ", "last-prompt-token")
    if name.endswith("attention-off"):  # the paper's ablation is k = 0 (heads zeroed, bias kept), not a block off
        assert preset.plan["sparsify"]["k"] == 0 and "off" not in preset.plan
    assert "Paper protocol:" in preset.description


@pytest.mark.parametrize("name", [f"jamba-mini-1.6-mmlu-{k}" for k in ("base", "k0", "sparse-k5")])
def test_paper_mmlu_presets_render_lm_evals_chat_prompt_without_bos(name):
    spec = presets.load(name).mmlu
    assert (spec.chat, spec.bos) == (True, False)


V1_FIELDS = {"needle": {"task", "lengths", "depths", "trials", "mode", "max_new_tokens", "chat", "jrt", "haystack",
                        "seed", "needle", "question", "answer_prefix", "keys", "batch_size"},
             "mmlu": {"source", "shots", "subjects", "limit", "split", "batch_size"}}


@pytest.mark.parametrize("name", [n for n in presets.list_presets() if n.startswith("toy-")])
def test_toy_presets_leave_every_new_option_out_of_the_fingerprint(name):
    """Preset.fingerprint hashes to_dict(); the options newer than the stored runs are left out at their default
    (spec.unhashed()), so the shipped toys' fingerprints stay those pinned in test_inputs."""
    from dataclasses import asdict

    for key, spec in presets.load(name).probes.items():
        assert set(asdict(spec)) - set(spec.unhashed()) == V1_FIELDS[key]


def test_k0_keeps_the_output_projection_bias_where_attention_off_removes_it():
    loaded = tiny("recurrent_gemma")
    _, block = next(iter(loaded.anatomy.blocks("attention")))
    bias = loaded.model.get_submodule(block.out_proj).bias
    assert bias is not None and bias.abs().max() > 0
    seen = []
    ids = torch.tensor([list(range(40, 60))])
    for plan in ({"sparsify": {"k": 0, "metric": "entropy"}}, {"off": [{"kind": "attention"}]}):
        with apply_plan(loaded.model, loaded.anatomy, Plan.from_dict(plan, loaded.anatomy)), torch.inference_mode():
            handle = loaded.model.get_submodule(block.path).register_forward_hook(  # after the plan's own hooks
                lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).clone()))
            try:
                loaded.model(input_ids=ids, use_cache=False)
            finally:
                handle.remove()
    k0, off = seen
    torch.testing.assert_close(k0, bias.expand_as(k0))
    assert not off.any()


# ---- 11. RULER's niah templates ------------------------------------------------------------------------------

# RULER scripts/data/synthetic/constants.py, 'niah' template + answer_prefix, as prepare.py joins them (base model)
RULER_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                  "{type_needle_v} for {query} mentioned in the provided text? The special magic {type_needle_v} for "
                  "{query} mentioned in the provided text are")


def ruler_input(context: str, query: str, single: bool) -> str:
    """RULER niah.py's generate_input_output, from the template on."""
    template, type_needle_v = RULER_TEMPLATE, "numbers"
    if single:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        template, type_needle_v = template.replace("answers", "answer"), type_needle_v[:-1]
    return template.format(type_needle_v=type_needle_v, context=context, query=query)


@pytest.mark.parametrize("task, keys, single", [("multikey", 4, True), ("multivalue", 4, False),
                                                 ("multivalue", 1, True), ("multiquery", 4, False),
                                                 ("multiquery", 2, False)])
def test_ruler_format_matches_rulers_niah_template(tok, task, keys, single):
    spec = NeedleSpec(task=task, keys=keys, format="ruler", max_new_tokens=128)
    trial = PromptBuilder(tok, spec).build(2000, 50, 0)
    start, end = trial.contexts[0]
    context = tok.decode(trial.ids[start:end])
    needle_keys = re.findall(r"One of the special magic numbers for (\S+) is: \d{7}\.", context)
    if task == "multiquery":
        query = re.search(r"numbers for (.*?) mentioned", tok.decode(trial.ids[end:])).group(1)
        assert re.fullmatch(", ".join([r"\S+"] * (keys - 1)) + r", and \S+", query)  # RULER's Oxford comma
        assert sorted(query.replace(", and ", ", ").split(", ")) == sorted(needle_keys)
    else:
        query = needle_keys[0] if task == "multivalue" else re.search(
            r"numbers for (\S+) is: " + trial.values[0], context).group(1)
    assert tok.decode(trial.ids) == ruler_input(context, query, single)
    assert len(trial.ids) + 128 == 2000  # RULER counts the tokens to generate inside max_seq_length
    assert not context[:1].isspace() or context.startswith(" One of")  # RULER's context starts at once
    for s, e in trial.needle_spans:
        assert tok.decode(trial.ids[start:s]).endswith(".") or s == start


def test_ruler_format_draws_a_depth_per_needle(tok):
    spec = NeedleSpec(task="multiquery", keys=4, format="ruler")
    starts = {tuple(s for s, _ in PromptBuilder(tok, spec).build(3000, 50, i).needle_spans) for i in range(5)}
    assert len(starts) == 5  # the grid depth does not place them
    with pytest.raises(LabError, match="ruler is for the tasks"):
        NeedleSpec(task="passkey", format="ruler").validate()
