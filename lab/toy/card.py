"""Write the toy models' cards from measurements: `python -m lab.toy.card [--model toy-recurrentgemma]`.

Runs the toy presets (presets/<model>-*.toml) with `lab`'s runner on this machine and writes
lab/toy/models/<model>/README.md with the figures, the training facts and how they were measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lab import presets
from lab.models import load
from lab.models.loading import BUILTIN_DIR
from lab.runner import Finished, run
from lab.store import Store

CONDITIONS = ("base", "attention-off", "ssm-off", "sparse-15", "retrieval-heads")


def measure(model: str) -> dict:
    loaded = load(model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "r.sqlite")
        for condition in CONDITIONS:
            preset = presets.load(f"{model}-{condition}")
            start = time.perf_counter()
            for event in run(preset, store, loaded=loaded):
                if isinstance(event, Finished):
                    results[condition] = {"summary": event.summary, "seconds": time.perf_counter() - start,
                                          "description": preset.description}
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(model: str, results: dict, training: dict) -> str:
    base = results["base"]["summary"]
    lengths = list(base["needle"]["by_length"])
    lines = [f"# {model}", "",
             "A small RecurrentGemma (Griffin: recurrent, recurrent, local attention) trained by `lab` so that the",
             "console works out of the box and shows the paper's effect on a laptop CPU. Byte-level tokenizer",
             "(256 bytes + 4 specials), fp32 safetensors.", "",
             "## Measured (this card is written by `python -m lab.toy.card`)", "",
             f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. Needle: passkey task, {len(lengths)} lengths ({lengths[0]}..{lengths[-1]} tokens)"
             f" x 10 depths, greedy generation with cache (8 new tokens), exact match. Toy knowledge: 200 "
             f"four-choice questions (MMLU layout, 5-shot, log-likelihood of ' A'..' D').", "",
             "| condition | plan | needle accuracy | toy-knowledge accuracy | wall time |", "|---|---|---|---|---|"]
    for condition in CONDITIONS:
        r = results[condition]
        s = r["summary"]
        lines.append(f"| {condition} | {r['description']} | {_pct(s['needle']['accuracy'])} | "
                     f"{_pct(s['mmlu']['accuracy'])} | {r['seconds']:.0f} s |")
    lines += ["", "Needle accuracy by context length (base / attention off):", "",
              "| length | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for condition in ("base", "attention-off"):
        by = results[condition]["summary"]["needle"]["by_length"]
        lines.append(f"| {condition} | " + " | ".join(_pct(by[k]) for k in lengths) + " |")
    lines += ["", "What this shows and does not:",
              "- Retrieval lives in the attention layers: with every attention block off the pass key is never "
              "recovered, at any length or depth; the RG-LRU layers alone do not carry it.",
              "- Switching the recurrent blocks off also breaks retrieval (no target in the issue; reported).",
              "- Keeping 1 of 8 heads per token (the paper's entropy-based sparsification, 12.5 %) does **not** keep "
              "retrieval in this toy, unlike the paper's large models.",
              "- A static keep-set of the 3 heads with the highest retrieval score (Wu et al.; `lab heads`) is enough: "
              "keeping only them (19 % of heads) keeps the pass key (tests: removing them loses it).",
              "- The toy-knowledge set was **not learned** (accuracy at chance, 25 %): the target of 80 % is not met. "
              "The facts are in the training mixture but 2,850 steps of a 2.3 M-parameter model were not enough.",
              "- The attention window (2048) covers every probe context, so the window effect of RecurrentGemma-2B's "
              "4096-token grid is not reproduced here.", "",
              "## Training", "",
              "`python -m lab.toy.train --models toy-recurrentgemma --seconds 470` on one GPU, then continued with "
              "`--init <first run> --lr 1e-3 --seconds 460`: seeded, data generated in code (needle tasks of "
              "`lab.probes.needle` at 256..2048 tokens and every depth, with random needle content; toy-knowledge "
              "facts and MMLU-format questions with freshly drawn choices). AdamW, bf16 autocast, cosine schedule. "
              "Both stages ran lab's earlier chunked RG-LRU scan (since replaced by the doubling scan, which gives "
              "the same outputs); stage 1 counted every token of the knowledge rows, stage 2 only the answer letters.",
              ""]
    chain, stage = [], training
    while stage:
        chain.append(stage)
        stage = stage.get("continued_from")
    for i, stage in enumerate(reversed(chain), 1):
        lines.append(f"- stage {i}: {stage['steps']} steps in {stage['seconds']} s on {stage['device']} "
                     f"(torch {stage['torch']}), lr {stage.get('lr')}, {stage['batch_tokens']} tokens per batch, "
                     f"final loss {stage['final_loss']}")
    lines += ["", f"Parameters: {training['parameters']:,}. Full training facts and loss curve: training.json.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-recurrentgemma")
    args = parser.parse_args()
    folder = BUILTIN_DIR / args.model
    results = measure(args.model)
    training = json.loads((folder / "training.json").read_text())
    (folder / "README.md").write_text(render(args.model, results, training))
    (folder / "measured.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
