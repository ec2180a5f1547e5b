import json

import pytest

from lab.cli import main
from lab.errors import LabError
from lab.models import ModelSpec, load
from lab.models.configs import PUBLISHED, published_config


def test_bench_reports_every_measure(capsys, monkeypatch):
    from lab.probes import mmlu, needle

    batches = {"needle": 0, "mmlu": 0}
    for name, probe in (("needle", needle), ("mmlu", mmlu)):
        real = probe.run_batch
        monkeypatch.setattr(probe, "run_batch", lambda *args, real=real, name=name: batches.update(
            {name: batches[name] + 1}) or real(*args))
    assert main(["bench", "random:recurrent_gemma", "--device", "cpu", "--json"]) == 0  # a GPU times the full grid
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"needle_grid", "needle_grid_shared", "mmlu", "plan_overhead", "prefill"}
    grid = data["needle_grid"]
    assert grid["prompts"] == 12 and grid["reference_measured_prompts"] == 4
    assert grid["lab_s"] > 0 and grid["reference_s"] > 0 and grid["speedup"] > 0
    assert data["mmlu"]["questions"] == 16 and data["prefill"]["tokens_per_s"] > 0
    # lab's paths are timed on their second pass over every batch: the first compiles kernels for their shapes
    assert grid["lab_first_pass_s"] > 0 and data["mmlu"]["lab_first_pass_qps"] > 0
    # one haystack per trial (the paper's): timed as lab runs it (prompts continuing a trunk: lab.fast.fork) and
    # with every prompt whole
    shared = data["needle_grid_shared"]
    assert shared["prompts"] == 12 and shared["lab_s"] > 0 and shared["whole_prompts_s"] > 0
    assert 0.1 < shared["shared_tokens"] < 0.5
    # 12 prompts in batches of 8, two passes (the shared grid: two each way), 16 questions in batches of 8
    assert batches == {"needle": 2 * 2 + 2 * 2 * 2, "mmlu": 2 * 2}
    assert [plan["batch"] for plan in data["plan_overhead"]] == [1]  # a GPU adds a batch of 8


def test_bench_shared_haystack_row_on_jamba(monkeypatch):
    """Jamba's prompts continue a trunk of the shared haystack: the row says how much of the prompts it saved."""
    from lab import bench
    from lab.fast import fork

    monkeypatch.setattr(fork, "OVERHEAD", dict.fromkeys(fork.OVERHEAD, 64))  # the CPU grid's prompts are short
    row = bench.bench_needle(load(ModelSpec("random:jamba", device="cpu")), (256, 512, 768), (0, 50, 100), 0,
                             haystack_per="trial")
    assert row["prompts"] == 9 and row["lab_s"] > 0 and row["whole_prompts_s"] > 0
    assert 0.1 < row["shared_tokens"] < 0.5


SHAPES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
          "vocab_size")


@pytest.mark.parametrize("name, shape", [
    ("recurrentgemma-2b", (26, 2560, 15360, 10, 1, 256000)),  # the published config.json files' fields
    ("recurrentgemma-9b", (38, 4096, 24576, 16, 1, 256000)),  # (Griffin's attention is multi-query)
    ("jamba-mini-1.6", (32, 4096, 14336, 32, 8, 65536))])
def test_published_configs_are_the_published_models(name, shape):
    config = published_config(name)  # the config alone: no weights are built
    assert tuple(getattr(config, field) for field in SHAPES) == shape
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (256, 257, 258)  # the byte tokenizer's


@pytest.mark.parametrize("name, layers, billions", [("recurrentgemma-2b", 26, 2.68), ("recurrentgemma-9b", 38, 8.58),
                                                    ("jamba-mini-1.6", 32, 51.57)])
