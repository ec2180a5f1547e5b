"""Load a model spec (builtin toy, random: or config: spec, local directory or hub id) as a `Loaded`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from lab.digest import folder_digest
from lab.errors import LabError
from lab.models import configs
from lab.models.anatomy import SUPPORTED, Anatomy, build_anatomy
from lab.models.checks import (TOKENIZER_FILES, attention_error, check_attention, check_loading_info, check_tokenizer,
                               check_tokenizer_encodes, check_weights, first_line, read_config)
from lab.models.spec import ModelSpec
from lab.models.tiny import byte_tokenizer

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "toy" / "models"
BUILTINS = ("toy-recurrentgemma", "toy-jamba")
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95})?$")  # the hub's rule
# what transformers, huggingface_hub and safetensors raise on a bad folder or config (a config value of the
# wrong kind ends in AttributeError, a failed config check in StrictDataclassError)
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, ImportError, SafetensorError,
               StrictDataclassError, ArithmeticError, AssertionError)


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    anatomy: Anatomy
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def quiet_hf() -> None:
    """Silence transformers' progress bars and warnings (they would garble the console)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LabError(f"device {device!r} asked for, but no CUDA GPU is available here")
    if device not in ("cpu", "device_map", "meta") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise LabError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N, device_map or meta")
    return device


