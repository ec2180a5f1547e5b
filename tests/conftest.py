import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["LAB_DB"] = os.path.join(tempfile.mkdtemp(prefix="lab-tests-"), "results.sqlite")  # never the user's
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from lab.models import SUPPORTED, ModelSpec, load  # noqa: E402

_CACHE: dict = {}


def tiny(arch: str):
    """A tiny random model of `arch` (cached; tests must leave it as they found it)."""
    if arch not in _CACHE:
        loaded = load(ModelSpec(f"random:{arch}", device="cpu"))  # CPU tests, on a GPU machine too
        torch.manual_seed(1)
        for name, param in loaded.model.named_parameters():
            if name.endswith(("o_proj.bias", "out_proj.bias")):  # random init zeroes biases; make them matter
                torch.nn.init.normal_(param, std=0.5)
        _CACHE[arch] = loaded
    return _CACHE[arch]


HYBRIDS = [a for a in SUPPORTED if a not in ("mamba", "mamba2")]


@pytest.fixture(params=SUPPORTED)
def any_model(request):
    return tiny(request.param)


@pytest.fixture(params=HYBRIDS)
def hybrid(request):
    return tiny(request.param)


def ids(batch=2, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


DEMO_PRESET = """
name = "demo"
[model]
name = "random:jamba"
[needle]
task = "passkey"
lengths = [300, 400]
depths = [0, 50, 100]
max_new_tokens = 6
batch_size = 2
[mmlu]
limit = 2
shots = 1
"""  # a small needle + MMLU preset on a tiny random Jamba
