"""Tiny random models of the real architectures, for tests and examples (built in memory, never downloaded)."""

from __future__ import annotations

import torch

TINY_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

DENSE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
MOE_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]
DSA_FAMILIES = ["deepseek_v32", "glm_moe_dsa"]
ALL_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES + DSA_FAMILIES


def tiny_config(family: str, **overrides):
    """A tiny config of a real architecture (4 layers, hidden 64)."""
    from transformers import AutoConfig

    kw = dict(TINY_COMMON)
    if family in ("mistral", "qwen2", "qwen3"):
        kw.update(sliding_window=None, use_sliding_window=False)
    if family == "qwen3":
        kw.update(head_dim=16)
    if family in ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral"):
        kw.update(num_experts=8, num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    if family == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen3_moe":
        kw.update(decoder_sparse_step=1, mlp_only_layers=[], head_dim=16)
    if family in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa"):
        kw.update(
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
            num_key_value_heads=4, rope_interleave=True,
        )
    if family in ("deepseek_v32", "glm_moe_dsa"):
        kw.update(index_n_heads=8, index_head_dim=16, index_topk=8)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny randomly initialised causal LM of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    # Random MoE gate weights: some families initialise gates to zero, which makes routing degenerate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.abs().sum() == 0:
                p.normal_(0, 0.02)
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    return model
