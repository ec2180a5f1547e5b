import json

from lab.bench import PUBLISHED
from lab.cli import main


def test_bench_reports_every_measure(capsys):
    assert main(["bench", "random:recurrent_gemma", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"needle_grid", "mmlu", "plan_overhead", "prefill"}
    grid = data["needle_grid"]
    assert grid["prompts"] == 12 and grid["reference_measured_prompts"] == 4
    assert grid["lab_s"] > 0 and grid["reference_s"] > 0 and grid["speedup"] > 0
    assert data["mmlu"]["questions"] == 16 and data["prefill"]["tokens_per_s"] > 0
    assert [plan["batch"] for plan in data["plan_overhead"]] == [1]  # a GPU adds a batch of 8


def test_published_configs_are_built_in_code():
    assert set(PUBLISHED) == {"recurrentgemma-2b", "recurrentgemma-9b", "jamba-mini-1.6"}
    from transformers import AutoConfig

    model_type, overrides = PUBLISHED["recurrentgemma-2b"]
    config = AutoConfig.for_model(model_type, **overrides)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (26, 2560, 10)