def test_config_specs_load_on_the_meta_device(name, layers, billions):
    """`config:` specs are model specs like any other; on the meta device nothing is allocated. Their parameter
    counts are the published models' (a byte tokenizer reads and writes the first 260 ids of the vocabulary)."""
    assert set(PUBLISHED) == {"recurrentgemma-2b", "recurrentgemma-9b", "jamba-mini-1.6"}
    loaded = load(ModelSpec(f"config:{name}", device="meta"))
    assert loaded.device.type == "meta" and loaded.anatomy.num_layers == layers
    assert round(loaded.num_params / 1e9, 2) == billions


def test_config_spec_errors_are_one_line(capsys):
    with pytest.raises(LabError, match="unknown published config 'gpt-5'; known: recurrentgemma-2b"):
        load("config:gpt-5")
    with pytest.raises(LabError, match="device meta .* only for random: and config: specs"):
        load(ModelSpec("toy-recurrentgemma", device="meta"))
    assert main(["inspect", "config:jamba-mini-1.6", "--device", "meta", "--json"]) == 0
    assert '"architecture": "jamba", "num_layers": 32' in capsys.readouterr().out


def test_config_too_large_for_this_machine_is_refused_before_building(monkeypatch):
    from lab.models import configs

    monkeypatch.setattr(configs, "available_memory", lambda: 2**30)
    with pytest.raises(LabError, match=r"config:recurrentgemma-2b needs 10 GiB for its weights, 1 GiB are free here; "
                                       "use --device meta"):
        load(ModelSpec("config:recurrentgemma-2b", device="cpu"))


def test_bench_rows_run_alone_and_a_failing_row_is_reported_not_fatal(capsys, monkeypatch):
    import torch

    from lab import bench

    assert main(["bench", "random:jamba", "--device", "cpu", "--rows", "prefill", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "prefill" in data and not {"needle_grid", "mmlu", "plan_overhead"} & set(data)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "bench_mmlu", out_of_memory)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["bench", "random:jamba", "--device", "cpu", "--rows", "mmlu,prefill"]) == 0
    out = capsys.readouterr().out
    assert "skipped: out of memory at 16 questions, batch 8" in out and "tokens/s" in out


def test_bench_bad_rows_fail_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("lab.bench.load_for_bench", lambda *a: pytest.fail("loaded a model"))
    assert main(["bench", "random:jamba", "--rows", "needle,speed"]) == 2
    assert capsys.readouterr().err.strip() == "lab: unknown bench row 'speed'; rows: needle, needle-shared, mmlu, plans, prefill"
    assert main(["bench", "random:jamba", "--rows", ""]) == 2  # not every row
    assert capsys.readouterr().err.strip() == "lab: unknown bench row ''; rows: needle, needle-shared, mmlu, plans, prefill"
    assert main(["bench", "random:jamba", "--rows", "needle,mmlu,needle"]) == 2  # a typo: refused as lengths named twice are
    assert capsys.readouterr().err.strip() == "lab: bench row 'needle' is named twice"


def test_flops_count_the_experts_a_token_uses():
    from lab.bench import active_parameters

    loaded = load(ModelSpec("random:jamba"))  # 2 of 4 experts per token in its two MoE layers
    dense = loaded.num_params - loaded.model.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for layer, block in loaded.anatomy.blocks("moe")
                  for p in loaded.model.get_submodule(block.path).experts.parameters())
    assert active_parameters(loaded) == dense - experts // 2


def test_eager_attention_out_of_memory_leaves_the_other_plan_figures(monkeypatch):
    """At 8 x 4096 on Jamba-Mini eager attention's weights did not fit and took the whole plan row with them:
    now only the comparison with eager is missing, and the table says why."""
    import torch
    from rich.console import Console

    from lab import bench
    from lab.report import _plan_table

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "_eager_baseline", out_of_memory)
    row = bench.bench_plans(load(ModelSpec("random:jamba", device="cpu")), 64, 1, repeats=1)
    assert row["sparsify_overhead_vs_eager"] is None
    assert {"base_s", "heads_off_overhead", "sparsify_overhead_vs_default"} <= set(row)
    console = Console(width=120, record=True)
    console.print(_plan_table({**row, "batch": 1, "length": 64}))
    assert "eager out of memory" in console.export_text()


