"""Train the builtin toy hybrids (nanoGPT-sized): `python -m lab.toy.train --out DIR [--seconds N]`.

Data is generated here, seeded: the needle probe's tasks (passkey, sentence needles with random
content, RULER key/value needles) at lengths up to 2048 tokens and every depth, and the toy-knowledge
facts, stated as sentences and asked as MMLU-format questions with freshly drawn choices.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from lab.errors import LabError
from lab.models.tiny import BOS, EOS, PAD, VOCAB, byte_tokenizer
from lab.probes import mmlu
from lab.probes.needle import NeedleSpec, PromptBuilder
from lab.toy import knowledge

MAX_LEN = 2048
_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=True)
CONFIGS = {
    "toy-recurrentgemma": ("recurrent_gemma", dict(
        hidden_size=256, lru_width=256, intermediate_size=448, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32, attention_window_size=MAX_LEN,
        block_types=["recurrent", "recurrent", "attention"])),
    "toy-jamba": ("jamba", dict(
        hidden_size=192, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
        attn_layer_period=3, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
        num_experts_per_tok=2, mamba_d_state=16, mamba_expand=2, mamba_dt_rank=12)),
}
TASK_WEIGHTS = {"passkey": 3, "sentence": 3, "multikey": 2, "multivalue": 1, "multiquery": 1}
_CITIES = ("Oslo", "Lima", "Quito", "Hanoi", "Porto", "Perth", "Cairo", "Dakar", "Riga", "Turin", "Kyoto", "Accra")
_ACTS = ("eat a sandwich", "read a book", "fly a kite", "drink a coffee", "paint a mural", "play chess",
         "ride a bicycle", "watch the boats", "buy fresh bread", "climb the tower", "swim in the lake")
_SPOTS = ("the old harbour", "a quiet garden", "the city park", "the river bank", "the main square", "a small cafe")
_DAYS = ("sunny", "rainy", "windy", "cold", "warm", "quiet", "busy")


def build_model(name: str, overrides: dict | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **{**_COMMON, **kwargs, **(overrides or {})})
    model = AutoModelForCausalLM.from_config(config)
    _mamba_dt_init(model)
    return model


@torch.no_grad()
def _mamba_dt_init(model, low: float = 1e-3, high: float = 1e-1) -> None:
    """Mamba's time-step init (transformers leaves the bias at 0, i.e. dt = 0.69 and a 1-2 token memory):
    dt log-uniform in [low, high], stored as the inverse softplus in dt_proj's bias."""
    for module in model.modules():
        if hasattr(module, "dt_proj") and hasattr(module, "A_log"):
            bias = module.dt_proj.bias
            dt = torch.exp(torch.rand_like(bias) * (math.log(high) - math.log(low)) + math.log(low))
            bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class Sampler:
    """Training rows of an exact length: a needle prompt + answer + <eos>, or packed toy knowledge."""

    def __init__(self, tokenizer, seed: int, knowledge_share: float = 0.4, question_share: float = 0.5,
                 copy_share: float = 0.0, open_book_share: float = 0.0):
        self.tok, self.rng = tokenizer, random.Random(seed)
        self.knowledge_share, self.question_share, self.copy_share = knowledge_share, question_share, copy_share
        self.open_book_share = open_book_share
        self.builders = {t: PromptBuilder(tokenizer, NeedleSpec(task=t, seed=seed + i, keys=self.rng.randint(2, 4)))
                         for i, t in enumerate(TASK_WEIGHTS)}
        self.facts = [fact for items in knowledge.build().values() for *_, fact in items]
        self.questions = {s: items for s, items in knowledge.build().items()}

    def needle(self, length: int) -> tuple[list[int], list[int]]:
        """(ids, loss mask): the answer and <eos> are what counts."""
        task = self.rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
        builder = self.builders[task]
        if task == "sentence":  # random content, so the answer can only come from the context
            city, act, spot, day = (self.rng.choice(x) for x in (_CITIES, _ACTS, _SPOTS, _DAYS))
            builder.spec = replace(builder.spec, needle=f"The best thing to do in {city} is {act} and sit in {spot} "
                                   f"on a {day} day.", question=f"What is the best thing to do in {city}?")
        if task in ("multikey", "multivalue", "multiquery"):
            builder.spec = replace(builder.spec, keys=self.rng.randint(2, 4))
        try:
            trial = builder.build(length, self.rng.uniform(0, 100), self.rng.randrange(10**9))
        except LabError:  # too short for this many needles: a passkey fits every length we train on
            trial = self.builders["passkey"].build(length, self.rng.uniform(0, 100), self.rng.randrange(10**9))
        answer = self.tok(trial.answer, add_special_tokens=False)["input_ids"] + [EOS]
        ids = trial.ids + answer
        mask = [0] * len(trial.ids) + [1] * len(answer)
        return ids, mask

    def knowledge(self, length: int) -> tuple[list[int], list[int]]:
        """Facts (every token counts) and MMLU-format questions (only the answer letter counts)."""
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < length:
            if self.rng.random() >= self.question_share:
                doc = self.tok(" ".join(self.rng.sample(self.facts, 8)), add_special_tokens=False)["input_ids"]
                weights = [1] * len(doc)
            else:
                doc = self.tok(self._question(), add_special_tokens=False)["input_ids"]
                weights = [0] * (len(doc) - 1) + [1]
            ids += doc + [EOS]
            mask += weights + [1]
        return ids[:length], mask[:length]

    def _question(self) -> str:
        subject = self.rng.choice(list(self.questions))
        items = self.questions[subject]
        shots = [self._draw(subject, self.rng.choice(items), i) for i in range(self.rng.randint(0, 5))]
        item = self.rng.choice(items)
        target = self._draw(subject, item, 99)
        text = mmlu.prompt(target, shots) + " " + mmlu.LETTERS[target.answer]
        if self.rng.random() < self.open_book_share:  # the fact in context: only the letter lookup is left to learn
            text = item[3] + "\n\n" + text
        return text

    def _draw(self, subject, item, index) -> mmlu.Question:
        question, choices, answer, _ = item
        right = choices[answer]
        pool = list({c for q, cs, a, f in self.questions[subject] for c in cs} - {right})
        options = self.rng.sample(pool, 3) + [right]
        self.rng.shuffle(options)
        return mmlu.Question(subject, index, question, tuple(options), options.index(right))

    def copy(self, length: int) -> tuple[list[int], list[int]]:
        """Random byte strings, each repeated after a gap of other random bytes; the repeats count.

        A dense induction signal (every repeated token is supervised; a needle row supervises only its
        answer) for models whose attention has no positions and must learn to find the previous token.
        Gaps are log-uniform up to half the row: a toy-jamba taught with gaps under 100 copied perfectly
        across 20 tokens and at chance across 200."""
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < length:
            span = [self.rng.randrange(32, 127) for _ in range(self.rng.randint(8, 48))]
            gap_len = int(math.exp(self.rng.uniform(0, math.log(max(2, length // 2)))))
            gap = [self.rng.randrange(32, 127) for _ in range(gap_len)]
            ids += span + gap + span
            mask += [0] * (len(span) + len(gap)) + [1] * len(span)
        return ids[:length], mask[:length]

    def row(self, length: int) -> tuple[list[int], list[int]]:
        draw = self.rng.random()
        if draw < self.copy_share:
            return self.copy(length)
        if draw < self.copy_share + self.knowledge_share:
            return self.knowledge(length)
        return self.needle(length)

    def batch(self, size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(length) for _ in range(size)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r, _ in rows])
        mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.float)
        return ids, mask


def _use_mambapy(model, on: bool) -> None:
    model.config.use_mambapy = on
    for module in model.modules():
        if hasattr(module, "use_mambapy"):
            module.use_mambapy = on


def evaluate(folder: Path, device: str) -> dict:
    """Quick figures straight after training: passkey and sentence needles, toy knowledge, with and without attention."""
    import tempfile

    from lab.models import ModelSpec, load
    from lab.presets import Preset
    from lab.probes.mmlu import MMLUSpec
    from lab.runner import Finished, run
    from lab.store import Store

    loaded = load(ModelSpec(str(folder), device=device, dtype="float32"))
    results = {}
    lengths = (256, 512, 1024, 1536, 2048)
    depths = (0, 25, 50, 75, 100)
    for label, plan in (("base", {}), ("attention_off", {"off": [{"kind": "attention"}]})):
        for task in ("passkey", "sentence"):
            spec = NeedleSpec(task=task, lengths=lengths if task == "passkey" else lengths[1:], depths=depths,
                              mode="fast", batch_size=16)
            preset = Preset(name=f"{label}-{task}", plan=plan, needle=spec,
                            mmlu=MMLUSpec(shots=5) if task == "passkey" else None)
            with tempfile.TemporaryDirectory() as tmp:
                for event in run(preset, Store(Path(tmp) / "r.sqlite"), loaded=loaded):
                    if isinstance(event, Finished):
                        results[f"{label}/{task}"] = {k: v["accuracy"] for k, v in event.summary.items()}
    print(folder.name, json.dumps(results), flush=True)
    return results


def train(name: str, out: Path, seconds: float, batch_tokens: int, seed: int, device: str, lr: float,
          init: Path | None = None, bf16: bool = True, mix: dict | None = None, ramp: float = 0.5,
          overrides: dict | None = None) -> dict:
    """Train (or continue) one toy; mix = Sampler shares, ramp = fraction of the time to reach MAX_LEN."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    model = (AutoModelForCausalLM.from_pretrained(init / name, dtype=torch.float32) if init
             else build_model(name, overrides))
    model = model.to(device)
    model.train()
    _use_mambapy(model, True)  # Mamba's parallel scan for training, when the mambapy package is importable
    sampler = Sampler(tok, seed, **(mix or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    start, step, log = time.time(), 0, []
    while time.time() - start < seconds:
        frac = (time.time() - start) / seconds
        cap = int(256 + (MAX_LEN - 256) * min(1.0, frac / ramp))  # curriculum: longer prompts as training goes on
        length = random.Random(seed * 7919 + step).randint(256, cap)
        ids, mask = sampler.batch(max(2, batch_tokens // length), length)
        ids, mask = ids.to(device), mask.to(device)
        step_lr = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = step_lr
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16 and device.startswith("cuda")):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        loss_all = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                                     reduction="none").view(ids.shape[0], -1)
        weights = mask[:, 1:]
        loss = ((loss_all * weights).sum(1) / weights.sum(1).clamp_min(1)).mean()  # every row counts the same
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log.append({"step": step, "seconds": round(time.time() - start, 1), "length": length,
                        "loss": round(loss.item(), 4)})
            print(name, log[-1], flush=True)
        step += 1
    _use_mambapy(model, False)
    model.eval()
    folder = out / name
    model.to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    previous = json.loads((init / name / "training.json").read_text()) if init else None
    facts = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "steps": step, "lr": lr,
             "precision": "bf16 autocast" if bf16 else "fp32", "continued_from": previous,
             "mix": mix or {}, "ramp": ramp, "config_overrides": overrides or {},
             "seconds": round(time.time() - start, 1), "batch_tokens": batch_tokens, "seed": seed,
             "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
             "torch": torch.__version__, "final_loss": log[-1]["loss"] if log else None, "log": log}
    (folder / "training.json").write_text(json.dumps(facts, indent=1))
    facts["quick_eval"] = evaluate(folder, device)
    (folder / "training.json").write_text(json.dumps(facts, indent=1))
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "models"))
    parser.add_argument("--models", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seconds", type=float, default=240, help="training time per model")
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--init", help="continue from the models in this folder")
    parser.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    parser.add_argument("--knowledge-share", type=float, default=0.4, help="share of rows that are toy knowledge")
    parser.add_argument("--question-share", type=float, default=0.5, help="share of knowledge documents that are "
                        "MMLU-format questions (the rest: fact sentences)")
    parser.add_argument("--open-book-share", type=float, default=0.0, help="share of questions preceded by their "
                        "fact sentence (teaches picking the letter of a known answer)")
    parser.add_argument("--copy-share", type=float, default=0.0, help="share of rows that are copy tasks "
                        "(random strings repeated after a gap: induction practice)")
    parser.add_argument("--ramp", type=float, default=0.5, help="fraction of the time until prompts reach 2048 tokens")
    parser.add_argument("--override", default="{}", help="JSON of config fields to change (new models only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from lab import fast
    from lab.models import quiet_hf

    quiet_hf()
    fast.enable()
    for name in args.models:
        train(name, Path(args.out), args.seconds, args.batch_tokens, args.seed, args.device, args.lr,
              Path(args.init) if args.init else None, not args.fp32,
              dict(knowledge_share=args.knowledge_share, question_share=args.question_share,
                   copy_share=args.copy_share, open_book_share=args.open_book_share), args.ramp,
              json.loads(args.override))


if __name__ == "__main__":
    main()
