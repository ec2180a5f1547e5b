"""A Plan: what is switched off, kept or sparsified. Plain data that round-trips through TOML."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lab.errors import LabError
from lab.models.anatomy import BLOCK_KINDS, Anatomy

MODES = ("zero", "mean")
PHASES = ("prefill", "generation", "both")
METRICS = ("entropy", "l2")
SCORE_DTYPES = ("fp32", "model")
EXPERT_MODES = ("zero", "reroute")  # zero: its output dropped, routing kept; reroute: top-k picks others
NEEDLE_MODES = ("keep", "omit", "only", "balanced", "null")
PREFILL_MODES = NEEDLE_MODES + ("follow",)  # follow: the prefill uses the generation mode
PLAN_KEYS = {"off", "heads_off", "kv_heads_off", "keep_heads", "sparsify", "needle_attention", "experts_off",
             "expert_mode", "mode", "phase"}
NEEDLE_KEYS = {"generation", "prefill", "layers", "heads"}
SPARSIFY_KEYS = {"k", "metric", "score_dtype"}


@dataclass(frozen=True)
class BlocksOff:
    """Blocks of one kind switched off, in `layers` (None: every layer that has that kind)."""

    kind: str
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Sparsify:
    """The paper's dynamic sparsification: per token and attention layer keep the k best heads."""

    k: int
    metric: str = "entropy"  # entropy: lowest-entropy rows kept; l2: highest L2 norm kept
    score_dtype: str = "fp32"  # fp32: scores summed in fp32 (lab); model: in the model's dtype (the authors')


Head = tuple[int, int]  # (layer, query head)
Expert = tuple[int, int]  # (layer, routed expert of its MoE block)


@dataclass(frozen=True)
class NeedleAttention:
    """The paper's post-softmax manipulation of the weights on the needle's key positions, per phase:
    keep, omit (needle 0), only (the rest 0), balanced (the rest 0, the needle its mean weight), null (all 0).
    It acts on every head of `layers` and on `heads`; with neither, on every attention head."""

    generation: str = "keep"
    prefill: str = "keep"  # or "follow": the generation mode
    layers: tuple[int, ...] | None = None
    heads: tuple[Head, ...] = ()

    def mode(self, phase: str) -> str:
        """The mode in "prefill" or "generation" (follow resolved)."""
        return self.generation if phase == "generation" or self.prefill == "follow" else self.prefill

    @property
    def everywhere(self) -> bool:
        return self.layers is None and not self.heads

    def describe(self) -> str:
        if self.mode("prefill") == self.generation:
            words = f"needle: {self.generation} in generation and prefill"
        else:
            words = f"needle: {self.generation} in generation, {self.prefill} in prefill"
        scope = []
        if self.layers is not None:
            scope.append(f"layer{'s' if len(self.layers) != 1 else ''} {', '.join(map(str, self.layers))}")
        if self.heads:
            scope.append(f"{len(self.heads)} head{'s' if len(self.heads) != 1 else ''}")
        return words + (f" ({' and '.join(scope)})" if scope else "")


