"""Anatomy: the layers, blocks and heads of a hybrid model, computed once from its config.

Layer kinds come from ``config.layer_types`` (transformers 5.x); a small adapter per architecture
says where each kind of block lives inside a decoder layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

ATTENTION_TYPES = {"full_attention", "sliding_attention", "hybrid"}
SSM_TYPES = {"linear_attention", "conv", "hybrid"}


@dataclass(frozen=True)
class Adapter:
    """Where blocks live in a decoder layer (attribute paths, first existing one wins)."""

    attention: tuple[str, ...]
    ssm: tuple[str, ...]
    mlp: tuple[str, ...]
    flavour: str  # of the SSM/recurrent mixer
    layers: str = "model.layers"


ADAPTERS: dict[str, Adapter] = {
    "recurrent_gemma": Adapter(("temporal_block",), ("temporal_block",), ("mlp_block",), "rg-lru"),
    "jamba": Adapter(("self_attn",), ("mamba",), ("feed_forward",), "mamba"),
    "zamba": Adapter(("shared_transf.self_attn",), ("mamba", "mamba_decoder.mamba"),
                     ("shared_transf.feed_forward",), "mamba"),
    "zamba2": Adapter(("shared_transformer.self_attn",), ("mamba", "mamba_decoder.mamba"),
                      ("shared_transformer.feed_forward",), "mamba2"),
    "bamba": Adapter(("self_attn",), ("mamba",), ("feed_forward",), "mamba2"),
    "falcon_h1": Adapter(("self_attn",), ("mamba",), ("feed_forward",), "mamba2"),
    "granitemoehybrid": Adapter(("self_attn",), ("mamba",), ("block_sparse_moe", "shared_mlp"), "mamba2"),
    "nemotron_h": Adapter(("mixer",), ("mixer",), ("mixer",), "mamba2"),
    "lfm2": Adapter(("self_attn",), ("conv",), ("feed_forward",), "short-conv"),
    "lfm2_moe": Adapter(("self_attn",), ("conv",), ("feed_forward",), "short-conv"),
    "qwen3_next": Adapter(("self_attn",), ("linear_attn",), ("mlp",), "gated-delta-net"),
    "minimax": Adapter(("self_attn",), ("self_attn",), ("mlp",), "lightning"),
    "olmo_hybrid": Adapter(("self_attn",), ("linear_attn",), ("mlp",), "gated-delta-net"),
    "kimi_linear": Adapter(("self_attn",), ("self_attn",), ("mlp",), "kimi-delta"),
    "mamba": Adapter((), ("mixer",), (), "mamba", layers="backbone.layers"),
    "mamba2": Adapter((), ("mixer",), (), "mamba2", layers="backbone.layers"),
}

SUPPORTED = tuple(sorted(ADAPTERS))
BLOCK_KINDS = ("attention", "ssm", "mlp", "moe")
# Architectures where zeroing one head renormalises the others (post-norm / scaled residual).
APPROXIMATE_HEADS = {"olmo_hybrid", "minimax"}


@dataclass(frozen=True)
class Block:
    kind: str  # attention | ssm | mlp | moe
    flavour: str  # full | sliding | mamba | mamba2 | rg-lru | ... | mlp | moe
    path: str  # module path from the model root
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None
    out_proj: str | None = None  # attention only: path of the output projection
    out_bias: bool = False  # attention only: the output projection has a bias
    experts: int = 0  # moe only: routed experts, of which the router picks top_k per token
    top_k: int = 0
    router: str | None = None  # moe only: path of the router (weight: experts x hidden)
    experts_path: str | None = None  # moe only: path of the fused experts module


@dataclass(frozen=True)
class Layer:
    index: int
    layer_type: str
    blocks: tuple[Block, ...]

    def block(self, kind: str) -> Block | None:
        return next((b for b in self.blocks if b.kind == kind), None)


@dataclass(frozen=True)
class Anatomy:
    architecture: str
    layers: tuple[Layer, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def blocks(self, kind: str | None = None) -> list[tuple[int, Block]]:
        return [(l.index, b) for l in self.layers for b in l.blocks if kind in (None, b.kind)]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, _ in self.blocks("attention")]

    @property
    def total_heads(self) -> int:
        return sum(b.heads for _, b in self.blocks("attention"))

    def attention(self, layer: int) -> Block:
        """The attention block of a layer, or a LabError naming what the layer has."""
        from lab.errors import LabError

        if not 0 <= layer < self.num_layers:
            raise LabError(f"layer {layer} is out of range (model has layers 0..{self.num_layers - 1})")
        block = self.layers[layer].block("attention")
        if block is None:
            kinds = ", ".join(b.kind for b in self.layers[layer].blocks)
            raise LabError(f"layer {layer} has no attention heads (it has: {kinds})")
        return block

    def to_json(self) -> dict:
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "layers": [
                {"index": l.index, "blocks": [_block_json(b) for b in l.blocks]} for l in self.layers
            ],
        }


def _block_json(block: Block) -> dict:
    data = asdict(block)
    keys = ("kind", "flavour", "heads", "kv_heads", "head_dim", "window", "path")
    return {k: data[k] for k in keys + (("experts", "top_k", "router", "experts_path") if block.kind == "moe" else ())}


def _find(root: nn.Module, prefix: str, candidates: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    found = []
    for rel in candidates:
        try:
            found.append((f"{prefix}.{rel}", root.get_submodule(rel)))
        except AttributeError:
            continue
    return found


def _is_moe(module: nn.Module) -> bool:
    return any(name == "experts" for name, _ in module.named_children())


def _config_int(config, keys: tuple[str, ...]) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 0


def _moe_block(config, path: str, module: nn.Module) -> Block:
    """A MoE block: its experts module and its router (transformers 5.x routers return (logits, top-k weights,
    top-k indices))."""
    experts = getattr(module.experts, "num_experts", None)
    if not isinstance(experts, int):
        experts = _config_int(config, ("num_experts", "num_local_experts", "n_routed_experts"))
    router = _router(module, experts)
    top_k = getattr(router[1], "top_k", None) if router else None
    if not isinstance(top_k, int):
        top_k = _config_int(config, ("num_experts_per_tok", "num_experts_per_token"))
    return Block(kind="moe", flavour="moe", path=path, experts=experts, top_k=top_k,
                 router=f"{path}.{router[0]}" if router else None, experts_path=f"{path}.experts")


def _router(module: nn.Module, experts: int) -> tuple[str, nn.Module] | None:
    """The child `router` or `gate` whose weight has one row per expert."""
    for name in ("router", "gate"):
        child = getattr(module, name, None)
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == experts:
            return name, child
    return None


def _attention_block(config, path: str, module: nn.Module, layer_type: str) -> Block:
    proj_name = next(n for n in ("o_proj", "out_proj") if hasattr(module, n))
    proj = getattr(module, proj_name)
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    window = None
    if layer_type == "sliding_attention":
        window = getattr(config, "sliding_window", None) or getattr(config, "attention_window_size", None)
    return Block(
        kind="attention",
        flavour="sliding" if window else "full",
        path=path,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=proj.in_features // heads,
        window=window,
        out_proj=f"{path}.{proj_name}",
        out_bias=proj.bias is not None,
    )


def build_anatomy(model: nn.Module) -> Anatomy:
    """Compute the Anatomy of a loaded model (raises LabError if it is not a supported hybrid)."""
    from lab.errors import LabError

    config = model.config
    arch = config.model_type
    if arch not in ADAPTERS:
        raise LabError(f"{arch} is not a supported hybrid architecture; supported: {', '.join(SUPPORTED)}")
    adapter = ADAPTERS[arch]
    decoder_layers = model.get_submodule(adapter.layers)
    layer_types = list(getattr(config, "layer_types", None) or [])
    layers = []
    for i, layer in enumerate(decoder_layers):
        prefix = f"{adapter.layers}.{i}"
        layer_type = layer_types[i] if i < len(layer_types) else "linear_attention"
        blocks: list[Block] = []
        if layer_type in ATTENTION_TYPES:
            for path, module in _find(layer, prefix, adapter.attention)[:1]:
                blocks.append(_attention_block(config, path, module, layer_type))
        if layer_type in SSM_TYPES:
            for path, module in _find(layer, prefix, adapter.ssm)[:1]:
                blocks.append(Block(kind="ssm", flavour=adapter.flavour, path=path))
        mlp_candidates = adapter.mlp
        if arch == "nemotron_h" and layer_type not in ("mlp", "moe"):
            mlp_candidates = ()
        for path, module in _find(layer, prefix, mlp_candidates):
            blocks.append(_moe_block(config, path, module) if _is_moe(module) else Block("mlp", "mlp", path))
        layers.append(Layer(index=i, layer_type=layer_type, blocks=tuple(blocks)))
    notes = []
    if any(b.out_bias for _, b in Anatomy(arch, tuple(layers)).blocks("attention")):
        notes.append("output projection has a bias: it survives head ablation; block ablation removes it")
    if arch in APPROXIMATE_HEADS:
        notes.append("attention output is normalised or scaled before the residual: head ablation is approximate")
    if arch in ("zamba", "zamba2"):
        notes.append("shared transformer block: its attention and MLP weights are tied across hybrid layers")
    if arch == "falcon_h1":
        notes.append("attention and SSM run in parallel in every layer: switching one off leaves the other")
    return Anatomy(architecture=arch, layers=tuple(layers), notes=tuple(notes))
