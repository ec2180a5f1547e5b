"""Models built from a config with random weights: `random:<type>` (tiny, lab.models.tiny) and
`config:<name>` (published architectures, for benchmarks). Nothing is downloaded.

`--device meta` builds the module tree without memory (for `lab inspect config:jamba-mini-1.6`).
"""

from __future__ import annotations

import torch

from lab.errors import LabError

PUBLISHED = {  # name -> (model_type, the fields of its published config.json that differ from transformers' defaults)
    "recurrentgemma-2b": ("recurrent_gemma", dict(intermediate_size=15360, num_key_value_heads=1)),  # multi-query
    "recurrentgemma-9b": ("recurrent_gemma", dict(hidden_size=4096, lru_width=4096, num_hidden_layers=38,
                                                  num_attention_heads=16, num_key_value_heads=1,
                                                  intermediate_size=24576)),
    "jamba-mini-1.6": ("jamba", {}),  # JambaConfig's defaults: 32 layers, 16 experts (52 B parameters)
}
PREFIXES = ("random:", "config:")


def published_config(name: str):
    """The config of a published model, without weights: its vocabulary's size, of which lab's byte tokenizer
    reads and writes the first 260 ids (its special ids are the byte tokenizer's)."""
    from transformers import AutoConfig

    from lab.models.tiny import BOS, EOS, PAD

    if name not in PUBLISHED:
        raise LabError(f"unknown published config {name!r}; known: {', '.join(PUBLISHED)}")
    model_type, fields = PUBLISHED[name]
    return AutoConfig.for_model(model_type, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, **fields)


def spec_config(name: str):
    """The config a `random:` or `config:` spec name stands for."""
    from lab.models.tiny import tiny_config

    prefix, rest = name.split(":", 1)
    return tiny_config(rest) if prefix == "random" else published_config(rest)


def build(name: str, device: str, dtype, attn_implementation):
    """The model of a `random:`/`config:` spec, seeded, in eval mode. dtype "auto": bfloat16 for a published
    config on a GPU, else float32."""
    from transformers import AutoModelForCausalLM

    config = spec_config(name)
    if device == "device_map":
        if name.startswith("config:"):
            raise LabError(f"{name} builds its random weights on one device; use --device cuda or cpu")
        device = "cpu"
    if dtype == "auto":
        dtype = torch.bfloat16 if name.startswith("config:") and device.startswith("cuda") else torch.float32
    if device == "cpu" and name.startswith("config:"):
        _check_fits_in_memory(name, config, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation).eval()


def _check_fits_in_memory(name: str, config, dtype) -> None:
    """A published config too large for this machine's free memory is refused before the kernel's OOM killer
    ends the process (sized by building it on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_memory()
    if free is not None and needed > free:
        raise LabError(f"{name} needs {needed / 2**30:.0f} GiB for its weights, {free / 2**30:.0f} GiB are free here; "
                       "use --device meta to inspect it, or a GPU")


def available_memory() -> int | None:
    """Bytes of memory available on this machine (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
