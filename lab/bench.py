"""`lab bench`: lab's probe paths against the reference paths, measured in the same run.

1. the paper's needle grid: lab (its needle probe, batched as the runner does) versus the way the
   paper's harness runs (one prompt at a time, generate(), transformers' reference recurrences); and the
   grid as the paper builds it (one haystack cut to every prompt), lab's path with and without sharing it;
2. MMLU-format throughput: one forward scores all four choices versus one forward per choice;
3. the overhead of an active plan (heads off; sparsification) on a forward pass;
4. prefill tokens/s and, on a GPU, the fraction of its bf16 peak.
Models are given by a spec, config:<published> included (published configs with random weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median

import torch

from lab import fast
from lab.fast import fork
from lab.errors import LabError
from lab.interventions import Plan, Sparsify, apply_plan
from lab.interventions.plan import NeedleAttention
from lab.models import Loaded, ModelSpec, load
from lab.models.generation import decode_row_bytes, shares_prefixes
from lab.probes import mmlu as mmlu_probe
from lab.probes import needle as needle_probe
from lab.runner import auto_batch_size

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


@dataclass
class Timer:
    device: torch.device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def _needle_trials(loaded: Loaded, lengths, depths, haystack_per: str = "cell"):
    spec = needle_probe.NeedleSpec(task="passkey", lengths=tuple(lengths), depths=tuple(depths), max_new_tokens=40,
                                   haystack_per=haystack_per)
    builder = needle_probe.PromptBuilder(loaded.tokenizer, spec)
    return spec, [builder.build(*cell) for cell in spec.cells()]


@torch.inference_mode()
def _reference_generate(loaded: Loaded, trial, new_tokens: int) -> None:
    """One prompt through transformers' generate() (stops at eos), as the paper's harness runs it."""
    needle_probe.greedy(loaded, [trial.ids], new_tokens)


def bench_needle(loaded: Loaded, lengths, depths, reference_sample: int, haystack_per: str = "cell",
                 passes: int = 1) -> dict:
    """Grid time for lab's needle probe (the median of `passes` passes after the first) versus one-prompt-at-a-time
    generate() on the reference recurrences. haystack_per="trial" (the paper's protocol: one haystack cut to every
    length and depth) also times lab's path with every prompt prefilled whole, and gives the share of prompt
    tokens a shared trunk saved (lab.fast.fork; 0 where the model prefills every prompt whole)."""
    spec, trials = _needle_trials(loaded, lengths, depths, haystack_per)
    tokens = max(spec.lengths) + spec.max_new_tokens
    batch_size = auto_batch_size(spec.batch_size, loaded, tokens, decode_row_bytes(loaded.model, tokens))  # as the runner
    was = fast.enabled(loaded.model)
    try:
        fast.apply(loaded.model, True)
        # batches as the runner makes them: by length, spanning lengths
        batches = [trials[i:i + batch_size] for i in range(0, len(trials), batch_size)]
        with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
            def grid():
                for batch in batches:
                    needle_probe.run_batch(loaded, spec, batch, tracker)
            first, times = _passes(loaded, grid, passes)
            lab_s = median(times)
            out = {"prompts": len(trials), "new_tokens": spec.max_new_tokens, **_seconds("lab", times),
                   "lab_first_pass_s": round(first, 3),
                   "reference_s": None, "reference_measured_prompts": 0, "speedup": None}
            if haystack_per == "trial":
                with fork.disabled():
                    whole = _passes(loaded, grid, passes)[1]
                model_type = loaded.model.config.model_type
                plans = [fork.plan([t.ids for t in b], model_type) for b in batches] if shares_prefixes(loaded.model) \
                    else []
                saved = sum(forks.saved for forks in plans if forks is not None)
                out.update(**_seconds("whole_prompts", whole),
                           shared_tokens=round(saved / sum(len(t.ids) for t in trials), 4))
        if not reference_sample:
            return out
        fast.apply(loaded.model, False)
        _reference_generate(loaded, trials[0], 2)  # warm-up
        step = max(1, len(trials) // reference_sample)
        sample = trials[::step][:reference_sample]
        with Timer(loaded.device) as ref_time:
            for trial in sample:
                _reference_generate(loaded, trial, spec.max_new_tokens)
    finally:
        fast.apply(loaded.model, was)
    reference = ref_time.seconds * len(trials) / len(sample)
    return {**out, "reference_s": round(reference, 3), "reference_measured_prompts": len(sample),
            "speedup": round(reference / lab_s, 2)}


@torch.inference_mode()
def bench_mmlu(loaded: Loaded, questions: int, batch_size: int, reference: bool = True, passes: int = 1) -> dict:
    qs, dev = mmlu_probe.load_questions(mmlu_probe.MMLUSpec(shots=5))
    qs = qs[:questions]
    scorer = mmlu_probe.Scorer(loaded.tokenizer, 5)
    items = sorted(((q, scorer.ids(q, dev[q.subject])) for q in qs), key=lambda item: -len(item[1]))
    with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
        def every_question():
            for i in range(0, len(items), batch_size):
                mmlu_probe.run_batch(loaded, scorer, items[i:i + batch_size], tracker)
        first, times = _passes(loaded, every_question, passes)
    lab_s = median(times)
    out = {"questions": len(items), "lab_qps": round(len(items) / lab_s, 2),
           "lab_first_pass_qps": round(len(items) / first, 2)}
    if len(times) > 1:
        out["lab_qps_range"] = [round(len(items) / max(times), 2), round(len(items) / min(times), 2)]
    if not reference:
        return {**out, "per_choice_qps": None, "speedup": None}
    with Timer(loaded.device) as per_choice:
        for q, ids in items:
            for letter_id in scorer.choice_ids[1]:
                loaded.model(input_ids=torch.tensor([ids + [letter_id]], device=loaded.device), use_cache=False)
    return {**out, "per_choice_qps": round(len(items) / per_choice.seconds, 2),
            "speedup": round(per_choice.seconds / lab_s, 2)}


def _passes(loaded: Loaded, run, timed: int) -> tuple[float, list[float]]:
    """Seconds of run()'s first pass and of `timed` passes after it, the measure: the first compiles the kernels of
    every shape it meets (Triton compiles a kernel per class of shapes on first use)."""
    first = _timed(loaded, run)
    return first, [_timed(loaded, run) for _ in range(timed)]


def _seconds(path: str, times: list[float]) -> dict:
    """{path_s: the median of `times`}, and with several {path_range_s: [fastest, slowest]} (lab.report's
    _seconds prints them)."""
    out = {f"{path}_s": round(median(times), 3)}
    if len(times) > 1:
        out[f"{path}_range_s"] = [round(min(times), 3), round(max(times), 3)]
    return out


def _timed(loaded: Loaded, fn) -> float:
    with Timer(loaded.device) as timer:
        fn()
    return timer.seconds


def _median_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Median of the seconds each fn() returns over `repeats` rounds after a warm-up round. Each round
    runs every fn once, so drift of the clocks or of the machine's load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: sorted(runs[1:])[repeats // 2] for name, runs in times.items()}


def _eager_baseline(model, forward) -> float:
    """A forward without a plan on eager attention, as sparsification runs where lab's kernel does not."""
    default = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return forward(Plan())
    finally:
        model.set_attn_implementation(default)


