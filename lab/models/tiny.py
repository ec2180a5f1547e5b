"""Tiny randomly initialised configs of every supported hybrid, built in code (no download).

Used by tests, demos (`lab inspect random:jamba`) and benchmarks. Vocabulary 260 = 256 bytes plus
4 specials, matching :func:`byte_tokenizer`.
"""

from __future__ import annotations

from lab.errors import LabError

VOCAB = 260
PAD, EOS, BOS, UNK = 256, 257, 258, 259

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
               tie_word_embeddings=True)
_MAMBA2 = dict(mamba_d_state=8, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_chunk_size=16)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_DELTA = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)

TINY: dict[str, dict] = {
    "recurrent_gemma": dict(num_hidden_layers=6, lru_width=64, attention_window_size=32, num_key_value_heads=1,
                            block_types=["recurrent", "recurrent", "attention"]),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8,
                  use_mamba_kernels=False),
    "zamba": dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=2, attention_head_dim=32,
                  mamba_d_state=8, n_mamba_heads=2, mamba_dt_rank=8, use_mamba_kernels=False),
    "zamba2": dict(num_hidden_layers=6, layers_block_type=["mamba", "hybrid", "mamba", "mamba", "hybrid", "mamba"],
                   mamba_d_state=8, mamba_headdim=16, n_mamba_heads=8, num_mem_blocks=1, use_mem_rope=False,
                   use_mamba_kernels=False),
    "bamba": dict(num_hidden_layers=4, attn_layer_indices=[1, 3], **_MAMBA2),
    "falcon_h1": dict(num_hidden_layers=3, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_n_groups=1, mamba_chunk_size=16),
    "granitemoehybrid": dict(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"],
                             num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64, **_MAMBA2),
    "nemotron_h": dict(num_hidden_layers=5, hybrid_override_pattern="M-*-E", mamba_num_heads=8, mamba_head_dim=16,
                       ssm_state_size=8, n_groups=1, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1),
    "lfm2": dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "lfm2_moe": dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
                     num_dense_layers=1, **_MOE),
    "qwen3_next": dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
                       shared_expert_intermediate_size=32, **_MOE, **_DELTA),
    "minimax": dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                    num_local_experts=4, num_experts_per_tok=2, block_size=16),
    "olmo_hybrid": dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"], **_DELTA),
    "kimi_linear": dict(num_hidden_layers=4, num_key_value_heads=4,
                        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 4,
                                            "head_dim": 16, "short_conv_kernel_size": 4},
                        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        num_experts=4, num_experts_per_token=2, moe_intermediate_size=32, first_k_dense_replace=1),
    "mamba": dict(num_hidden_layers=2, state_size=8, expand=2),
    "mamba2": dict(num_hidden_layers=2, state_size=8, num_heads=8, head_dim=16, n_groups=1, chunk_size=16),
}


def tiny_config(model_type: str, **overrides):
    """A tiny config of `model_type` (see TINY), with optional overrides."""
    from transformers import AutoConfig

    if model_type not in TINY:
        raise LabError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(TINY))}")
    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY[model_type], **overrides})


def byte_tokenizer():
    """A byte-level fast tokenizer (256 bytes + <pad> <eos> <bos> <unk>) built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(_gpt2_byte_map())  # token id = byte value
    vocab.update({"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def _gpt2_byte_map() -> dict[str, int]:
    """The printable character that ByteLevel pre-tokenisation maps each byte to, and back."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}
