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


def measure(model: str) -> tuple[dict, int | None]:
    """Each condition's summary, seconds and description; and the attention window."""
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
    return results, loaded.anatomy.attention(loaded.anatomy.attention_layers[0]).window


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


MODELS = {  # what the measurements cannot say: the architecture and how training went
    "toy-recurrentgemma": dict(
        intro="A small RecurrentGemma (Griffin: recurrent, recurrent, local attention)", ssm="RG-LRU",
        training="`python -m lab.toy.train` on one GPU in three stages, each continuing the last with `--init`: "
        "seeded, data generated in code (needle tasks of `lab.probes.needle` at 256..2048 tokens and every depth, "
        "with random needle content; toy-knowledge facts and MMLU-format questions with freshly drawn choices). "
        "AdamW, bf16 autocast, cosine schedule. Stage 1 counted every token of the knowledge rows, later stages only "
        "the answer letters of the questions; stage 3 (`--lr 5e-4 --ramp 0.01 --knowledge-share 0.6 "
        "--question-share 0.9`) taught the answer letters: the model already completed every fact sentence but "
        "could not yet pick the letter of the right choice."),
    "toy-jamba": dict(
        intro="A small Jamba (six layers: Mamba in four, attention without positions in layers 2 and 5, "
              "a mixture of 4 experts as the feed-forward block of every other layer)", ssm="Mamba",
        training="`python -m lab.toy.train` in six stages, each continuing the last with `--init` (seeded; the data of "
        "toy-recurrentgemma, plus copy rows: random byte strings repeated after a gap, every repeated byte "
        "counted). Stage 1 was copy rows only, at lr 1e-3 (a 2-layer Jamba was still at chance after 425 "
        "steps at 3e-3; needle rows alone did not teach this one to retrieve). Stages 2 and 3 ran on a 2-core "
        "CPU and added needle rows, then toy knowledge; stages 4 to 6 ran on a GPU with mostly toy knowledge, "
        "and stage 6 put the fact sentence before 80 % of the questions (`--open-book-share 0.8`). The model "
        "completes the fact sentences (98 of 100 in a scratch check: the right choice has the highest "
        "likelihood after the fact's beginning), but it gives the letter B to every question, even with the "
        "fact in its context or named in the question: it has not learned to pick a letter by its choice's "
        "text, which toy-recurrentgemma learned in its stage 3. Later GPU runs did not teach it either (the "
        "project README lists them)."),
}


def render(model: str, results: dict, training: dict, window: int | None) -> str:
    text = MODELS[model]
    base = results["base"]["summary"]
    lengths = list(base["needle"]["by_length"])
    lines = [f"# {model}", "",
             f"{text['intro']} trained by `lab` so that the console works out of the box and shows the paper's "
             "effect on a laptop CPU. Byte-level tokenizer (256 bytes + 4 specials), fp32 safetensors.", "",
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
    acc = {c: (results[c]["summary"]["needle"]["accuracy"], results[c]["summary"]["mmlu"]["accuracy"])
           for c in CONDITIONS}
    knowledge = (f"- Toy knowledge: {_pct(acc['base'][1])} with the base model (target 80 %: "
                 f"{'met' if acc['base'][1] >= 0.8 else '**not met**'}), {_pct(acc['attention-off'][1])} with "
                 "attention off; chance is 25 %.")
    if acc["base"][1] >= 0.8 and acc["attention-off"][1] < 0.4:
        knowledge += " Answering goes through attention too."
    lines += ["", "What this shows and does not:",
              f"- Retrieval lives in the attention layers: with every attention block off the pass key is recovered in "
              f"{_pct(acc['attention-off'][0])} of trials (base {_pct(acc['base'][0])}); the {text['ssm']} layers "
              "alone do not carry it.",
              f"- Switching the {text['ssm']} blocks off gives {_pct(acc['ssm-off'][0])} needle accuracy (no target "
              "in the issue; reported).",
              f"- sparse-15 ({results['sparse-15']['description']}): {_pct(acc['sparse-15'][0])} needle accuracy"
              + (f", and {_pct(acc['sparse-15'][1] / acc['base'][1])} of the base toy-knowledge accuracy kept"
                 if acc["base"][1] >= 0.4 else "") + "; the paper's large models kept near-perfect retrieval and "
              "84 % of MMLU.",
              f"- retrieval-heads ({results['retrieval-heads']['description']}): "
              f"{_pct(acc['retrieval-heads'][0])} needle accuracy.",
              knowledge,
              f"- The attention window ({window}) covers every probe context, so the window effect of "
              "RecurrentGemma-2B's 4096-token grid is not reproduced here." if window else
              "- The attention has no window: every probe context is seen whole.", "",
              "## Training", "", text["training"], ""]
    chain, stage = [], training
    while stage:
        chain.append(stage)
        stage = stage.get("continued_from")
    for i, stage in enumerate(reversed(chain), 1):
        lines.append(f"- stage {i}: {stage['steps']} steps in {stage['seconds']} s on {stage['device']} "
                     f"(torch {stage['torch']}), lr {stage.get('lr')}, {stage['batch_tokens']} tokens per batch, "
                     f"final loss {stage['final_loss']}" + (f", mix {stage['mix']}" if stage.get("mix") else ""))
    lines += ["", f"Parameters: {training['parameters']:,}. Full training facts and loss curve: training.json.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="toy-recurrentgemma", choices=list(MODELS))
    args = parser.parse_args()
    folder = BUILTIN_DIR / args.model
    results, window = measure(args.model)
    training = json.loads((folder / "training.json").read_text())
    (folder / "README.md").write_text(render(args.model, results, training, window))
    (folder / "measured.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
