"""Decoding shared by the probes: greedy continuations with cache, teacher-forced greedy predictions."""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lab.fast import decode, fork
from lab.fast.host import on_device


class Stopped(Exception):
    """The job was cancelled while its batch decoded: the batch is dropped, not stored."""


@contextmanager
def stopping(cancel: threading.Event | None) -> Iterator[None]:
    """Decoding in this thread stops at its next step once `cancel` is set (greedy and teacher_forced raise
    Stopped), so a cancel or quit does not wait for a whole batch."""
    token = decode.STOP.set(cancel)
    try:
        yield
    finally:
        decode.STOP.reset(token)


class _StopWhenCancelled(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), decode.stop_requested(), dtype=torch.bool, device=input_ids.device)


def _check_stop() -> None:
    if decode.stop_requested():
        raise Stopped()


def pad_id(tok) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (right padding and generate's filler)."""
    return next(v for v in (tok.pad_token_id, tok.eos_token_id, 0) if v is not None)


def _by_length(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of the prompts grouped by length, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    return list(groups.values())


def fixed_decoder(model):
    """lab's fixed-buffer decoder for this model (lab.fast.decode or lab.fast.jamba_decode), or None."""
    from lab.fast import jamba_decode

    return next((d for d in (decode, jamba_decode) if d.supports(model)), None)  # none with fast=False


def shares_prefixes(model) -> bool:
    """Whether greedy(static=True) may prefill prompts that share a prefix from one trunk (lab.fast.fork): the
    model decodes from fixed buffers and the trunk's states carry over (Jamba, RecurrentGemma: fork.supports)."""
    return fixed_decoder(model) is not None and fork.supports(model)


def decode_row_bytes(model, length: int) -> int:
    """Memory one more prompt of `length` tokens (new tokens included) holds while lab's fixed-buffer decoder
    decodes it (its prefill runs a length at a time); 0 where the model decodes with generate()."""
    decoder = fixed_decoder(model)
    return decoder.row_bytes(model, length) if decoder is not None else 0


@torch.inference_mode()
def greedy(loaded, prompts: list[list[int]], max_new_tokens: int, static: bool = False,
           tracker=None) -> list[list[int]]:
    """Greedy continuations with cache (under whatever plan is active), each cut at eos.

    Prompts of one length run as one unpadded group. static: decode with lab's fixed-buffer decoder where one
    supports the model (all groups in one CUDA graph on a GPU); the plan's `tracker` then learns that its
    one-token steps are generation steps without reading positions on the host. There, prompts that share a
    prefix with one of them start from its states (lab.fast.fork) where the plan acts alike at every position."""
    tok, model = loaded.tokenizer, loaded.model
    decoder = fixed_decoder(model)
    shared = static and shares_prefixes(model) and (tracker is None or tracker.positionwise)
    forks = fork.plan(prompts, model.config.model_type) if shared else None
    groups = forks.groups if forks is not None else _by_length(prompts)
    starts = forks.starts if forks is not None else [0] * len(prompts)
    tensors = [on_device([prompts[i][starts[i]:] for i in group], loaded.device) for group in groups]
    if static and decoder is not None:
        with tracker.decoding(loaded.device) if tracker is not None else nullcontext():
            args = (model, tensors, max_new_tokens, tok.eos_token_id)
            rows = (decoder.greedy(*args) if forks is None else decoder.greedy(*args, forks=forks)).tolist()
    else:
        rows = []
        for prompt in tensors:
            _check_stop()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id(tok), eos_token_id=tok.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([_StopWhenCancelled()]))
            rows += out[:, prompt.shape[1]:].tolist()
    _check_stop()
    answers = [[] for _ in prompts]
    for i, row in zip((i for group in groups for i in group), rows):
        answers[i] = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
    return answers


def teacher_forced(loaded, prompts: list[list[int]], answers: list[list[int]], tracker) -> list[list[int]]:
    """Greedy predictions at the answer positions, with the answer in the input (one forward per length);
    the plan's phase tracker learns where each prompt ends."""
    pad = pad_id(loaded.tokenizer)
    preds: list[list[int]] = [[] for _ in prompts]
    for group in _by_length(prompts):
        _check_stop()
        width = max(len(answers[i]) for i in group)
        full = torch.tensor([prompts[i] + answers[i] + [pad] * (width - len(answers[i])) for i in group],
                            device=loaded.device)
        start = len(prompts[group[0]])
        tracker.prompt_len = start
        logits = loaded.model(input_ids=full, use_cache=False, logits_to_keep=width + 1).logits  # from start - 1
        for i, row in zip(group, logits[:, :width].argmax(-1).tolist()):
            preds[i] = row
    return preds