@dataclass(frozen=True)
class Plan:
    off: tuple[BlocksOff, ...] = ()
    heads_off: tuple[Head, ...] = ()
    keep_heads: tuple[Head, ...] | None = None  # static keep-set: every other head is off
    sparsify: Sparsify | None = None
    needle_attention: NeedleAttention | None = None  # acts in its own phases, not in `phase`
    experts_off: tuple[Expert, ...] = ()
    expert_mode: str = "zero"  # one of EXPERT_MODES; `mode` (zero or mean) is for blocks and heads
    mode: str = "zero"
    phase: str = "both"

    @property
    def is_empty(self) -> bool:
        return not (self.off or self.heads_off or self.keep_heads is not None or self.sparsify
                    or self.needle_attention or self.experts_off)

    # ---- resolution against a model -------------------------------------------------------
    def check_names(self) -> Plan:
        """Check what needs no model: mode, phase, block kinds, sparsify metric; return self or raise LabError."""
        if self.mode not in MODES:
            raise LabError(f"plan.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.phase not in PHASES:
            raise LabError(f"plan.phase: {self.phase!r} is not one of {', '.join(PHASES)}")
        if self.expert_mode not in EXPERT_MODES:
            raise LabError(f"plan.expert_mode: {self.expert_mode!r} is not one of {', '.join(EXPERT_MODES)}")
        for entry in self.off:
            if entry.kind not in BLOCK_KINDS:
                raise LabError(f"plan.off: kind {entry.kind!r} is not one of {', '.join(BLOCK_KINDS)}")
        if self.sparsify is not None and self.sparsify.metric not in METRICS:
            raise LabError(f"plan.sparsify.metric: {self.sparsify.metric!r} is not one of {', '.join(METRICS)}")
        if self.sparsify is not None and self.sparsify.score_dtype not in SCORE_DTYPES:
            raise LabError(f"plan.sparsify.score_dtype: {self.sparsify.score_dtype!r} is not one of "
                           f"{', '.join(SCORE_DTYPES)}")
        needle = self.needle_attention
        if needle is not None:
            for phase, modes in (("generation", NEEDLE_MODES), ("prefill", PREFILL_MODES)):
                if getattr(needle, phase) not in modes:
                    raise LabError(f"plan.needle_attention.{phase}: {getattr(needle, phase)!r} is not one of "
                                   f"{', '.join(modes)}")
        return self

    def validate(self, anatomy: Anatomy) -> Plan:
        """Check every layer, head and kind against the model; return self or raise LabError."""
        self.check_names()
        for entry in self.off:
            if entry.layers is None and not anatomy.blocks(entry.kind):
                raise LabError(f"plan.off: {anatomy.architecture} has no {entry.kind} blocks")
            for layer in entry.layers or ():
                if not 0 <= layer < anatomy.num_layers:
                    raise LabError(f"plan.off: layer {layer} is out of range (0..{anatomy.num_layers - 1})")
                if anatomy.layers[layer].block(entry.kind) is None:
                    raise LabError(f"plan.off: layer {layer} has no {entry.kind} block")
        for key, op in (("sparsify", self.sparsify), ("needle_attention", self.needle_attention)):
            if op is not None and not anatomy.attention_layers:
                raise LabError(f"plan.{key}: {anatomy.architecture} has no attention layers")
        needle = self.needle_attention or NeedleAttention()
        for layer in needle.layers or ():
            _attention(anatomy, layer, "needle_attention.layers")
        for key, heads in (("heads_off", self.heads_off), ("keep_heads", self.keep_heads or ()),
                           ("needle_attention.heads", needle.heads)):
            for layer, head in heads:
                block = _attention(anatomy, layer, key)
                if not 0 <= head < block.heads:
                    raise LabError(f"plan.{key}: head {head} is out of range for layer {layer} (0..{block.heads - 1})")
        if self.sparsify is not None:
            most = max((b.heads for _, b in anatomy.blocks("attention")), default=0)
            if not 0 <= self.sparsify.k <= most:
                raise LabError(f"plan.sparsify.k: {self.sparsify.k} is out of range (0..{most})")
        self._validate_experts(anatomy)
        return self

    def _validate_experts(self, anatomy: Anatomy) -> None:
        off: dict[int, set[int]] = {}
        for layer, expert in self.experts_off:
            block = _moe_block(anatomy, layer)
            if not 0 <= expert < block.experts:
                raise LabError(f"plan.experts_off: expert {expert} is out of range for layer {layer} "
                               f"(0..{block.experts - 1})")
            off.setdefault(layer, set()).add(expert)
        if self.expert_mode != "reroute":
            return
        for layer, experts in sorted(off.items()):
            block = _moe_block(anatomy, layer)
            if block.router is None:
                raise LabError(f"plan.expert_mode: layer {layer}'s MoE block has no router lab can mask; use zero")
            if block.experts - len(experts) < block.top_k:
                raise LabError(f"plan.experts_off: rerouting leaves {block.experts - len(experts)} of {block.experts} "
                               f"experts in layer {layer}, fewer than its top-k {block.top_k}")

    def blocks_off(self, anatomy: Anatomy) -> list[tuple[int, str]]:
        """(layer, kind) of every block this plan switches off."""
        result = []
        for entry in self.off:
            for layer, _ in anatomy.blocks(entry.kind):
                if entry.layers is None or layer in entry.layers:
                    result.append((layer, entry.kind))
        return sorted(set(result))

    def heads_removed(self, anatomy: Anatomy) -> dict[int, set[int]]:
        """Statically removed query heads per attention layer (heads_off plus complement of keep_heads)."""
        removed: dict[int, set[int]] = {}
        for layer, head in self.heads_off:
            removed.setdefault(layer, set()).add(head)
        if self.keep_heads is not None:
            keep = set(self.keep_heads)
            for layer, block in anatomy.blocks("attention"):
                gone = {h for h in range(block.heads) if (layer, h) not in keep}
                if gone:
                    removed.setdefault(layer, set()).update(gone)
        return removed

    def describe(self, anatomy: Anatomy) -> str:
        """The plan in words, e.g. 'attention off in 8/8 layers, generation only'."""
        parts = []
        for kind in BLOCK_KINDS:
            total = len(anatomy.blocks(kind))
            n = sum(1 for _, k in self.blocks_off(anatomy) if k == kind)
            if n:
                parts.append(f"{kind} off in {n}/{total} layers")
        removed = self.heads_removed(anatomy)
        if removed:
            n = sum(len(v) for v in removed.values())
            parts.append(f"{n}/{anatomy.total_heads} heads off")
        if self.experts_off:
            total = sum(b.experts for _, b in anatomy.blocks("moe"))
            parts.append(f"{len(self.experts_off)}/{total} experts off "
                         f"({'rerouted' if self.expert_mode == 'reroute' else 'zero'})")
        if self.sparsify:
            sizes = {block.heads for _, block in anatomy.blocks("attention")}
            of = f" of {sizes.pop()}" if len(sizes) == 1 else ""
            parts.append(f"sparsify: k={self.sparsify.k}{of} heads by {self.sparsify.metric}"
                         + (" (scores in the model's dtype)" if self.sparsify.score_dtype == "model" else ""))
        needle = [self.needle_attention.describe()] if self.needle_attention else []
        if not parts:
            return needle[0] if needle else "base model (nothing switched off)"
        if self.mode == "mean":
            parts.append("mean-ablated")
        phase = {"both": "", "prefill": "prefill only", "generation": "generation only"}[self.phase]
        return "; ".join([", ".join(parts + ([phase] if phase else []))] + needle)

    # ---- TOML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data: dict = {"mode": self.mode, "phase": self.phase}
        if self.off:
            data["off"] = [{"kind": e.kind, **({"layers": list(e.layers)} if e.layers is not None else {})}
                           for e in self.off]
        if self.heads_off:
            data["heads_off"] = [list(h) for h in self.heads_off]
        if self.keep_heads is not None:
            data["keep_heads"] = [list(h) for h in self.keep_heads]
        if self.sparsify:
            data["sparsify"] = {"k": self.sparsify.k, "metric": self.sparsify.metric}
            if self.sparsify.score_dtype != "fp32":  # written only when asked for: older plans keep their form
                data["sparsify"]["score_dtype"] = self.sparsify.score_dtype
        if self.experts_off or self.expert_mode != "zero":  # written only when used: older plans keep their form
            data["experts_off"] = [list(e) for e in self.experts_off]
            data["expert_mode"] = self.expert_mode
        needle = self.needle_attention
        if needle:
            data["needle_attention"] = {"generation": needle.generation, "prefill": needle.prefill,
                                        **({"layers": list(needle.layers)} if needle.layers is not None else {}),
                                        **({"heads": [list(h) for h in needle.heads]} if needle.heads else {})}
        return data

    @classmethod
    def from_dict(cls, data: dict, anatomy: Anatomy | None = None) -> Plan:
        """Parse the [plan] table strictly; with an anatomy also expand KV groups and check ranges."""
        unknown = set(data) - PLAN_KEYS
        if unknown:
            raise LabError(f"plan: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(PLAN_KEYS))})")
        off = []
        for i, entry in enumerate(_list(data, "off")):
            if not isinstance(entry, dict) or "kind" not in entry or set(entry) - {"kind", "layers"}:
                raise LabError(f"plan.off[{i}]: expected {{kind = \"attention\", layers = [..]}} (layers optional)")
            layers = entry.get("layers")
            off.append(BlocksOff(_str(entry, "kind", None, "plan.off"),
                                 None if layers is None else tuple(_ints(layers, "plan.off"))))
        heads = [_head(h, "heads_off") for h in _list(data, "heads_off")]
        for layer, group in (_head(h, "kv_heads_off") for h in _list(data, "kv_heads_off")):
            if anatomy is not None:  # without a model only the format can be checked
                heads.extend(kv_group_heads(anatomy, layer, group))
        keep = data.get("keep_heads")
        if keep is not None:
            keep = tuple(_head(h, "keep_heads") for h in _list(data, "keep_heads"))
        sparsify = data.get("sparsify")
        if sparsify is not None:
            unknown = set(sparsify) - SPARSIFY_KEYS if isinstance(sparsify, dict) else set()
            if unknown:
                raise LabError(f"plan.sparsify: unknown key {sorted(unknown)[0]!r} "
                               f"(known: {', '.join(sorted(SPARSIFY_KEYS))})")
            if not isinstance(sparsify, dict) or "k" not in sparsify:
                raise LabError("plan.sparsify: expected {k = N, metric = \"entropy\"|\"l2\", score_dtype = "
                               "\"fp32\"|\"model\"}")
            k = sparsify["k"]
            if not isinstance(k, int) or isinstance(k, bool):
                raise LabError(f"plan.sparsify.k: expected an integer, got {k!r}")
            sparsify = Sparsify(k, _str(sparsify, "metric", "entropy", "plan.sparsify"),
                                _str(sparsify, "score_dtype", "fp32", "plan.sparsify"))
        experts = tuple(dict.fromkeys(_pair(e, "experts_off", "expert") for e in _list(data, "experts_off")))
        plan = cls(off=tuple(off), heads_off=tuple(dict.fromkeys(heads)), keep_heads=keep, sparsify=sparsify,
                   needle_attention=_needle(data.get("needle_attention")), experts_off=experts,
                   expert_mode=_str(data, "expert_mode", "zero", "plan"), mode=_str(data, "mode", "zero", "plan"),
                   phase=_str(data, "phase", "both", "plan")).check_names()
        return plan.validate(anatomy) if anatomy is not None else plan

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)


