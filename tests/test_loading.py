"""Loading models from directories, the HF cache and configs: every bad input is a one-line LabError."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lab.cli import main
from lab.errors import LabError
from lab.models import ModelSpec, load
from lab.models.loading import BUILTIN_DIR
from lab.models.tiny import byte_tokenizer, tiny_config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _save(path, **overrides):
    """A tiny random RecurrentGemma saved as save_pretrained does, with its byte tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("recurrent_gemma", **overrides)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("saved"))


@pytest.fixture
def model_dir(saved, tmp_path):
    """A fresh copy of the saved model, to break."""
    for file in saved.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def _fails(spec, *fragments):
    with pytest.raises(LabError) as info:
        load(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _rewrite_weights(model_dir, keep=lambda name: True, **replace):
    weights = load_file(model_dir / "model.safetensors")
    weights = {name: replace.get(name, tensor) for name, tensor in weights.items() if keep(name)}
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def _edit_config(model_dir, **fields):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **fields}))


# 1. missing weights


def test_weights_file_without_tensors_is_refused(model_dir):
    save_file({}, model_dir / "model.safetensors", metadata={"format": "pt"})
    message = _fails(str(model_dir), "weights missing from the checkpoint", "model.embed_tokens.weight",
                     "it would run with random weights")
    assert message.count(",") < 6  # names a few, not all 112


def test_checkpoint_without_attention_weights_is_refused(model_dir):
    _rewrite_weights(model_dir, keep=lambda name: not any(p in name for p in ATTENTION))
    _fails(str(model_dir), "10 weights missing", "model.layers.2.temporal_block.")


def test_tied_lm_head_is_not_missing_but_an_untied_one_is(tmp_path):
    tied = load(str(_save(tmp_path / "tied")))  # save_pretrained leaves the tied lm_head out of the file
    assert tied.model.lm_head.weight.data_ptr() == tied.model.model.embed_tokens.weight.data_ptr()
    untied = _save(tmp_path / "untied", tie_word_embeddings=False)
    _rewrite_weights(untied, keep=lambda name: name != "lm_head.weight")
    _fails(str(untied), "1 weight missing", "lm_head.weight")


def test_builtins_and_saved_models_load_with_their_weights(saved):
    for name, path in (("toy-recurrentgemma", BUILTIN_DIR / "toy-recurrentgemma"),
                       ("toy-jamba", BUILTIN_DIR / "toy-jamba"), (str(saved), saved)):
        loaded = load(ModelSpec(name, device="cpu"))
        stored = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
        assert torch.equal(loaded.model.get_input_embeddings().weight, stored)


def test_wrong_shapes_are_refused(model_dir):
    name = "model.layers.0.temporal_block.linear_x.weight"
    _rewrite_weights(model_dir, **{name: torch.zeros(3, 3)})
    _fails(str(model_dir), "1 weight has the wrong shape", f"{name}: [3, 3] in the checkpoint, [64, 64] in the model")


# 2. local problems are named as such, not blamed on the hub


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "is not valid JSON: Expecting property name"),
    (b"", "is not valid JSON: the file is empty"),
    (bytes(range(256)), "is not valid JSON: not UTF-8 text"),
    (b"[1, 2]", "does not hold a JSON object"),
    (b'{"hidden_size": 64}', "has no model_type"),
], ids=["broken", "empty", "binary", "list", "no-model-type"])
def test_broken_config_json_says_what_is_wrong(model_dir, monkeypatch, content, reason):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (model_dir / "config.json").write_bytes(content)
    message = _fails(str(model_dir), f"{model_dir}/config.json {reason}")
    assert "HF cache" not in message


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 0), ("num_attention_heads", 0), ("hidden_size", 0),
                                        ("head_dim", 0), ("vocab_size", 200)])
def test_a_config_of_sizes_no_model_has_is_one_line(model_dir, key, value):
    """ZeroDivisionError and AssertionError (a pad id past the vocabulary) from transformers were tracebacks."""
    _edit_config(model_dir, **{key: value})
    _fails(str(model_dir), f"model {model_dir}: its config.json describes no model that can be built")


