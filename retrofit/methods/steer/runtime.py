"""Multilingual routing steering (arXiv 2510.04694): promote, in the middle layers, the experts that English
task inputs use more than English general text.

Fitting (no gradient; :func:`fit_steering`): for every sequence i and MoE layer l, the expert use
``a_i[e]`` = fraction of the sequence's tokens whose top-k includes expert e (recorded through
:meth:`GateHook.recording`, padding excluded). ``Delta = mean_i a_i`` on English task texts minus the same on
English general texts (FLORES); task experts = ``Delta > tau``, kept only in the middle layers (default the
middle third of the decoder, ``layer_range=(1/3, 2/3)``, or explicit ``layers``).

Inference (every token, through a callable GateHook offset on the raw router logits ``z`` of each steered
layer, before the family's scoring and top-k):

* ``mode="soft"``: ``z_e += lam * std(z)`` for task experts (``lam`` 0.5; ``std`` over that token's experts)
* ``mode="hard"``: ``z_e = max(z) + eps`` for task experts

Usage::

    fit = fit_steering(model, tok, task_texts_en, general_texts_en, tau=0.3)
    h = retrofit.attach(model, "steer", experts=fit.experts, mode="soft", lam=0.5)
    h.save("routers/steer")                                    # masks (safetensors) + config + fingerprint
    h = retrofit.attach(model, "steer", routers="routers/steer")
    h.detach()

``retrofit steer fit --task-data ... --general-data ... --out ...`` does the fit and saves the artifact.
See docs/moe_methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrofit.methods import Method, register_method
from retrofit.methods.steer.config import SteerConfig, _check_range

__all__ = ["Steer", "SteeringFit", "expert_usage", "steering_masks", "middle_layers", "fit_steering", "steer_logits",
           "load_texts"]

OWNER = "steer"


# ------------------------------------------------------------------------------------------------------------
# The math (pure functions, tested by hand)
def expert_usage(indices: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """a[i, e] = fraction of sequence i's valid tokens whose top-k includes e.

    ``indices`` [B*T, k] top-k expert indices (batch-major token rows, as the gate sees them), ``valid`` [B, T]
    (True for real tokens). Returns [B, E] float64.
    """
    B, T = valid.shape
    hit = torch.zeros(B * T, num_experts, dtype=torch.float64)
    hit.scatter_(1, indices.long(), 1.0)
    hit = hit.view(B, T, num_experts)
    v = valid.to(torch.float64).unsqueeze(-1)
    return (hit * v).sum(1) / v.sum(1).clamp_min(1)


def middle_layers(moe_layers: list[int], num_layers: int, layer_range=(1 / 3, 2 / 3)) -> list[int]:
    """The MoE layers l with lo * L <= l < hi * L (L = decoder layers)."""
    lo, hi = _check_range(layer_range)
    tol = 1e-9 * num_layers  # float error of exact fractions (2/3 * L)
    return [l for l in moe_layers if lo * num_layers - tol <= l < hi * num_layers - tol]


def steering_masks(task_usage: dict[int, torch.Tensor], general_usage: dict[int, torch.Tensor], tau: float,
                   layers: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(masks, deltas): per layer in ``layers``, Delta = mean task usage - mean general usage ([n, E] each) and
    the task-expert mask Delta > tau."""
    masks, deltas = {}, {}
    for l in layers:
        d = task_usage[l].double().mean(0) - general_usage[l].double().mean(0)
        deltas[l] = d
        masks[l] = d > tau
    return masks, deltas


def steer_logits(z: torch.Tensor, mask: torch.Tensor, mode: str, lam: float = 0.5, eps: float = 0.01) -> torch.Tensor:
    """Steered router logits for ``z`` [N, E] and a task-expert mask [E] (computed in float32, returned in z's
    dtype)."""
    if not bool(mask.any()):
        return z
    zf = z.float()
    m = mask.to(z.device)
    if mode == "soft":
        if lam == 0:
            return z
        std = zf.std(dim=-1, keepdim=True, correction=0)
        out = zf + lam * std * m.to(zf.dtype)
    elif mode == "hard":
        out = torch.where(m, zf.max(dim=-1, keepdim=True).values + eps, zf)
    else:
        raise ValueError(f"unknown steering mode {mode!r}")
    return out.to(z.dtype)


# ------------------------------------------------------------------------------------------------------------
# Fitting


