"""Which modules lab's fast paths act on, whether a Triton kernel may run, and on which GPU. Imports nothing
from lab.fast.

lab.fast.install() replaces a few transformers functions, once, by dispatchers that ask `acts_on(module)` on
every call and otherwise run transformers' own code. A module of a model given to lab.fast.apply follows
that model's setting; any other module follows the default (lab.fast.enable), so one model's setting
never changes another's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import weakref

import torch

_settings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> bool
_default = {"on": True}
_attention_ops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> a plan's op


def set_model(model: torch.nn.Module, on: bool) -> None:
    for module in model.modules():
        _settings[module] = on


def set_default(on: bool) -> None:
    _default["on"] = on


def acts_on(module: torch.nn.Module) -> bool:
    return _settings.get(module, _default["on"])


def set_attention_op(module: torch.nn.Module, op=None) -> None:
    """Let a plan's op compute `module`'s attention in lab's attention entry (None takes it away). The op is
    called as the attention function is and returns (output, weights or None)."""
    if op is None:
        _attention_ops.pop(module, None)
    else:
        _attention_ops[module] = op


def attention_op(module: torch.nn.Module):
    return _attention_ops.get(module)


def enabled(model: torch.nn.Module | None = None) -> bool:
    """Whether lab's fast paths act on `model`; without one, the default for models never given to apply()."""
    return _default["on"] if model is None else acts_on(model)


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_applies(first: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether lab's Triton kernels may take these tensors: on a GPU, Triton importable, and no gradient
    wanted through any of them (the kernels have no backward)."""
    tensors = [t for t in (first, *others) if t is not None]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return first.is_cuda and not wants_grad and has_triton()


def on_its_gpu(launcher):
    """Run `launcher` (a function launching Triton kernels, its first parameter a tensor) with that tensor's GPU
    as the current one: Triton launches on the current GPU's stream, which for a model on cuda:1 (or a layer
    placed there by a device_map) is another GPU than the one holding the tensors."""
    first_name = next(iter(inspect.signature(launcher).parameters))

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        with current_gpu((args[0] if args else kwargs[first_name]).device):
            return launcher(*args, **kwargs)

    return launch


def current_gpu(device: torch.device):
    """A context in which `device` is the current GPU; nothing to do where it is already, or is no GPU (Triton's
    interpreter runs on the CPU)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