def test_a_config_of_fewer_layers_than_the_checkpoint_is_refused(model_dir):
    """The checkpoint's extra layers were dropped without a word: the model ran cut short."""
    import json

    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    _edit_config(model_dir, num_hidden_layers=layers - 1)
    _fails(str(model_dir), "the checkpoint has weights of layers the config does not build",
           f"model.layers.{layers - 1}.", f"config.json says {layers - 1} layers")


def test_missing_tokenizer_is_named(model_dir):
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer_config.json").unlink()
    _fails(str(model_dir), f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json)")


def test_a_tokenizer_without_a_vocabulary_is_refused(model_dir):
    """A tokenizer_config.json alone loaded a tokenizer of five tokens that encoded every text as <unk>: every
    trial scored 0 without a word."""
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>"}')
    _fails(str(model_dir), f"{model_dir}: its tokenizer encodes text as unknown tokens")


def test_a_tokenizer_that_cannot_encode_is_refused(model_dir):
    import json

    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["model"]["vocab"] = {"a": 0}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    _fails(str(model_dir), f"{model_dir}: its tokenizer cannot encode text")


def test_custom_code_needs_trust_remote_code(model_dir):
    _edit_config(model_dir, model_type="my_hybrid", auto_map={"AutoConfig": "my_code.MyConfig"})
    _fails(str(model_dir), f"{model_dir} needs its own code (auto_map); pass --trust-remote-code if you trust it")
    message = _fails(ModelSpec(str(model_dir), trust_remote_code=True), str(model_dir))  # trusted, but no my_code.py
    assert "HF cache" not in message


def test_auto_map_beside_a_transformers_model_type_loads_with_transformers_code(model_dir):
    _edit_config(model_dir, auto_map={"AutoModelForCausalLM": "my_code.MyModel"})
    assert load(str(model_dir)).anatomy.num_layers == 6


@pytest.mark.parametrize("attn, reason", [
    ("foo", "attn_implementation 'foo' is not one of eager, "),
    (3, "attn_implementation must be a name such as 'sdpa', not 3"),
])
@pytest.mark.parametrize("where", ["directory", "random:recurrent_gemma"])
def test_bad_attn_implementation_is_named(model_dir, attn, reason, where):
    name = str(model_dir) if where == "directory" else where
    _fails(ModelSpec(name, attn_implementation=attn), reason)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
@pytest.mark.parametrize("where", ["directory", "random:recurrent_gemma"])
def test_flash_attention_without_its_package_is_one_line(model_dir, where):
    name = str(model_dir) if where == "directory" else where
    _fails(ModelSpec(name, attn_implementation="flash_attention_2"), "attn_implementation 'flash_attention_2' cannot")


def test_uncached_hub_id_offline_says_not_in_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails("some-org/not-cached-model", "not in the HF cache")


def test_hub_ids_in_the_cache_offline(saved, tmp_path):
    """A hub id is looked up in the HF cache (a subprocess: the cache folder is read when huggingface_hub is
    imported): complete, broken config, without tokenizer, without weights, absent."""
    import os
    import subprocess
    import sys

    for repo, skip in (("good", ""), ("broken", ""), ("notok", "tokenizer"), ("noweights", "model.safetensors")):
        root = tmp_path / f"models--org--{repo}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        (root / "snapshots" / ("0" * 40)).mkdir(parents=True)
        for file in saved.iterdir():
            if not (skip and file.name.startswith(skip)):
                (root / "snapshots" / ("0" * 40) / file.name).write_bytes(file.read_bytes())
    (tmp_path / "models--org--broken" / "snapshots" / ("0" * 40) / "config.json").write_text("{oops")
    code = ("from lab.models import load\nfrom lab.errors import LabError\n"
            "for repo in ('good', 'broken', 'notok', 'noweights', 'absent'):\n"
            "    try:\n        print(load('org/' + repo).anatomy.num_layers)\n"
            "    except LabError as error:\n        print(error)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    lines = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[0] == "6"
    assert lines[1].endswith("config.json is not valid JSON: Expecting property name enclosed in double quotes: "
                             "line 1 column 2 (char 1)")
    assert lines[2].startswith("model org/notok is not fully in the HF cache (no tokenizer.json / tokenizer_config")
    assert lines[3].startswith("model org/noweights is not fully in the HF cache (org/noweights does not appear to "
                               "have a file named model.safetensors")
    assert lines[4].startswith("model org/absent is not in the HF cache and the hub cannot be reached")


# 3. bad weights files


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[:-1000], "file not fully covered"),
    (lambda data: data[:5000], "invalid header length"),
    (lambda data: b"", "header too small"),
    (lambda data: b"\xff" * 8 + data[8:], "header too large"),
], ids=["truncated-data", "truncated-header", "zero-bytes", "bad-header"])
def test_damaged_safetensors_file_is_one_line(model_dir, damage, reason):
    path = model_dir / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    _fails(str(model_dir), f"{path} is not a readable safetensors file", reason)