@torch.inference_mode()
def bench_plans(loaded: Loaded, length: int, batch: int, repeats: int) -> dict:
    """A prompt pass's time (logits at the last position) with a plan's hooks in place (probes install a plan once
    per run) against none."""
    anatomy, model = loaded.anatomy, loaded.model
    ids = torch.randint(0, 256, (batch, length), device=loaded.device)
    most = max((b.heads for _, b in anatomy.blocks("attention")), default=1)
    heads_off = Plan(heads_off=tuple((l, 0) for l in anatomy.attention_layers))
    plans = {"none": Plan(), "heads_off": heads_off,  # zeroed heads are folded into o_proj: no work per call
             "heads_off_hooked": heads_off.with_(phase="prefill"),  # a phase needs the hooks: measure them too
             "sparsify": Plan(sparsify=Sparsify(max(1, most // 7))),
             "needle": Plan(needle_attention=NeedleAttention("omit", "follow"))}  # no needle here: the op's cost

    def forward(plan: Plan) -> float:
        with apply_plan(model, anatomy, plan, prompt_len=length):
            return _timed(loaded, lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))

    fns = {name: lambda plan=plan: forward(plan) for name, plan in plans.items()}
    try:  # eager attention materialises every weight: at 8 x 4096 on a large model it may not fit, the rest may
        _eager_baseline(model, forward)
        fns["eager"] = lambda: _eager_baseline(model, forward)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    seconds = _median_seconds(fns, repeats)
    return {"base_s": round(seconds["none"], 5),
            "heads_off_overhead": round(seconds["heads_off"] / seconds["none"] - 1, 4),
            "heads_off_hooked_overhead": round(seconds["heads_off_hooked"] / seconds["none"] - 1, 4),
            "sparsify_overhead_vs_eager": round(seconds["sparsify"] / seconds["eager"] - 1, 4) if "eager" in seconds
            else None,
            "sparsify_overhead_vs_default": round(seconds["sparsify"] / seconds["none"] - 1, 4),
            "needle_attention_overhead_vs_default": round(seconds["needle"] / seconds["none"] - 1, 4)}


@torch.inference_mode()
def bench_prefill(loaded: Loaded, length: int, batch: int, repeats: int) -> dict:
    """The prompt pass as probes run it: logits at the last position only."""
    ids = torch.randint(0, 256, (batch, length), device=loaded.device)

    def prefill() -> float:
        return _timed(loaded, lambda: loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1))

    seconds = _median_seconds({"prefill": prefill}, repeats)["prefill"]
    flops = 2 * active_parameters(loaded) * batch * length  # MoE: the experts a token goes through
    for layer, block in loaded.anatomy.blocks("attention"):  # QK^T and PV, causal (window-limited)
        span = min(length, block.window or length)
        flops += 2 * 2 * batch * block.heads * block.head_dim * length * span / 2
    out = {"tokens_per_s": round(batch * length / seconds), "tflops": round(
        flops / seconds / 1e12, 2)}
    if loaded.device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            out["fraction_of_bf16_peak"] = round(flops / seconds / 1e12 / peak, 3)
    return out


ROWS = ("needle", "needle-shared", "mmlu", "plans", "prefill")


def _measured(measure, shape: str) -> dict:
    """measure(), or {"skipped": why} when it runs out of memory or fails: one row never stops the others."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        return {"skipped": f"out of memory at {shape}"}
    except (RuntimeError, LabError) as error:
        return {"skipped": f"failed at {shape}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_rows(text: str | None) -> tuple[str, ...]:
    """The rows named in `text`, comma-separated (None: every row); checked before any model loads."""
    rows = tuple(r.strip() for r in (",".join(ROWS) if text is None else text).split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise LabError(f"unknown bench row {unknown[0] if unknown else text!r}; rows: {', '.join(ROWS)}")
    twice = next((r for r in rows if rows.count(r) > 1), None)
    if twice:
        raise LabError(f"bench row {twice!r} is named twice")
    return rows


def run_bench(loaded: Loaded, quick: bool, rows: tuple[str, ...] = ROWS, progress=None,
              reference: int | None = None, passes: int = 1) -> dict:
    """Every measure of `rows`, each on its own (see _measured); progress(label) before each. reference: needle
    prompts the reference path times (None: 10 on a GPU, 4 on a CPU; 0: no reference path, MMLU's neither).
    passes: lab's needle and MMLU paths are timed over this many passes after the first (the median, and the
    range where more than one)."""
    if loaded.device.type == "meta":
        raise LabError("a model on the meta device has no weights to time: use it with lab inspect only")
    on_gpu = loaded.device.type == "cuda"
    lengths = needle_probe.PAPER_LENGTHS if on_gpu and not quick else (256, 512, 768, 1024)
    depths = needle_probe.PAPER_DEPTHS if on_gpu and not quick else (0, 50, 100)
    length = 4096 if on_gpu else 1024
    sample = (10 if on_gpu else 4) if reference is None else reference
    measures = []  # (key, label, shape, measure)
    if "needle" in rows:
        measures.append(("needle_grid", "needle grid", f"{len(lengths) * len(depths)} prompts",
                         lambda: bench_needle(loaded, lengths, depths, reference_sample=sample, passes=passes)))
    if "needle-shared" in rows:  # the paper's protocol: prompts share the haystack up to their needle
        measures.append(("needle_grid_shared", "needle grid, one haystack", f"{len(lengths) * len(depths)} prompts",
                         lambda: bench_needle(loaded, lengths, depths, reference_sample=0, haystack_per="trial",
                                              passes=passes)))
    if "mmlu" in rows:
        questions, batch = (128, 64) if on_gpu else (16, 8)
        measures.append(("mmlu", "MMLU", f"{questions} questions, batch {batch}",
                         lambda batch=batch: bench_mmlu(loaded, questions=questions, batch_size=batch,
                                                        reference=sample > 0, passes=passes)))
    if "plans" in rows:
        # one prompt (on a GPU bound by launching kernels from Python, so hook code counts) and a probe-sized batch
        for batch in (1, 8) if on_gpu else (1,):
            measures.append(("plan_overhead", "plan overhead", f"{batch} x {length}", lambda batch=batch: {
                "length": length, "batch": batch, **bench_plans(loaded, length, batch, repeats=9 if on_gpu else 5)}))
    if "prefill" in rows:
        batch = 8 if on_gpu else 1
        measures.append(("prefill", "prefill", f"{batch} x {length}", lambda batch=batch: {
            "length": length, "batch": batch, **bench_prefill(loaded, length, batch, repeats=5 if on_gpu else 3)}))
    results = {"model": loaded.spec.name, "parameters": loaded.num_params,
               "active_parameters": active_parameters(loaded),
               "device": torch.cuda.get_device_name() if on_gpu else "cpu",
               "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", "")}
    for i, (key, label, shape, measure) in enumerate(measures):
        if progress is not None:
            progress(f"{label}, {shape} ({i + 1}/{len(measures)})")
        row = _measured(measure, shape)
        if key == "plan_overhead":
            results.setdefault(key, []).append(row)
        else:
            results[key] = row
    return results


def active_parameters(loaded: Loaded) -> int:
    """Parameters one token passes through, embeddings aside: each MoE block counts top-k of its experts."""
    model, config = loaded.model, loaded.model.config
    active = loaded.num_params - model.get_input_embeddings().weight.numel()
    top_k = getattr(config, "num_experts_per_tok", None)
    for _, block in loaded.anatomy.blocks("moe"):
        experts = getattr(model.get_submodule(block.path), "experts", None)
        if experts is not None and top_k and block.experts:
            every = sum(p.numel() for p in experts.parameters())
            active -= every - every * top_k // block.experts
    return active


def load_for_bench(model: str, device: str, dtype: str) -> Loaded:
    """Any spec load() takes, config:<published> included."""
    return load(ModelSpec(model, device=device, dtype=dtype))