@dataclass
class SteeringFit:
    """What :func:`fit_steering` found: per steered layer the task-expert list, the mask and Delta, and the
    per-layer mean usages (all MoE layers) of both sets."""

    experts: dict[int, list[int]]
    masks: dict[int, torch.Tensor]
    deltas: dict[int, torch.Tensor]
    task_usage: dict[int, torch.Tensor] = field(repr=False)
    general_usage: dict[int, torch.Tensor] = field(repr=False)
    tau: float = 0.3
    layers: list[int] = field(default_factory=list)
    layer_range: list[float] | None = None


@torch.no_grad()
def routing_usage(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 256,
                  progress: bool = False) -> dict[int, torch.Tensor]:
    """Per MoE layer, the expert use a_i [n_texts, E] of every text (right padding, pads excluded)."""
    from retrofit.arch.gates import GateHook

    hook = GateHook.install(model)
    try:
        E = hook.num_experts()
        out: dict[int, list[torch.Tensor]] = {l: [] for l in hook.layers}
        device = next(model.parameters()).device
        rng = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            rng = tqdm(rng, desc="routing usage")
        for s in rng:
            enc = _encode(tokenizer, texts[s:s + batch_size], max_length)
            with hook.recording() as rec:
                model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                      use_cache=False)
            valid = enc["attention_mask"].bool()
            for l in hook.layers:
                out[l].append(expert_usage(rec.indices[l][0], valid, E))
        return {l: torch.cat(v) for l, v in out.items()}
    finally:
        hook.release()


def _encode(tokenizer, texts, max_length):
    """Right-padded ids and mask (no special tokens added: the gate statistics are of the text itself)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] or [0] for t in texts]
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def fit_steering(model, tokenizer, task_texts_en: list[str], general_texts_en: list[str], tau: float = 0.3,
                 layers: list[int] | None = None, layer_range=(1 / 3, 2 / 3), batch_size: int = 8,
                 max_length: int = 256, progress: bool = False) -> SteeringFit:
    """Task experts per middle MoE layer: Delta = mean expert use on English task texts - mean on English
    general texts; experts with Delta > tau. ``layers`` (decoder indices of MoE layers) overrides
    ``layer_range`` (fractions of the decoder depth, default the middle third)."""
    from retrofit.arch import get_adapter
    from retrofit.arch.gates import GateHook

    if not task_texts_en or not general_texts_en:
        raise ValueError("fit_steering needs at least one task text and one general text")
    adapter = get_adapter(model)
    L = adapter.num_layers(model)
    hook = GateHook.install(model)
    try:
        moe = hook.layers
    finally:
        hook.release()
    if layers is None:
        layers = middle_layers(moe, L, layer_range)
        rng = _check_range(layer_range)
    else:
        bad = [l for l in layers if l not in moe]
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers of this model; MoE layers: {moe}")
        layers, rng = sorted(layers), None
    if not layers:
        raise ValueError(f"no MoE layer falls in layer_range {layer_range} of {L} layers (MoE layers {moe})")
    task = routing_usage(model, tokenizer, task_texts_en, batch_size, max_length, progress)
    gen = routing_usage(model, tokenizer, general_texts_en, batch_size, max_length, progress)
    masks, deltas = steering_masks(task, gen, tau, layers)
    experts = {l: torch.nonzero(m).flatten().tolist() for l, m in masks.items()}
    return SteeringFit(experts=experts, masks=masks, deltas=deltas, task_usage=task, general_usage=gen,
                       tau=float(tau), layers=layers, layer_range=rng)


def load_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts from a data file: MGSM ``.tsv`` (question column), FLORES ``.tsv`` (``text`` column), XCOPA
    ``.jsonl`` (premise + the correct choice), other ``.jsonl`` (``text`` / ``question`` / ``premise``) or a
    plain text file (one text per line)."""
    import csv
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    texts: list[str] = []
    if path.suffix == ".tsv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if rows and "text" in rows[0]:
            col = rows[0].index("text")
            texts = [r[col] for r in rows[1:] if len(r) > col]
        else:
            texts = [r[0] for r in rows if r]
    elif path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "premise" in r and "choice1" in r:
                texts.append(r["premise"] + " " + r["choice1" if int(r.get("label", 0)) == 0 else "choice2"])
            else:
                t = r.get("text") or r.get("question") or r.get("premise")
                if isinstance(t, dict):  # ARC-style {"stem": ...}
                    t = t.get("stem")
                if t:
                    texts.append(str(t))
    else:
        texts = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    texts = [t for t in texts if t.strip()]
    return texts[:limit] if limit else texts


