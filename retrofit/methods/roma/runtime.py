"""RoMA: router-only finetuning with routing manifold alignment (arXiv 2511.07419).

Only the MoE gates of the last ``num_layers`` MoE layers change; everything else stays frozen. The finetuned
gates are kept as *weight deltas* ``ΔW`` (one ``[num_experts, hidden]`` tensor per chosen layer) beside the
untouched base weights: attached, each chosen gate computes its logits as ``h Wᵀ + h ΔWᵀ`` (the second term is
added through the shared :class:`~retrofit.arch.gates.GateHook`, right after the gate's own ``F.linear``,
before the family's scoring and top-k). Training ``ΔW`` from zero with the base frozen is training the gate
weights (same gradients); the base model's parameters are never written, so ``detach()`` restores it exactly.

Usage::

    h = retrofit.attach(model, "roma", routers="routers/roma")   # trained deltas (fingerprint checked)
    model(ids) ...
    h.detach()

    h = retrofit.attach(model, "roma", num_layers=5)             # zero deltas: identical to the base model
    with h.capture() as cap:                                      # gate logits with gradient, per layer
        out = model(ids)
    r = h.routing_vectors(cap, rows)                              # [B, num_layers * E]

Training (task loss + λ Σ_j W_ij ‖r_i − r_j‖²) is in :mod:`retrofit.methods.roma.train`; ``retrofit roma`` is
the command. See docs/roma.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.methods import Method, register_method
from retrofit.methods.roma.config import RomaConfig

__all__ = ["Roma", "routing_probs", "manifold_term", "kernel_weights"]


# ------------------------------------------------------------------------------------------------------------
# The math (pure functions; tested by hand)
def routing_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert routing weights from gate logits [..., E], as the family scores them (float32).

    softmax families: the softmax probabilities; sigmoid families (DeepSeek-V3): the sigmoid scores divided by
    their sum, so that every layer contributes a distribution.
    """
    if scoring in ("softmax", "softmax_renorm"):
        return torch.softmax(logits.float(), dim=-1)
    if scoring == "sigmoid_grouped":
        s = logits.float().sigmoid()
        return s / s.sum(dim=-1, keepdim=True)
    raise ValueError(f"unknown gate scoring {scoring!r}")


def kernel_weights(cos: torch.Tensor, sigma: float = 0.4, mask: torch.Tensor | None = None) -> torch.Tensor:
    """W_ij = exp(−(1−cos_ij)²/2σ²), normalised to sum 1 over each row's (valid) neighbours.

    ``cos`` [B, k] cosine similarities of each sample to its neighbours; ``mask`` [B, k] marks real neighbours
    (rows without any get all-zero weights).
    """
    w = torch.exp(-((1 - cos.double()) ** 2) / (2 * sigma ** 2))
    if mask is not None:
        w = w * mask.to(w.dtype)
    tot = w.sum(-1, keepdim=True)
    return torch.where(tot > 0, w / tot.clamp_min(1e-300), torch.zeros_like(w)).to(torch.float32)


