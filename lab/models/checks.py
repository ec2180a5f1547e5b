"""Checks of a model's files and of what transformers loaded, each failure a one-line LabError.

transformers reads a broken folder in ways that hide the cause (a bad config.json looks like a
missing hub model, a folder without a tokenizer gets an empty one, weights missing from the file are
left at their random initialisation). These checks name the actual problem first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lab.errors import LabError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SHOWN = 3  # names listed in a message about many weights


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_config(path: Path, trust_remote_code: bool) -> dict:
    """config.json as a dict, or a LabError saying what is wrong with it."""
    if not path.is_file():
        raise LabError(f"{path.parent} has no config.json; save the model with save_pretrained")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LabError(f"cannot read {path}: {error.strerror}") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LabError(f"{path} is not valid JSON: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise LabError(f"{path} is not valid JSON: {'the file is empty' if not raw.strip() else error}") from None
    if not isinstance(config, dict):
        raise LabError(f"{path} does not hold a JSON object")
    if not isinstance(config.get("model_type"), str):
        raise LabError(f"{path} has no model_type; save the model with save_pretrained")
    _check_code(config, path.parent, trust_remote_code)
    return config


def _check_code(config: dict, folder: Path, trust_remote_code: bool) -> None:
    """A model type that transformers lacks runs the repository's own code (auto_map): only when trusted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "auto_map" in config and config["model_type"] not in CONFIG_MAPPING and not trust_remote_code:
        raise LabError(f"{folder} needs its own code (auto_map); pass --trust-remote-code if you trust it")


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LabError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")


def check_tokenizer_encodes(name: str, tokenizer) -> None:
    """Refuse a tokenizer that cannot encode text, or whose encoding loses it (a tokenizer_config.json without its
    vocabulary encodes everything as <unk>): every trial would fail without a word."""
    sample = "The passkey is 12345."
    try:
        ids = tokenizer.encode(sample, add_special_tokens=False)
        back = tokenizer.decode(ids)
    except Exception as error:  # the tokenizers library raises plain Exceptions
        raise LabError(f"{name}: its tokenizer cannot encode text ({first_line(error)}); save it again") from None
    if "12345" not in back.replace(" ", ""):
        raise LabError(f"{name}: its tokenizer encodes text as unknown tokens ({sample!r} comes back as "
                       f"{back[:40]!r}, {len(tokenizer)} tokens in its vocabulary); its vocabulary file is missing")


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Every *.safetensors file readable (header complete, data covered); pickles only when allowed."""
    from safetensors import SafetensorError, safe_open

    tensors = sorted(folder.glob("*.safetensors"))
    for path in tensors:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise LabError(f"{path} is not a readable safetensors file ({first_line(error)}); "
                           "save the weights again") from None
    if tensors:
        return
    if not any(folder.glob("pytorch_model*.bin")):
        raise LabError(f"{folder} has no weights (model.safetensors); save the model with save_pretrained")
    if not allow_pickle:
        raise LabError(f"{folder} has only pickled weights (pytorch_model.bin); "
                       "pass --allow-pickle only if you trust them (a pickle can run code)")


def check_loading_info(name: str, model, info: dict) -> None:
    """Refuse a model whose checkpoint lacked weights, held wrongly shaped ones or failed to load.

    An output embedding tied to the input embedding is never stored, so it is not missing."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(info["missing_keys"]) - tied)
    if missing:
        raise LabError(f"model {name}: {_count(missing)} missing from the checkpoint ({_few(missing)}); "
                       "it would run with random weights")
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        shapes = [f"{key}: {list(stored)} in the checkpoint, {list(wanted)} in the model"
                  for key, stored, wanted in mismatched]
        verb = "has" if len(mismatched) == 1 else "have"
        raise LabError(f"model {name}: {_count(mismatched)} {verb} the wrong shape ({_few(shapes)})")
    if info["error_msgs"]:
        raise LabError(f"model {name}: the weights did not load: {info['error_msgs'][0].splitlines()[0]}")
    layers = getattr(model.config, "num_hidden_layers", 0)
    beyond = sorted(key for key in info.get("unexpected_keys", ()) if _layer_index(key) >= layers > 0)
    if beyond:  # a config.json of fewer layers than the checkpoint: the model would run cut short
        raise LabError(f"model {name}: the checkpoint has weights of layers the config does not build ({_few(beyond)}); "
                       f"config.json says {layers} layers")


def _layer_index(key: str) -> int:
    """N in a weight's name "...layers.N...", else -1."""
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
    return int(found.group(1)) if found else -1


def _count(items: list) -> str:
    return f"{len(items)} weight" + ("" if len(items) == 1 else "s")


def _few(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def check_attention(value) -> None:
    """attn_implementation: None (transformers' default), one of transformers' names, or a hub kernel."""
    if value is None:
        return
    if not isinstance(value, str):
        raise LabError(f"attn_implementation must be a name such as 'sdpa', not {value!r}")
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if value not in known and not is_kernel(value):
        raise LabError(f"attn_implementation {value!r} is not one of {', '.join(known)}")


def attention_error(value, error: BaseException) -> LabError | None:
    """The LabError for transformers refusing the attention asked for (a package missing, not supported)."""
    text = str(error)
    if value is not None and (isinstance(error, ImportError) or "ttention" in text):
        return LabError(f"attn_implementation {value!r} cannot be used with this model here: {first_line(error)}")
    return None
