"""One hook for every MoE gate: add an offset to the router logits *before* the family's own scoring and top-k.

In transformers 5.x the gate modules (``OlmoeTopKRouter``, ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``,
``MixtralTopKRouter``, ``DeepseekV3TopkRouter``, ``DeepseekV32TopkRouter``, ``GlmMoeDsaTopkRouter``) compute
logits, scores and top-k inside their own ``forward``; the MoE block only uses the returned weights and indices.
A forward hook on their output therefore changes nothing. :class:`GateHook` replaces each gate's ``forward``
(an instance attribute, so the class and other models are untouched) with a re-implementation of that
family's forward that inserts the offset right after ``router_logits = F.linear(...)``:

* ``softmax``          (OLMoE, Qwen2-MoE, Qwen3-MoE): softmax → top-k → renormalise if ``norm_topk_prob``
* ``softmax_renorm``   (Mixtral): softmax → top-k → always renormalise
* ``sigmoid_grouped``  (DeepSeek-V3 / V3.2, GLM-MoE-DSA): sigmoid → ``+ e_score_correction_bias`` (selection
  only) → group top-k → top-k → renormalise if ``norm_topk_prob`` → ``× routed_scaling_factor``

With no offset the replaced forward runs exactly the original operations (bit-identical, tested per family).

Usage::

    hook = GateHook.install(model)                 # shared per model, reference counted
    hook.set_offset(layer, torch.zeros(E))         # per layer: [E], per sequence [B, E], or a callable
    hook.set_offset(layer, lambda z: z + 1.0)      # callable: float logits [N, E] -> new logits [N, E]
    with hook.recording() as rec:                  # per layer: top-k indices / weights / full scores
        model(ids)
    rec.indices[layer]                             # list of [N, k] tensors, one per forward call
    hook.clear()                                   # drop this owner's offsets
    hook.release()                                 # last owner out restores every original forward

Several methods can share the hook: offsets are stored per ``owner`` key and applied in insertion order
(tensors are added, callables map the logits). ``N`` is the number of token rows the gate sees
(``batch × seq``, batch-major); a ``[B, E]`` offset is repeated over each sequence's ``N // B`` tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.core.hooks import patch_forward

__all__ = ["GateHook", "RoutingRecord", "gate_info", "Offset"]

Offset = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


@dataclass
class RoutingRecord:
    """What the gates chose, per layer, one entry per forward call (detached, on CPU).

    ``indices[l]``: [N, k] long, ``weights[l]``: [N, k] routing weights as the MoE block uses them,
    ``scores[l]``: [N, E] the family's per-expert scores (softmax probabilities or sigmoid scores),
    ``logits[l]``: [N, E] the logits after the offset.
    """

    indices: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    weights: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    logits: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, layer, logits, scores, weights, indices):
        for store, t in ((self.logits, logits), (self.scores, scores), (self.weights, weights),
                         (self.indices, indices)):
            store.setdefault(layer, []).append(t.detach().to("cpu"))

    def cat(self, what: str = "indices") -> dict[int, torch.Tensor]:
        """Concatenate the calls of each layer along the token axis."""
        return {l: torch.cat(v, 0) for l, v in getattr(self, what).items()}


def gate_info(gate: nn.Module) -> tuple[int, int]:
    """(number of experts, top-k) of a gate module."""
    return int(gate.num_experts), int(gate.top_k)


# ------------------------------------------------------------------------------------------------------------
# Per-family forwards. Each mirrors transformers' own forward line by line; `hook._offset(...)` is the only
# addition and returns its input unchanged (the same tensor) when no offset is set.
def _fwd_softmax(self, hidden_states):
    hook, layer = self._retrofit_gate
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_logits = hook._offset(layer, router_logits)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    hook._record(layer, router_logits, router_probs, router_top_value, router_indices)
    return router_logits, router_top_value, router_indices


def _fwd_softmax_renorm(self, hidden_states):
    hook, layer = self._retrofit_gate
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_logits = hook._offset(layer, router_logits)
    router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    hook._record(layer, router_logits, router_probs, router_top_value, router_indices)
    return router_logits, router_top_value, router_indices


def _fwd_sigmoid_grouped(self, hidden_states):
    hook, layer = self._retrofit_gate
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    router_logits = hook._offset(layer, router_logits)
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    group_scores = (
        scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(dim=-1)
    )
    group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group)
        .reshape(-1, self.num_experts)
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * self.routed_scaling_factor
    hook._record(layer, router_logits, scores, topk_weights, topk_indices)
    return router_logits, topk_weights, topk_indices


_FORWARDS = {"softmax": _fwd_softmax, "softmax_renorm": _fwd_softmax_renorm, "sigmoid_grouped": _fwd_sigmoid_grouped}
_REQUIRED = {
    "softmax": ("weight", "top_k", "num_experts", "norm_topk_prob", "hidden_dim"),
    "softmax_renorm": ("weight", "top_k", "num_experts", "hidden_dim"),
    "sigmoid_grouped": ("weight", "top_k", "num_experts", "hidden_dim", "e_score_correction_bias", "num_group",
                        "topk_group", "norm_topk_prob", "routed_scaling_factor"),
}


class GateHook:
    """The gate hook of one model (get it with :meth:`install`; one per model, shared by its users)."""

    def __init__(self, model: nn.Module):
        from retrofit.arch import get_adapter

        self.model = model
        self.adapter = get_adapter(model)
        scoring = self.adapter.gate_scoring
        if scoring is None:
            raise ValueError(f"{type(model).__name__} ({self.adapter.family}) has no MoE gates; the gate hook needs "
                             "an MoE model (e.g. OLMoE, Qwen2-MoE, Mixtral, DeepSeek-V3, or `retrofit moefy`'s).")
        self.scoring = scoring
        self.gates: dict[int, nn.Module] = self.adapter.moe_gates(model)
        if not self.gates:
            raise ValueError(f"{type(model).__name__}: no MoE gates found at layer.{self.adapter.moe_path}."
                             f"{self.adapter.gate_attr}")
        for layer, gate in self.gates.items():
            missing = [a for a in _REQUIRED[scoring] if not hasattr(gate, a)]
            if missing:
                raise ValueError(f"gate of layer {layer} ({type(gate).__name__}) lacks {missing}: its forward is not "
                                 f"the {scoring!r} router this retrofit knows; update the adapter for this version.")
        self._offsets: dict[str, dict[int, Offset]] = {}
        self._records: list[RoutingRecord] = []
        self._owners = 0
        self._patches: dict[int, object] = {}

    # --- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, model: nn.Module) -> "GateHook":
        """The model's gate hook, installing it on first use (each call must be paired with :meth:`release`)."""
        hook = getattr(model, "_retrofit_gate_hook", None)
        if hook is None:
            hook = cls(model)
            hook._wrap()
            model._retrofit_gate_hook = hook
        hook._owners += 1
        return hook

    def _wrap(self):
        fwd = _FORWARDS[self.scoring]
        for layer, gate in self.gates.items():
            gate._retrofit_gate = (self, layer)
            self._patches[layer] = patch_forward(gate, fwd, bind=True)

    def release(self) -> None:
        """Drop one user; when the last one leaves, every gate gets its original forward back."""
        if self._owners <= 0:
            return
        self._owners -= 1
        if self._owners == 0:
            for layer, gate in self.gates.items():
                patch = self._patches.pop(layer, None)
                if patch is not None:
                    patch.restore()
                gate.__dict__.pop("_retrofit_gate", None)
            self._offsets.clear()
            if getattr(self.model, "_retrofit_gate_hook", None) is self:
                del self.model._retrofit_gate_hook

    @property
    def installed(self) -> bool:
        return self._owners > 0

    # --- offsets --------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.gates)

    def num_experts(self, layer: int | None = None) -> int:
        return gate_info(self.gates[layer if layer is not None else self.layers[0]])[0]

    def top_k(self, layer: int | None = None) -> int:
        return gate_info(self.gates[layer if layer is not None else self.layers[0]])[1]

    def set_offset(self, layer: int, offset: Offset, owner: str = "default") -> None:
        """Offset for one MoE layer: ``None`` (none), a tensor ``[E]`` (all tokens), ``[B, E]`` (per sequence),
        or a callable mapping the float logits ``[N, E]`` to new logits."""
        if layer not in self.gates:
            raise KeyError(f"layer {layer} has no MoE gate; MoE layers: {self.layers}")
        if offset is not None and not callable(offset):
            if not torch.is_tensor(offset):
                raise TypeError(f"offset must be a tensor, a callable or None, not {type(offset).__name__}")
            E = self.num_experts(layer)
            if offset.dim() not in (1, 2) or offset.shape[-1] != E:
                raise ValueError(f"offset for layer {layer} must have shape [{E}] or [batch, {E}], "
                                 f"got {tuple(offset.shape)}")
        self._offsets.setdefault(owner, {})
        if offset is None:
            self._offsets[owner].pop(layer, None)
        else:
            self._offsets[owner][layer] = offset

    def clear(self, owner: str | None = "default") -> None:
        """Remove the offsets of ``owner`` (all owners when ``None``)."""
        if owner is None:
            self._offsets.clear()
        else:
            self._offsets.pop(owner, None)

    def _offset(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        for offsets in self._offsets.values():
            off = offsets.get(layer)
            if off is None:
                continue
            if callable(off) and not torch.is_tensor(off):
                logits = off(logits)
                continue
            off = off.to(device=logits.device)
            if off.dim() == 2:
                B, N = off.shape[0], logits.shape[0]
                if N % B:
                    raise ValueError(f"per-sequence offset has batch {B} but the gate got {N} token rows "
                                     "(not a multiple): set the offset for the batch being run")
                off = off.repeat_interleave(N // B, dim=0)
            logits = logits + off.to(logits.dtype)
        return logits

    # --- recording ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        """Record each gate's choices while the block runs (nested recorders each get everything)."""
        rec = RoutingRecord()
        self._records.append(rec)
        try:
            yield rec
        finally:
            self._records.remove(rec)

    def _record(self, layer, logits, scores, weights, indices):
        for rec in self._records:
            rec.add(layer, logits, scores, weights, indices)