def manifold_term(r: torch.Tensor, r_nb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-sample Σ_j W_ij ‖r_i − r_j‖²: ``r`` [B, D], neighbours ``r_nb`` [B, k, D], weights ``w`` [B, k] → [B]."""
    d2 = ((r.unsqueeze(1) - r_nb.to(r.dtype)) ** 2).sum(-1)
    return (w.to(r.dtype) * d2).sum(-1)


# ------------------------------------------------------------------------------------------------------------
@register_method("roma")
class Roma(Method):
    prompt_policy = "continuation"  # finetuned gates act per token
    config_cls = RomaConfig

    # lifecycle ------------------------------------------------------------------------------------
    def _attach(self, tensors, meta):
        from retrofit.arch.gates import GateHook

        hook = GateHook.install(self.model)
        try:
            self.scoring = hook.scoring
            self.layers = self._choose_layers(sorted(hook.gates))
            self.gates = {l: hook.gates[l] for l in self.layers}
            deltas = {}
            for l, g in self.gates.items():
                E, d = g.weight.shape
                if tensors is not None:
                    key = f"delta.{l}"
                    if key not in tensors:
                        raise ValueError(f"the RoMA artifact has no gate delta for MoE layer {l} (has "
                                         f"{sorted(tensors)})")
                    t = tensors[key]
                    if tuple(t.shape) != (E, d):
                        raise ValueError(f"RoMA delta for layer {l} has shape {tuple(t.shape)}, the gate's weight "
                                         f"{(E, d)}: the artifact was made for another model")
                    t = t.to(device=g.weight.device, dtype=torch.float32)
                else:
                    t = torch.zeros(E, d, device=g.weight.device, dtype=torch.float32)
                deltas[str(l)] = nn.Parameter(t.clone(), requires_grad=False)
            if tensors is not None:
                extra = sorted(set(tensors) - {f"delta.{l}" for l in self.layers})
                if extra:
                    raise ValueError(f"the RoMA artifact holds deltas {extra} for layers this config does not "
                                     f"select ({self.layers})")
        except Exception:
            hook.release()  # Method.attach puts the model back (requires_grad flags, forwards, hooks)
            raise
        self.hook = hook
        self.deltas = nn.ParameterDict(deltas)
        self._hidden: dict[int, torch.Tensor] = {}
        self._captures: list[dict[int, list[torch.Tensor]]] = []
        self._handles = []
        for l, g in self.gates.items():
            self._handles.append(g.register_forward_pre_hook(self._make_pre_hook(l)))
            hook.set_offset(l, self._make_offset(l), owner="roma")
        self._calls = 0

    def _detach(self):
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        getattr(self, "_hidden", {}).clear()
        if getattr(self, "hook", None) is not None:
            self.hook.clear("roma")
            self.hook.release()
            self.hook = None

    def _choose_layers(self, moe_layers: list[int]) -> list[int]:
        if self.config.layers is not None:
            bad = [l for l in self.config.layers if l not in moe_layers]
            if bad:
                raise ValueError(f"RoMA layers {bad} have no MoE gate; MoE layers of this model: {moe_layers}")
            return list(self.config.layers)
        if self.config.num_layers > len(moe_layers):
            raise ValueError(f"num_layers={self.config.num_layers} but the model has only {len(moe_layers)} MoE "
                             f"layers ({moe_layers})")
        return moe_layers[-self.config.num_layers:]

    # the gate's extra term ----------------------------------------------------------------------
    def _make_pre_hook(self, layer):
        def pre(module, args, kwargs=None):
            self._hidden[layer] = args[0] if args else None
        return pre

    def _make_offset(self, layer):
        gate = self.gates[layer]

        def offset(logits: torch.Tensor) -> torch.Tensor:
            h = self._hidden.pop(layer, None)
            if h is None:
                raise RuntimeError(f"RoMA: gate of layer {layer} ran without its input being seen")
            h = h.reshape(-1, gate.weight.shape[1])
            if h.shape[0] != logits.shape[0]:
                raise RuntimeError(f"RoMA: gate of layer {layer} got {h.shape[0]} rows but {logits.shape[0]} logits")
            delta = self.deltas[str(layer)]
            out = logits + F.linear(h.to(logits.dtype), delta.to(logits.dtype))
            for cap in self._captures:
                cap.setdefault(layer, []).append(out)
            if layer == self.layers[-1]:
                self._calls += 1
            return out
        return offset

    # training helpers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self):
        """Collect the chosen gates' logits (after the delta, *with* gradient) per layer while the block runs:
        ``{layer: [tensor [N, E] per forward call]}``."""
        cap: dict[int, list[torch.Tensor]] = {}
        self._captures.append(cap)
        try:
            yield cap
        finally:
            self._captures.remove(cap)

    def routing_vectors(self, cap: dict[int, list[torch.Tensor]], rows: torch.Tensor | list[int]) -> torch.Tensor:
        """r for the given token rows of the last captured call: routing weights of every chosen layer at those
        rows, concatenated in layer order → [len(rows), num_layers * E] (float32, differentiable)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        parts = []
        for l in self.layers:
            if l not in cap or not cap[l]:
                raise RuntimeError(f"no captured logits for MoE layer {l}: run the model inside capture()")
            lg = cap[l][-1]
            parts.append(routing_probs(lg[rows.to(lg.device)], self.scoring))
        return torch.cat(parts, dim=-1)

    def trainable(self, on: bool = True) -> list[nn.Parameter]:
        """Make the gate deltas trainable (or not) and return them."""
        for p in self.deltas.values():
            p.requires_grad_(on)
        return list(self.deltas.values())

    # artifact -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{l}": self.deltas[str(l)].detach().float().cpu() for l in self.layers}

    def artifact_extra(self) -> dict:
        return {"layers": self.layers, "scoring": self.scoring,
                "delta_norms": {str(l): float(self.deltas[str(l)].detach().norm()) for l in self.layers}}

    def stats(self) -> dict:
        return {"layers": self.layers, "forward_calls": self._calls,
                "delta_norms": {l: float(self.deltas[str(l)].detach().norm()) for l in self.layers},
                "gate_weight_norms": {l: float(self.gates[l].weight.detach().float().norm()) for l in self.layers}}