def _dtype(spec: ModelSpec):
    if spec.dtype not in DTYPES:
        raise LabError(f"unknown dtype {spec.dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[spec.dtype]


def _folder(name: str) -> Path | None:
    """The local folder of a builtin or directory spec; None for a hub id; a LabError for anything else."""
    if not name.strip():
        raise LabError("the model name is empty: give a builtin, random:<type>, config:<name>, directory or hub id")
    if name in BUILTINS:
        path = BUILTIN_DIR / name
        if not (path / "config.json").exists():
            raise LabError(f"builtin model {name} is missing from {path}; train it with python -m lab.toy.train")
        return path
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if _HUB_ID.match(name) and ".." not in name and "--" not in name and not name.endswith("."):
        return None
    raise LabError(f"unknown model {name!r}: not a builtin ({', '.join(BUILTINS)}), random:<type>, "
                   "config:<name>, directory or hub id")


def contents(name: str) -> str | None:
    """What a model spec's name stands for now, for a run's identity: a local directory's files (lab.digest), a
    hub id's cached revision; None for builtins and random:/config: specs (lab's own, fixed by its version)."""
    if name in BUILTINS or name.startswith(configs.PREFIXES):
        return None
    if Path(name).expanduser().is_dir():
        return folder_digest(Path(name))
    try:
        found = _cached(name, "config.json") if _HUB_ID.match(name) else None
    except ValueError:  # huggingface_hub's refusal of a malformed id
        return None
    return found.parent.name if found else None  # .../snapshots/<revision>/config.json


def _cached(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def _not_cached(name: str, detail: str = "") -> LabError:
    return LabError(f"model {name} is not {'fully ' if detail else ''}in the HF cache{detail} and the hub cannot be "
                    "reached; download it where there is network (huggingface-cli download) or pass a local directory")


def _hub_error(name: str, error: Exception) -> LabError:
    text = str(error)
    if any(w in text.lower() for w in ("offline", "connect", "resolve", "network", "max retries", "timed out")):
        return _not_cached(name)
    if "trust_remote_code" in text:
        return LabError(f"model {name} needs custom code; pass --trust-remote-code if you trust it")
    return LabError(f"model {name}: {first_line(error)}")


def _hub_reachable() -> bool:
    """A quick name lookup of the hub endpoint, so an offline machine fails at once, not after retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def load(spec: ModelSpec | str) -> Loaded:
    """Load a model and tokenizer, apply lab's fast paths as the spec says and compute the anatomy;
    every failure is a one-line LabError."""
    from lab import fast

    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    quiet_hf()
    device = resolve_device(spec.device)
    dtype = _dtype(spec)
    check_attention(spec.attn_implementation)
    fast.install()  # before the model exists, so that accelerate's hooks (device_map) wrap lab's dispatchers
    if spec.name.startswith(configs.PREFIXES):
        model, tokenizer = _build(spec, device, dtype), byte_tokenizer()
    elif device == "meta":
        raise LabError("device meta builds a model without weights: only for random: and config: specs")
    else:
        model, tokenizer = _from_pretrained(spec, device, dtype)
    fast.apply(model, spec.fast)
    return Loaded(model, tokenizer, build_anatomy(model), spec)


def _build(spec: ModelSpec, device: str, dtype):
    try:
        return configs.build(spec.name, device, dtype, spec.attn_implementation)
    except torch.OutOfMemoryError:
        raise _oom(spec, configs.spec_config(spec.name), device) from None
    except (ImportError, ValueError) as error:
        raise attention_error(spec.attn_implementation, error) or LabError(f"{spec.name}: {first_line(error)}") from None


def _from_pretrained(spec: ModelSpec, device: str, dtype):
    """Model and tokenizer from a folder or the HF cache (the hub only when it is reachable)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _folder(spec.name)
    config_file = folder / "config.json" if folder else _cached(spec.name, "config.json")
    online = folder is None and _hub_reachable()
    if config_file is None and not online:
        raise _not_cached(spec.name)
    if config_file is not None:
        read_config(config_file, spec.trust_remote_code)
    if folder is not None:
        check_tokenizer(folder)
        check_weights(folder, spec.allow_pickle)
    source = str(folder or spec.name)
    common = dict(trust_remote_code=spec.trust_remote_code, local_files_only=not online)
    try:
        config = AutoConfig.from_pretrained(source, **common)
        if config.model_type not in SUPPORTED:
            raise LabError(f"{spec.name} is a {config.model_type} model, not a supported hybrid; "
                           f"supported: {', '.join(SUPPORTED)}")
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if folder is None and not any(_cached(spec.name, name) for name in TOKENIZER_FILES):
            missing = " (no tokenizer.json / tokenizer_config.json)"
            raise LabError(f"model {spec.name} has no tokenizer{missing}") if online else _not_cached(spec.name, missing)
        check_tokenizer_encodes(str(folder or spec.name), tokenizer)
        model, info = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, attn_implementation=spec.attn_implementation,
            use_safetensors=None if spec.allow_pickle else True, output_loading_info=True,
            ignore_mismatched_sizes=True, device_map="auto" if device == "device_map" else None, **common)
        check_loading_info(spec.name, model, info)
        if device != "device_map":
            model = model.to(device)
    except torch.OutOfMemoryError:
        raise _oom(spec, config, device) from None
    except LOAD_ERRORS as error:
        raise _load_error(spec, folder, online, error) from None
    return model.eval(), tokenizer


def _load_error(spec: ModelSpec, folder: Path | None, online: bool, error: Exception) -> LabError:
    """A transformers or safetensors failure as one line: the attention asked for, the folder's files, a file
    missing from the HF cache offline, pickles only, else the hub's answer."""
    if isinstance(error, StrictDataclassError) and error.__cause__ is not None:  # a config value failed its check
        error = error.__cause__
    attention = attention_error(spec.attn_implementation, error)
    if attention:
        return attention
    if isinstance(error, (ArithmeticError, AssertionError)):  # a size of 0, a pad id past the vocabulary, ...
        return LabError(f"model {folder or spec.name}: its config.json describes no model that can be built "
                        f"({first_line(error)})")
    if folder is not None:
        return LabError(f"model {folder}: {first_line(error)}")
    if not online and isinstance(error, OSError):
        return _not_cached(spec.name, f" ({first_line(error).split('. ')[0]})")
    if "safetensors" in str(error).lower() and not spec.allow_pickle:
        return LabError(f"{spec.name} has no safetensors weights; pass --allow-pickle only if you trust it")
    return _hub_error(spec.name, error)


def _oom(spec: ModelSpec, config, device: str) -> LabError:
    free = ""
    if torch.cuda.is_available():
        free_bytes, total = torch.cuda.mem_get_info(device if device.startswith("cuda") else None)
        free = f"; {free_bytes / 2**30:.1f} of {total / 2**30:.1f} GiB free on the GPU"
    size = getattr(config, "num_parameters", None)
    hidden, layers = getattr(config, "hidden_size", 0), getattr(config, "num_hidden_layers", 0)
    guess = size or 12 * hidden * hidden * layers
    return LabError(f"out of memory loading {spec.name} (~{guess / 1e9:.1f} B parameters) on {device}{free}; "
                    "try --dtype bfloat16 or --device device_map")