def kv_group_heads(anatomy: Anatomy, layer: int, group: int) -> list[Head]:
    """The query heads that share KV head `group` in `layer` (GQA/MQA)."""
    block = _attention(anatomy, layer, "kv_heads_off")
    if not 0 <= group < block.kv_heads:
        raise LabError(f"plan.kv_heads_off: KV head {group} is out of range for layer {layer} (0..{block.kv_heads - 1})")
    size = block.heads // block.kv_heads
    return [(layer, h) for h in range(group * size, (group + 1) * size)]


def _moe_block(anatomy: Anatomy, layer: int):
    """The MoE block of a layer, or a LabError naming the layers that have one."""
    if not 0 <= layer < anatomy.num_layers:
        raise LabError(f"plan.experts_off: layer {layer} is out of range (0..{anatomy.num_layers - 1})")
    block = anatomy.layers[layer].block("moe")
    if block is None:
        having = ", ".join(str(i) for i, _ in anatomy.blocks("moe")) or "none"
        raise LabError(f"plan.experts_off: layer {layer} has no MoE block (these do: {having})")
    return block


def _attention(anatomy: Anatomy, layer: int, key: str):
    try:
        return anatomy.attention(layer)
    except LabError as error:
        raise LabError(f"plan.{key}: {error}") from None


