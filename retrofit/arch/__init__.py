"""Architecture adapters: where a model family keeps its decoder layers, MoE gates and DSA indexers.

One adapter per family, looked up by ``config.model_type``. Everything method code needs to know about a
model goes through :func:`get_adapter`; an unsupported model gets an error naming its class and the
supported families.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ArchAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "supported_families",
]


class UnsupportedModelError(ValueError):
    """The model's architecture has no retrofit adapter."""


@dataclass(frozen=True)
class ArchAdapter:
    """Where things are inside one family of Hugging Face causal LMs.

    ``gate_scoring`` names how the family turns gate logits into top-k weights (used by the MoE gate hook):
    ``softmax`` (renormalised per ``norm_topk_prob``), ``softmax_renorm`` (always renormalised, Mixtral),
    ``sigmoid_grouped`` (DeepSeek-V3 family: sigmoid + correction bias + group top-k + scaling), or ``None``
    for dense families.
    """

    family: str
    model_types: tuple[str, ...]
    moe_path: str | None = None  # attribute path, from a decoder layer, of the MoE block
    gate_attr: str = "gate"  # attribute of the MoE block holding the gate
    gate_scoring: str | None = None
    indexer_path: str | None = None  # attribute path, from a decoder layer, of the DSA indexer
    attention_path: str = "self_attn"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    # --- structure -------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The inner decoder (the module that owns ``embed_tokens`` and ``layers``)."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
        if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
            return model
        raise UnsupportedModelError(
            f"{type(model).__name__}: could not find the decoder layers (expected `model.model.layers`)."
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get_path(layer, self.attention_path)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        if self.moe_path is None:
            return None
        block = _get_path(layer, self.moe_path, default=None)
        if block is None or not hasattr(block, self.gate_attr):
            return None  # dense layer inside an MoE model (e.g. DeepSeek's first_k_dense_replace)
        return block

    def moe_gates(self, model: nn.Module) -> dict[int, nn.Module]:
        """Layer index -> gate module, for every decoder layer that has an MoE block."""
        gates = {}
        for i, layer in enumerate(self.layers(model)):
            block = self.moe_block(layer)
            if block is not None:
                gates[i] = getattr(block, self.gate_attr)
        return gates

    def indexers(self, model: nn.Module) -> dict[int, nn.Module]:
        """Layer index -> DSA indexer module (empty for families without one)."""
        if self.indexer_path is None:
            return {}
        out = {}
        for i, layer in enumerate(self.layers(model)):
            idx = _get_path(layer, self.indexer_path, default=None)
            if idx is not None:
                out[i] = idx
        return out

    def cache_slot_modules(self, layer: nn.Module) -> list[nn.Module]:
        """Submodules of a decoder layer that address the KV cache through an integer ``layer_idx``.

        The Dr.LLM runtime re-points these at another cache slot so that a repeated block gets its own
        slot and a skipped block writes none.
        """
        return [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    # --- running layers one at a time ------------------------------------------------------------
    def prepare(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None):
        """Embeddings plus the keyword arguments every decoder layer gets, as the model's own forward makes them.

        Returns ``(hidden_states, layer_kwargs)``. Used by the search, which runs layers one by one and
        caches hidden states after shared prefixes of decisions.
        """
        from transformers.masking_utils import create_causal_mask

        inner = self.decoder(model)
        embeds = inner.embed_tokens(input_ids)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + past_seen).unsqueeze(0)
        mask = create_causal_mask(
            config=inner.config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            **self.extra.get("mask_kwargs", {}),
        )
        pos_emb = inner.rotary_emb(embeds, position_ids=position_ids)
        kwargs = dict(attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=past_key_values is not None)
        return embeds, kwargs

    def call_layer(self, layer: nn.Module, hidden_states: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        out = layer(hidden_states, **layer_kwargs)
        return out[0] if isinstance(out, tuple) else out  # (GLM-MoE-DSA: the indexer pass-through is dropped)

    def head(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits from the last hidden states."""
        return model.lm_head(self.decoder(model).norm(hidden_states))


def _get_path(obj, path: str, default=...):
    for part in path.split("."):
        if not hasattr(obj, part):
            if default is ...:
                raise AttributeError(f"{type(obj).__name__} has no attribute {part!r} (path {path!r})")
            return default
        obj = getattr(obj, part)
    return obj


_ADAPTERS: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter) -> ArchAdapter:
    for mt in adapter.model_types:
        _ADAPTERS[mt] = adapter
    return adapter


def supported_families() -> list[str]:
    return sorted({a.family for a in _ADAPTERS.values()})


def get_adapter(model: nn.Module) -> ArchAdapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"retrofit has no adapter for {type(model).__name__} (model_type={model_type!r}). "
            f"Supported families: {', '.join(supported_families())}. "
            "Add one with retrofit.arch.register_adapter(ArchAdapter(...))."
        )
    return _ADAPTERS[model_type]


# Dense families
register_adapter(ArchAdapter("llama", ("llama",), notes="SmolLM2 is a Llama"))
register_adapter(ArchAdapter("mistral", ("mistral",)))
register_adapter(ArchAdapter("qwen2", ("qwen2",)))
register_adapter(ArchAdapter("qwen3", ("qwen3",)))
# MoE families (transformers 5.x: the MoE block is `mlp`, its gate `mlp.gate`)
register_adapter(ArchAdapter("olmoe", ("olmoe",), moe_path="mlp", gate_scoring="softmax"))
register_adapter(ArchAdapter("qwen2_moe", ("qwen2_moe",), moe_path="mlp", gate_scoring="softmax"))
register_adapter(ArchAdapter("qwen3_moe", ("qwen3_moe",), moe_path="mlp", gate_scoring="softmax"))
register_adapter(ArchAdapter("mixtral", ("mixtral",), moe_path="mlp", gate_scoring="softmax_renorm"))
register_adapter(ArchAdapter("deepseek_v3", ("deepseek_v3",), moe_path="mlp", gate_scoring="sigmoid_grouped"))
# DeepSeek Sparse Attention families: MoE gates plus an indexer at self_attn.indexer
register_adapter(ArchAdapter("deepseek_v32", ("deepseek_v32",), moe_path="mlp", gate_scoring="sigmoid_grouped",
                             indexer_path="self_attn.indexer",
                             extra={"mask_kwargs": {"allow_is_causal_skip": False}}))
# GLM-MoE-DSA layers return (hidden, topk_indices) and take the previous layer's as `prev_topk_indices`.
register_adapter(ArchAdapter("glm_moe_dsa", ("glm_moe_dsa",), moe_path="mlp", gate_scoring="sigmoid_grouped",
                             indexer_path="self_attn.indexer",
                             extra={"mask_kwargs": {"allow_is_causal_skip": False},
                                    "layer_passthrough": "prev_topk_indices"}))