# ------------------------------------------------------------------------------------------------------------
@register_method("steer")
class Steer(Method):
    prompt_policy = "continuation"  # fixed expert offsets act per token
    config_cls = SteerConfig

    def __init__(self, model, config: SteerConfig, adapter):
        super().__init__(model, config, adapter)
        self.hook = None
        self.masks: dict[int, torch.Tensor] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self._calls = 0
        self._tokens = 0

    # ---------------------------------------------------------------- lifecycle
    def _attach(self, tensors, meta):
        from retrofit.arch.gates import GateHook

        hook = GateHook.install(self.model)
        try:
            E = hook.num_experts()
            masks: dict[int, torch.Tensor] = {}
            if tensors:
                for k, t in tensors.items():
                    if k.startswith("mask."):
                        masks[int(k.split(".", 1)[1])] = t.bool()
                    elif k.startswith("delta."):
                        self.deltas[int(k.split(".", 1)[1])] = t
            elif self.config.experts:
                for l, es in self.config.experts.items():
                    if any(e >= E for e in es):
                        raise ValueError(f"SteerConfig.experts[{l}] names experts >= {E} (this model has {E})")
                    m = torch.zeros(E, dtype=torch.bool)
                    m[es] = True
                    masks[l] = m
            for l, m in masks.items():
                if l not in hook.gates:
                    raise ValueError(f"steering layer {l} is not an MoE layer of this model; MoE layers: {hook.layers}")
                if m.shape != (E,):
                    from retrofit.artifacts import ArtifactError

                    raise ArtifactError(f"steering mask of layer {l} has shape {tuple(m.shape)}, expected ({E},)")
        except Exception:
            hook.release()
            raise
        self.hook = hook
        self.masks = dict(sorted(masks.items()))
        # keep the config's expert lists in step with the masks (what save() writes)
        self.config.experts = {l: torch.nonzero(m).flatten().tolist() for l, m in self.masks.items()}
        self._install()

    def _install(self):
        self.hook.clear(OWNER)
        cfg = self.config
        if cfg.mode == "soft" and cfg.lam == 0:
            return  # identity: no offset at all
        for l, m in self.masks.items():
            if not bool(m.any()):
                continue
            self.hook.set_offset(l, self._make_offset(m.clone()), owner=OWNER)

    def _make_offset(self, mask):
        cfg = self.config

        def offset(z):
            self._calls += 1
            self._tokens += z.shape[0]
            return steer_logits(z, mask, cfg.mode, cfg.lam, cfg.eps)

        return offset

    def _detach(self):
        if self.hook is not None:
            self.hook.clear(OWNER)
            self.hook.release()
            self.hook = None

    def set_masks(self, masks: dict[int, torch.Tensor], deltas: dict[int, torch.Tensor] | None = None) -> None:
        """Replace the task-expert masks (e.g. from :func:`fit_steering`)."""
        E = self.hook.num_experts()
        for l, m in masks.items():
            if l not in self.hook.gates or tuple(m.shape) != (E,):
                raise ValueError(f"mask for layer {l}: need an MoE layer and shape ({E},)")
        self.masks = {l: m.bool().cpu() for l, m in sorted(masks.items())}
        self.deltas = {l: d.cpu() for l, d in (deltas or {}).items()}
        self.config.experts = {l: torch.nonzero(m).flatten().tolist() for l, m in self.masks.items()}
        self._install()

    # ---------------------------------------------------------------- artifact
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"mask.{l}": m.to(torch.uint8) for l, m in self.masks.items()}
        out.update({f"delta.{l}": d.float() for l, d in self.deltas.items()})
        return out

    def artifact_extra(self) -> dict:
        return {"layers": sorted(self.masks), "num_experts": self.hook.num_experts() if self.hook else None}

    def stats(self) -> dict:
        return {
            "mode": self.config.mode, "lam": self.config.lam, "eps": self.config.eps,
            "layers": sorted(self.masks),
            "experts": {l: torch.nonzero(m).flatten().tolist() for l, m in self.masks.items()},
            "gate_calls": self._calls, "token_rows": self._tokens,
        }


def attach_fit(model, fit: SteeringFit, mode: str = "soft", lam: float = 0.5, eps: float = 0.01):
    """Attach a :class:`SteeringFit` (masks, deltas and provenance) to ``model``."""
    import retrofit

    h = retrofit.attach(model, "steer", experts=fit.experts, mode=mode, lam=lam, eps=eps, tau=fit.tau,
                        layer_range=fit.layer_range)
    h.set_masks(fit.masks, fit.deltas)
    return h
