"""Load a model spec (builtin toy, random tiny config, local directory or hub id)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.errors import LabError
from lab.models.anatomy import SUPPORTED, Anatomy, build_anatomy
from lab.models.spec import ModelSpec

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "toy" / "models"
BUILTINS = ("toy-recurrentgemma", "toy-jamba")
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    if device not in ("cpu", "device_map") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise LabError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or device_map")
    return device


def _dtype(spec: ModelSpec):
    if spec.dtype not in DTYPES:
        raise LabError(f"unknown dtype {spec.dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[spec.dtype]


def _source(name: str) -> str:
    """A local directory or hub id for `name`, or a LabError."""
    if name in BUILTINS:
        path = BUILTIN_DIR / name
        if not (path / "config.json").exists():
            raise LabError(f"builtin model {name} is missing from {path}; train it with python -m lab.toy.train")
        return str(path)
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise LabError(f"{path} has no config.json; save the model with save_pretrained")
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return name
    raise LabError(f"unknown model {name!r}: not a builtin ({', '.join(BUILTINS)}), random:<type>, directory or hub id")


def _hub_error(name: str, error: Exception) -> LabError:
    text = str(error)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or any(
        w in text.lower() for w in ("offline", "connection", "resolve", "network", "max retries", "timed out"))
    if offline:
        return LabError(f"model {name} is not in the HF cache and the hub cannot be reached; "
                        "download it where there is network (huggingface-cli download) or pass a local directory")
    if "trust_remote_code" in text:
        return LabError(f"model {name} needs custom code; pass --trust-remote-code if you trust it")
    return LabError(f"unknown model {name}: {text.splitlines()[0] if text else type(error).__name__}")


def _hub_reachable() -> bool:
    """A quick name lookup of the hub endpoint, so an offline machine fails at once, not after retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def _load_config(source: str, spec: ModelSpec):
    """The config from a directory or the HF cache; the hub only when it is reachable."""
    from transformers import AutoConfig

    kwargs = dict(trust_remote_code=spec.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        if Path(source).is_dir() or not _hub_reachable():
            raise _hub_error(spec.name, error if Path(source).is_dir() else OSError("offline")) from None
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error(spec.name, error) from None


def load(spec: ModelSpec | str) -> Loaded:
    """Load a model and tokenizer and compute its anatomy; every failure is a one-line LabError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab import fast

    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    quiet_hf()
    fast.enable(spec.fast)
    device = resolve_device(spec.device)
    dtype = _dtype(spec)
    if spec.name.startswith("random:"):
        return _load_random(spec, device, dtype)
    source = _source(spec.name)
    config = _load_config(source, spec)
    if config.model_type not in SUPPORTED:
        raise LabError(f"{spec.name} is a {config.model_type} model, not a supported hybrid; "
                       f"supported: {', '.join(SUPPORTED)}")
    kwargs = dict(dtype=dtype, attn_implementation=spec.attn_implementation,
                  trust_remote_code=spec.trust_remote_code, use_safetensors=None if spec.allow_pickle else True)
    if device == "device_map":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if device != "device_map":
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    except torch.OutOfMemoryError:
        raise _oom(spec, config, device) from None
    except (OSError, ValueError) as error:
        if "safetensors" in str(error).lower():
            raise LabError(f"{spec.name} has no safetensors weights; pass --allow-pickle only if you trust it") from None
        raise _hub_error(spec.name, error) from None
    model.eval()
    return Loaded(model, tokenizer, build_anatomy(model), spec)


def _load_random(spec: ModelSpec, device: str, dtype) -> Loaded:
    from transformers import AutoModelForCausalLM

    from lab.models.tiny import byte_tokenizer, tiny_config

    config = tiny_config(spec.name.split(":", 1)[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation)
    if dtype != "auto":
        model = model.to(dtype)
    model = model.to("cpu" if device == "device_map" else device).eval()
    return Loaded(model, byte_tokenizer(), build_anatomy(model), spec)


def _oom(spec: ModelSpec, config, device: str) -> LabError:
    free = ""
    if torch.cuda.is_available():
        free_bytes, total = torch.cuda.mem_get_info()
        free = f"; {free_bytes / 2**30:.1f} of {total / 2**30:.1f} GiB free on the GPU"
    size = getattr(config, "num_parameters", None)
    hidden, layers = getattr(config, "hidden_size", 0), getattr(config, "num_hidden_layers", 0)
    guess = size or 12 * hidden * hidden * layers
    return LabError(f"out of memory loading {spec.name} (~{guess / 1e9:.1f} B parameters) on {device}{free}; "
                    "try --dtype bfloat16 or --device device_map")
