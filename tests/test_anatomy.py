import json

import pytest
import torch

from lab.errors import LabError
from lab.models import ADAPTERS, build_anatomy, load
from lab.models.anatomy import ATTENTION_TYPES

from conftest import tiny


def test_anatomy_matches_config(any_model):
    config, anatomy = any_model.model.config, any_model.anatomy
    assert anatomy.num_layers == config.num_hidden_layers
    expected_attention = [i for i, t in enumerate(config.layer_types) if t in ATTENTION_TYPES]
    assert anatomy.attention_layers == expected_attention
    for layer, block in anatomy.blocks("attention"):
        proj = any_model.model.get_submodule(block.out_proj)
        assert block.heads == config.num_attention_heads
        assert block.heads * block.head_dim == proj.in_features
        assert block.kv_heads >= 1 and block.heads % block.kv_heads == 0
        assert block.out_bias == (proj.bias is not None)
    for _, block in anatomy.blocks():
        any_model.model.get_submodule(block.path)  # every path resolves


def test_every_layer_has_its_mixer(any_model):
    for layer in any_model.anatomy.layers:
        kinds = {b.kind for b in layer.blocks}
        if layer.layer_type in ("mlp", "moe"):
            assert kinds == {layer.layer_type}
        else:
            assert kinds & {"attention", "ssm"}


def test_recurrentgemma_details():
    anatomy = tiny("recurrent_gemma").anatomy
    assert anatomy.attention_layers == [2, 5]
    block = anatomy.attention(2)
    assert (block.flavour, block.window, block.kv_heads, block.out_bias) == ("sliding", 32, 1, True)
    assert {b.flavour for _, b in anatomy.blocks("ssm")} == {"rg-lru"}
    assert any("bias" in note for note in anatomy.notes)


def test_jamba_has_moe_with_experts():
    anatomy = tiny("jamba").anatomy
    moe = anatomy.blocks("moe")
    assert [i for i, _ in moe] == [1, 3] and all(b.experts == 4 for _, b in moe)
    assert {b.flavour for _, b in anatomy.blocks("ssm")} == {"mamba"}


def test_pure_ssm_has_no_heads():
    anatomy = tiny("mamba").anatomy
    assert anatomy.total_heads == 0 and len(anatomy.blocks("ssm")) == 2


def test_json_shape(any_model):
    data = json.loads(json.dumps(any_model.anatomy.to_json()))
    assert set(data) == {"architecture", "num_layers", "layers"}
    for layer in data["layers"]:
        for block in layer["blocks"]:
            moe = {"experts", "top_k", "router", "experts_path"} if block["kind"] == "moe" else set()
            assert set(block) == {"kind", "flavour", "heads", "kv_heads", "head_dim", "window", "path"} | moe
            assert block["kind"] in ("attention", "ssm", "mlp", "moe")


def test_adapters_cover_the_issue_list():
    assert set(ADAPTERS) >= {"recurrent_gemma", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid",
                             "nemotron_h", "lfm2", "lfm2_moe", "qwen3_next", "minimax", "olmo_hybrid", "kimi_linear"}


def test_not_a_hybrid_is_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(LabError, match="not a supported hybrid"):
        build_anatomy(model)


def test_layer_errors():
    anatomy = tiny("jamba").anatomy
    with pytest.raises(LabError, match="out of range"):
        anatomy.attention(9)
    with pytest.raises(LabError, match="no attention heads"):
        anatomy.attention(0)


@pytest.mark.parametrize("spec, message", [
    ("./does/not/exist", "unknown model"),
    ("random:gpt2", "no tiny config"),
    ("some-org/not-cached-model", "not in the HF cache"),
    ("has spaces", "unknown model"),
])
def test_load_errors_are_one_line(spec, message):
    with pytest.raises(LabError, match=message) as info:
        load(spec)
    assert "\n" not in str(info.value)


def test_local_directory_roundtrip(tmp_path):
    loaded = tiny("recurrent_gemma")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x).logits, again.model(x).logits, atol=1e-5)
    assert again.tokenizer("abc")["input_ids"] == loaded.tokenizer("abc")["input_ids"]
    assert again.anatomy == loaded.anatomy


def test_directory_without_config(tmp_path):
    with pytest.raises(LabError, match="no config.json"):
        load(str(tmp_path))