def test_bench_without_the_reference_paths(capsys, monkeypatch):
    """--reference 0 times lab's paths only (the reference of a 9B model takes minutes a prompt); the table says
    what was not timed; a negative count fails before any model loads."""
    from lab import bench

    monkeypatch.setattr(bench, "_reference_generate", lambda *a: pytest.fail("ran the reference"))
    assert main(["bench", "random:jamba", "--device", "cpu", "--rows", "needle,mmlu", "--reference", "0",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["needle_grid"]["lab_s"] > 0 and data["needle_grid"]["reference_s"] is None
    assert data["mmlu"]["lab_qps"] > 0 and data["mmlu"]["per_choice_qps"] is None
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["bench", "random:jamba", "--device", "cpu", "--rows", "mmlu", "--reference", "0"]) == 0
    assert "not timed" in capsys.readouterr().out
    monkeypatch.setattr("lab.bench.load_for_bench", lambda *a: pytest.fail("loaded a model"))
    assert main(["bench", "random:jamba", "--reference", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "lab: --reference -1: give a number of prompts >= 0 (0: lab's paths only)"


def test_bench_passes_report_the_median_and_the_range(capsys, monkeypatch):
    """--passes N times lab's needle and MMLU paths over N passes after the first (compiling) one: the median is
    the figure, the fastest and slowest beside it; 0 passes fail before any model loads."""
    from lab import bench

    seconds = iter([9.0, 3.0, 1.0, 2.0,  9.0, 5.0, 4.0, 6.0,  9.0, 0.5, 0.25, 1.0])  # first pass, then three
    monkeypatch.setattr(bench, "_timed", lambda loaded, run: next(seconds))
    assert main(["bench", "random:recurrent_gemma", "--device", "cpu", "--rows", "needle-shared,mmlu",
                 "--reference", "0", "--passes", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    shared, mmlu = data["needle_grid_shared"], data["mmlu"]
    assert (shared["lab_s"], shared["lab_range_s"], shared["lab_first_pass_s"]) == (2.0, [1.0, 3.0], 9.0)
    assert (shared["whole_prompts_s"], shared["whole_prompts_range_s"]) == (5.0, [4.0, 6.0])
    assert (mmlu["lab_qps"], mmlu["lab_qps_range"]) == (32.0, [16.0, 64.0])  # 16 questions
    assert next(seconds, None) is None
    seconds = iter([9.0, 3.0, 1.0, 2.0,  9.0, 5.0, 4.0, 6.0])
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["bench", "random:recurrent_gemma", "--device", "cpu", "--rows", "needle-shared", "--reference", "0",
                 "--passes", "3"]) == 0
    assert "2.00 s (1.00-3.00)" in capsys.readouterr().out
    monkeypatch.setattr("lab.bench.load_for_bench", lambda *a: pytest.fail("loaded a model"))
    for passes in ("0", "99999999999999999999"):
        assert main(["bench", "random:jamba", "--passes", passes]) == 2
        assert capsys.readouterr().err.strip() == f"lab: --passes {passes}: give a number of timed passes from 1 to 100"


@pytest.mark.parametrize("row", ["prefill", "plans"])
def test_prefill_and_plan_rows_time_the_prompt_pass_probes_run(row):
    """Probes keep the logits of a prompt's last position only; a 256k-token output layer over every position
    (a fifth of recurrentgemma-2b's prefill on an H200) is not part of either measure."""
    from lab import bench
    from conftest import tiny

    loaded = tiny("jamba")
    seen = []
    hook = loaded.model.register_forward_hook(lambda module, args, out: seen.append(out.logits.shape[1]))
    try:
        getattr(bench, f"bench_{row}")(loaded, 16, 2, repeats=1)
    finally:
        hook.remove()
    assert seen and set(seen) == {1}