def test_no_weights_and_pickled_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    _fails(str(model_dir), f"{model_dir} has no weights (model.safetensors)")
    (model_dir / "pytorch_model.bin").write_bytes(b"not read")
    _fails(str(model_dir), "only pickled weights", "--allow-pickle")


def test_cli_prints_one_line_for_a_broken_model(model_dir, capsys):
    (model_dir / "config.json").write_bytes(b"")
    assert main(["inspect", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lab: ") and err.count("\n") == 1 and "Traceback" not in err


# found by the hostile-input pass after the fixes above

@pytest.mark.parametrize("name", ["héllo/wörld", "x/.y", "a" * 200, "a--b/c", ""])
def test_names_that_are_no_hub_id_are_one_line(name):
    _fails(ModelSpec(name), "model name is empty" if not name else "unknown model")


@pytest.mark.parametrize("fields, reason", [({"num_hidden_layers": -3}, "`num_hidden_layers` (-3) must be equal"),
                                            ({"dtype": "banana"}, "no attribute 'banana'")])
def test_bad_config_values_are_one_line(model_dir, fields, reason):
    _edit_config(model_dir, **fields)
    _fails(str(model_dir), str(model_dir), reason)


def test_a_model_directory_whose_weights_changed_is_another_run(tmp_path, monkeypatch):
    """The run's identity held the directory's name only: other weights saved under it (or the same name in
    another folder) resumed the old run's trials and printed their accuracy."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lab import presets
    from lab.probes.needle import NeedleSpec
    from lab.runner import Started, run
    from lab.store import Store

    folder = _save(tmp_path / "a" / "m")
    shutil.copytree(folder, tmp_path / "b" / "m")
    monkeypatch.chdir(tmp_path / "a")
    preset = presets.Preset(name="p", model=ModelSpec("m"), needle=NeedleSpec(
        task="passkey", lengths=(300,), depths=(0,), max_new_tokens=8))
    store = Store(tmp_path / "r.sqlite")
    first = next(e for e in list(run(preset, store)) if isinstance(e, Started))
    unchanged = preset.fingerprint()
    again = next(e for e in list(run(preset, store)) if isinstance(e, Started))
    assert (again.run_id, again.skipped) == (first.run_id, 1)  # the same files: the same run, resumed
    monkeypatch.chdir(tmp_path / "b")
    assert preset.fingerprint() != unchanged  # ./m is another folder here
    monkeypatch.chdir(tmp_path / "a")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(tiny_config("recurrent_gemma")).save_pretrained(folder)
    assert preset.fingerprint() != unchanged
    second = next(e for e in list(run(preset, store)) if isinstance(e, Started))
    assert second.run_id != first.run_id and second.skipped == 0


def test_large_files_are_known_by_size_and_time_small_ones_by_their_bytes(tmp_path, monkeypatch):
    from lab import digest

    (tmp_path / "w.safetensors").write_bytes(b"1234")
    small = digest.folder_digest(tmp_path)
    monkeypatch.setattr(digest, "READ_WHOLE", 2)  # every file here is "large" now
    digest._file_digest.cache_clear()
    large = digest.folder_digest(tmp_path)
    assert large != small and digest.folder_digest(tmp_path) == large
    (tmp_path / "w.safetensors").write_bytes(b"12345")
    assert digest.folder_digest(tmp_path) != large
    assert digest.folder_digest(tmp_path / "missing") == "unreadable"
