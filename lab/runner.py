"""One runner for the CLI and the console: drives a preset's probes under its plan, streams events.

Every batch is written to the store before the next starts, so cancel, Ctrl-C or a dropped SSH
link lose nothing already computed; running the same preset again resumes where it stopped. A cancel
while a batch decodes stops it at the next decoding step and drops that batch (quitting does not wait
for a whole batch).
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lab.errors import LabError
from lab.interventions import Plan, Resolved, apply_plan, calibrate, resolve
from lab.models import Loaded, load
from lab.models.generation import Stopped, stopping
from lab.presets import Preset
from lab import probes
from lab.probes.haystack import sentences
from lab.store import Store
from lab.summary import summarize


@dataclass
class Started:
    run_id: int
    total: int
    skipped: int
    plan: str
    probes: dict[str, tuple[int, int]] = field(default_factory=dict)  # per probe: (trials done, its total)


@dataclass
class Progress:
    probe: str
    rows: list[dict]
    done: int
    total: int
    eta_s: float | None


@dataclass
class Finished:
    run_id: int
    status: str  # done | cancelled
    summary: dict


Event = Started | Progress | Finished


def versions() -> dict:
    import transformers

    import lab

    return {"lab": lab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else platform.processor() or "cpu"}


OOM_HINT = "use shorter lengths, --dtype bfloat16 or --device device_map"


def auto_batch_size(requested: int, loaded: Loaded, tokens: int, row_bytes: int = 0) -> int:
    """0 means automatic: on a GPU as many prompts of `tokens` as 80 % of the free memory holds, from one
    measured forward under the active plan (a batch that still runs out is halved); 8 on a CPU.
    row_bytes: the probe prefills a batch a length at a time (halving where that runs out) and then holds only
    row_bytes per prompt (lab's fixed-buffer decoders), so it gets as many as half the free memory holds for
    those, when that is more."""
    if requested:
        return requested
    if loaded.device.type != "cuda":
        return 8
    try:
        free, peak = _free_and_peak(loaded, tokens)
    except torch.OutOfMemoryError:
        raise LabError(f"out of memory on a single prompt of {tokens} tokens; {OOM_HINT}") from None
    return max(prompts_that_fit(free, peak), prompts_that_fit(free // 2, row_bytes) if row_bytes else 1)


def prompts_that_fit(free_bytes: int, prompt_bytes: int, most: int = 256) -> int:
    """How many prompts of `prompt_bytes` peak memory fit in 80 % of `free_bytes` (1..most)."""
    return max(1, min(most, int(0.8 * free_bytes) // max(prompt_bytes, 1)))


@torch.inference_mode()
def _free_and_peak(loaded: Loaded, tokens: int) -> tuple[int, int]:
    """(bytes free for a batch, peak bytes of a one-prompt forward of `tokens`) on the model's GPU."""
    device = loaded.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    peak = torch.cuda.max_memory_allocated(device) - base
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # PyTorch's, reusable
    return free + cached, peak


def run_halving(fn, items: list, tracker) -> list[dict]:
    """fn(items, tracker), splitting the batch in halves and retrying on out-of-memory."""
    try:
        return fn(items, tracker)
    except torch.OutOfMemoryError:
        if len(items) == 1:
            raise LabError(f"out of memory on a single prompt; {OOM_HINT}") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        return run_halving(fn, items[:half], tracker) + run_halving(fn, items[half:], tracker)


def calibrated_means(loaded: Loaded, plan: Resolved):
    """The values a mean-ablating plan puts in place of what it removes (None for zero ablation), calibrated
    on fixed text: the runner and the sweep workers use the same."""
    if plan.mode != "mean" or plan.is_empty:
        return None
    stream = sentences(seed=12345)
    text = " ".join(next(stream) for _ in range(400))
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :1024]
    return calibrate(loaded.model, loaded.anatomy, plan, [ids])


def check_probes(plan: Plan, probe_names) -> None:
    """Refuse a plan that means nothing to a probe: needle attention on MMLU, whose prompts have no needle."""
    if plan.needle_attention is not None and "mmlu" in probe_names:
        raise LabError("plan.needle_attention acts on the needle's keys and MMLU's prompts have none (keep and omit "
                       "would change nothing; only, balanced and null would leave no attention): run MMLU without it, "
                       "or switch attention off with plan.off")


def run(preset: Preset, store: Store, loaded: Loaded | None = None,
        cancel: threading.Event | None = None) -> Iterator[Event]:
    """Run every probe the preset names; yields Started, Progress per batch, then Finished."""
    specs = preset.probes
    if not specs:
        raise LabError(f"the preset names no probe: add a table for one of {', '.join(probes.PROBES)}")
    loaded = loaded or load(preset.model)
    plan = preset.plan_for(loaded.anatomy)
    check_probes(plan, specs)
    words = plan.describe(loaded.anatomy)
    sites = resolve(plan, loaded.anatomy)  # once, for calibration and every probe
    prepared = {name: probes.get(name).prepare(loaded, spec) for name, spec in specs.items()}  # fails up front
    total = sum(p.trials for p in prepared.values())
    run_id = store.open_run(preset.fingerprint(), f"{preset.name} · {words}", preset.model.name, plan.to_dict(),
                            preset.to_toml(), versions())
    done_keys = {name: store.done_keys(run_id, name) for name in prepared}
    done = sum(len(k) for k in done_keys.values())
    yield Started(run_id, total, done, words, {name: (len(done_keys[name]), p.trials) for name, p in prepared.items()})
    means = calibrated_means(loaded, sites)
    status = "failed"
    started, fresh = time.monotonic(), 0
    try:
        for name, probe in prepared.items():
            with apply_plan(loaded.model, loaded.anatomy, sites, means) as tracker:
                work = probe.work(done_keys[name])
                size = auto_batch_size(work.batch_size, loaded, work.tokens, work.row_bytes) if work.items else 1
                for i in range(0, len(work.items), size):
                    if cancel is not None and cancel.is_set():
                        status = "cancelled"
                        break
                    batch = work.items[i:i + size]
                    try:
                        with stopping(cancel):
                            rows = run_halving(work.answer, batch, tracker)
                    except Stopped:  # cancelled while decoding: this batch is dropped, what came before stays
                        status = "cancelled"
                        break
                    store.add_trials(run_id, name, rows)
                    done, fresh = done + len(batch), fresh + len(batch)
                    rate = (time.monotonic() - started) / fresh
                    yield Progress(name, rows, done, total, rate * (total - done))
            if status == "cancelled":
                break
        else:
            status = "done"
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    finally:
        store.finish_run(run_id, status)
    yield Finished(run_id, status, summarize(store.trials(run_id)))