def _list(data: dict, key: str, table: str = "plan") -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise LabError(f"{table}.{key}: expected a list")
    return value


def _str(data: dict, key: str, default: str | None, table: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise LabError(f"{table}.{key}: expected a string, got {value!r}")
    return value


def _ints(values, key: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LabError(f"{key}: expected a list of integers")
    return values


def _needle(table) -> NeedleAttention | None:
    """The [plan.needle_attention] table, strictly."""
    if table is None:
        return None
    key = "plan.needle_attention"
    if not isinstance(table, dict):
        raise LabError(f"{key}: expected a table {{generation = \"omit\", prefill = \"keep\"}}")
    unknown = set(table) - NEEDLE_KEYS
    if unknown:
        raise LabError(f"{key}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(NEEDLE_KEYS))})")
    layers = table.get("layers")
    if layers == []:
        raise LabError(f"{key}.layers: give at least one attention layer (leave it out for every layer)")
    if table.get("heads") == []:
        raise LabError(f"{key}.heads: give at least one head (leave it out for every head)")
    heads = tuple(dict.fromkeys(_head(h, "needle_attention.heads") for h in _list(table, "heads", key)))
    return NeedleAttention(_str(table, "generation", "keep", key), _str(table, "prefill", "keep", key),
                           None if layers is None else tuple(sorted(set(_ints(layers, f"{key}.layers")))), heads)


def _head(value, key: str) -> Head:
    return _pair(value, key, "head")


def _pair(value, key: str, unit: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise LabError(f"plan.{key}: expected [layer, {unit}] pairs, got {value!r}")
    layer, index = _ints(value, f"plan.{key}")
    return (layer, index)


__all__ = ["BlocksOff", "Expert", "Head", "NeedleAttention", "Plan", "Sparsify", "kv_group_heads", "MODES",
           "PHASES", "METRICS", "EXPERT_MODES", "NEEDLE_MODES", "PREFILL_MODES"]
