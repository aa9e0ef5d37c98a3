"""Rewiring Experts on the Fly: test-time rerouting of MoE gates (arXiv 2510.14853).

``h = retrofit.attach(model, "reroute")`` adds, per sequence, a vector ``delta_l`` in R^E to the router logits
of the selected MoE layers (through the shared :class:`~retrofit.arch.gates.GateHook`, before each family's
own scoring and top-k). The vectors are shared by all tokens of a sequence and start at zero for every new
prompt.

* **Prefill** (a forward whose KV cache is new or absent): ``steps`` optimiser steps (Adam by default, lr
  0.05) on the model's own next-token cross-entropy over the prompt, gradients into the deltas only (the base
  model is frozen; checked after every adaptation). The loss is the sum over batch rows of each row's mean
  token loss (padding masked), so rows adapt independently, exactly as if each were alone.
* **Schedules**: ``schedule="paper"`` (``attach(model, "reroute", schedule="paper")``) is the paper's: 5
  steps, each a forward of the whole model over the whole sequence so far and a backward to the lowest
  adapted layer, re-adapted every 128 generated tokens. ``schedule="fast"`` (the default) is 3 steps at
  prefill only, and the decoder layers below the lowest adapted MoE layer run once per adaptation under
  no_grad (later steps replay their output: exactly the deltas of the full forward). ``steps`` / ``interval``
  override either schedule's values. With 'fast', ``window=w`` > 0 takes the loss on the last w positions
  only; the tokens before them run once, under no_grad, into a KV cache (their keys and values are then
  constants of the optimisation): cheaper on long contexts, off by default (it lost the gain in our
  measurement, docs/moe_methods.md).
* **Layers**: an explicit ``layers`` list, all MoE layers (``num_layers=None``), or ``num_layers`` layers per
  sequence chosen by router confidence ``C_l = mean over context tokens of -log p(selected experts)``, measured
  in the first (delta = 0) forward: ``layer_order="least_confident"`` picks the largest C_l,
  ``"most_confident"`` the smallest (the paper's sign is disputed, both are here).
* **Generation**: every ``interval`` new tokens (``paper``: 128; ``fast``: never) the deltas are re-optimised
  (continuing from their current values, fresh optimiser state, same layers) on the sequence so far (its last
  ``window`` positions when ``window`` > 0). ``kv_cache="keep"`` leaves the cache as it is (entries written before
  the update keep the old routing); ``"recompute"`` rebuilds the cache of the whole prefix with the new deltas
  (one extra no-grad forward; DynamicCache only).

It works inside ``model.generate()`` (a forward pre-hook on the model detects new prompts by the identity of
the KV cache object, like Dr.LLM, and runs the adaptation under ``torch.enable_grad()``). Explicit control:
``h.adapt(ids, mask)`` adapts and installs deltas; ``with h.frozen(): ...`` runs forwards with the installed
deltas and no adaptation (e.g. to score answer choices after adapting on the question); ``h.reset()``.
See docs/moe_methods.md.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
import torch.nn.functional as F

from retrofit.core.hooks import RequestTracker, patch_forward
from retrofit.methods import Method, register_method
from retrofit.methods.reroute.config import RerouteConfig

__all__ = ["Reroute", "router_confidence", "select_layers"]

OWNER = "reroute"


# ------------------------------------------------------------------------------------------------------------
# The math (pure functions)
def router_confidence(scores: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, scoring: str) -> torch.Tensor:
    """C per sequence: mean over valid tokens (and the k selected experts) of -log p(selected expert).

    ``scores`` [B*T, E] the gate's per-expert scores (softmax probabilities; for sigmoid families the sigmoid
    scores, normalised here to sum 1), ``indices`` [B*T, k], ``valid`` [B, T] bool. Returns [B]. Large C = an
    unsure router (low probability on what it picked).
    """
    B, T = valid.shape
    p = scores.float()
    if scoring == "sigmoid_grouped":
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    nll = -p.gather(1, indices.long()).clamp_min(1e-20).log().mean(-1).view(B, T)
    v = valid.to(nll.dtype)
    return (nll * v).sum(1) / v.sum(1).clamp_min(1)


def select_layers(conf: torch.Tensor, num_layers: int | None, order: str) -> torch.Tensor:
    """Mask [B, L] of the layers to adapt from confidences ``conf`` [B, L] (None: all)."""
    B, L = conf.shape
    mask = torch.zeros(B, L)
    if num_layers is None or num_layers >= L:
        return mask + 1
    # least confident = largest C; ties go to the earlier layer (stable sort)
    keys = -conf if order == "least_confident" else conf
    idx = torch.sort(keys, dim=1, stable=True).indices[:, :num_layers]
    mask.scatter_(1, idx, 1.0)
    return mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` makes them from a (left-)padding mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _per_sequence(parts: list[torch.Tensor], B: int) -> torch.Tensor:
    """One layer's recorded rows [N_i, X] of several forwards over consecutive pieces of the same B sequences,
    joined per sequence (batch-major, as one forward over the whole sequences would give them)."""
    if len(parts) == 1:
        return parts[0]
    joined = torch.cat([p.view(B, -1, p.shape[-1]) for p in parts], 1)
    return joined.view(-1, joined.shape[-1])


def _snapshot_layers() -> tuple:
    from transformers.cache_utils import DynamicIndexedLayer, DynamicLayer, DynamicSlidingWindowLayer

    return (DynamicLayer, DynamicSlidingWindowLayer, DynamicIndexedLayer)


try:  # cache layers whose update replaces its tensors (cat / slice) and never writes them in place
    _SNAPSHOT_LAYERS = _snapshot_layers()
except ImportError:  # pragma: no cover - another transformers: no prefix split
    _SNAPSHOT_LAYERS = ()


class _Replay:
    """State of the decoder-layer wrappers during one fast adaptation."""

    def __init__(self):
        self.no_grad_below = 0  # layers below this one run under no_grad
        self.record = False  # keep the (detached) output of the layers in record_layers (None: all)
        self.record_layers: set[int] | None = None
        self.outputs: dict[int, object] = {}
        self.start: int | None = None  # layers below this one return the recorded output instead of running
        self.saved = None  # the output of layer start - 1, as that layer returned it
        self.arity: dict[int, int] = {}  # layers that return tuples (GLM-MoE-DSA: hidden, topk indices)


def _detached(out):
    if torch.is_tensor(out):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


def _replaying_forward(i: int, layer, st: _Replay):
    orig = layer.__dict__.get("forward") or type(layer).forward.__get__(layer)

    def forward(*args, **kwargs):
        if st.start is not None and i < st.start:
            if i == st.start - 1:
                return st.saved
            h = args[0] if args else kwargs["hidden_states"]  # ignored by the next layer, which replays too
            n = st.arity.get(i, 0)
            return (h,) + (None,) * (n - 1) if n else h
        if i < st.no_grad_below:
            with torch.no_grad():
                out = orig(*args, **kwargs)
        else:
            out = orig(*args, **kwargs)
        if st.record:
            st.arity[i] = len(out) if isinstance(out, tuple) else 0
            if st.record_layers is None or i in st.record_layers:
                st.outputs[i] = _detached(out)
        return out

    return forward


# ------------------------------------------------------------------------------------------------------------
@register_method("reroute")
class Reroute(Method):
    config_cls = RerouteConfig
    prompt_policy = "context"  # deltas adapted on the context; a continuation must not be adapted on

    def __init__(self, model, config: RerouteConfig, adapter):
        super().__init__(model, config, adapter)
        self.hook = None
        self._hooks = []
        self._busy = False
        self._fixed = 0
        self._tracker = RequestTracker()
        self.reset_stats()
        self._clear_state()

    # ---------------------------------------------------------------- lifecycle
    def _attach(self, tensors, meta):
        from retrofit.arch.gates import GateHook

        hook = GateHook.install(self.model)
        try:
            self.moe_layers = hook.layers
            if self.config.layers is not None:
                bad = [l for l in self.config.layers if l not in hook.gates]
                if bad:
                    raise ValueError(f"RerouteConfig.layers {bad} are not MoE layers of this model; "
                                     f"MoE layers: {hook.layers}")
            self.num_experts = hook.num_experts()
        except Exception:
            hook.release()
            raise
        self.hook = hook
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._post_hook))

    def _detach(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._clear_state()
        self._tracker.reset()
        if self.hook is not None:
            self.hook.clear(OWNER)
            self.hook.release()
            self.hook = None

    # ---------------------------------------------------------------- per-request state
    def _clear_state(self):
        self.delta: torch.Tensor | None = None  # [B, L_moe, E]
        self.layer_mask: torch.Tensor | None = None  # [B, L_moe]
        self.confidence: torch.Tensor | None = None  # [B, L_moe]
        self._hist: torch.Tensor | None = None  # token ids so far [B, T]
        self._hmask: torch.Tensor | None = None  # their padding mask [B, T]
        self._since = 0
        self._last_losses: list[list[float]] = []
        if self.hook is not None:
            self.hook.clear(OWNER)

    def reset(self) -> None:
        """Forget the current request (deltas, history) and remove the offsets."""
        self._clear_state()
        self._tracker.reset()

    @contextlib.contextmanager
    def frozen(self):
        """Run forwards with the installed deltas as they are: no new-prompt detection, no adaptation."""
        self._fixed += 1
        try:
            yield self
        finally:
            self._fixed -= 1

    # ---------------------------------------------------------------- the adaptation
    def _fixed_layer_mask(self, B: int) -> torch.Tensor | None:
        L = len(self.moe_layers)
        if self.config.layers is not None:
            m = torch.tensor([1.0 if l in self.config.layers else 0.0 for l in self.moe_layers])
            return m.expand(B, L).clone()
        if self.config.num_layers is None or self.config.num_layers >= L:
            return torch.ones(B, L)
        return None  # chosen by confidence

    def _install(self, live: bool = False):
        """Put the current deltas into the gate hook ([E] when there is one sequence, else [B, E])."""
        d = self.delta * self.layer_mask.to(self.delta.device).unsqueeze(-1)
        if not live:
            d = d.detach()
        for j, l in enumerate(self.moe_layers):
            if not bool(self.layer_mask[:, j].any()):
                self.hook.set_offset(l, None, owner=OWNER)
                continue
            off = d[:, j]
            self.hook.set_offset(l, off[0] if off.shape[0] == 1 else off, owner=OWNER)

    def _optimiser(self, delta: torch.Tensor):
        cfg = self.config
        if cfg.optimizer == "adam":
            return torch.optim.Adam([delta], lr=cfg.lr)
        return torch.optim.SGD([delta], lr=cfg.lr)

    def _optimise(self, ids: torch.Tensor, mask: torch.Tensor, choose: bool) -> None:
        """Adapt the deltas on the sequence so far ``ids`` [B, T] (``mask`` its padding mask); ``choose``: pick
        the layers by confidence in the first forward (a new request without fixed layers)."""
        if self.config.schedule == "paper":
            self._optimise_paper(ids, mask, choose)
        else:
            self._optimise_fast(ids, mask, choose)

    def _finish(self, delta: torch.Tensor, losses: list, steps: int, t0: float) -> None:
        leaked = [n for n, p in self.model.named_parameters() if p.grad is not None]
        if leaked:
            raise RuntimeError(f"rerouting put gradients into base parameters {leaked[:3]}...; the base must stay "
                               "frozen")
        self.delta = delta.detach()
        self._install()
        self._n_adapt += 1
        self._n_steps += steps
        self._time += time.perf_counter() - t0
        self._last_losses = torch.stack(losses, 1).tolist() if losses else []

    def _optimise_paper(self, ids: torch.Tensor, mask: torch.Tensor, choose: bool) -> None:
        """schedule='paper': every step is a forward of the whole model over the whole sequence, and a backward
        from the loss to the lowest live offset (autograd records nothing below it)."""
        cfg = self.config
        B, T = ids.shape
        device = ids.device
        t0 = time.perf_counter()
        delta = self.delta.detach().clone().requires_grad_(True)
        self.delta = delta
        opt = self._optimiser(delta)
        pos = _positions(mask)
        targets = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        n_valid = valid.sum(1).clamp_min(1)
        losses = []
        self._busy = True
        try:
            with torch.enable_grad():
                for step in range(cfg.effective_steps):
                    if choose and step == 0:
                        self.layer_mask = torch.ones(B, len(self.moe_layers))  # delta is 0: nothing changes
                    self._install(live=True)
                    rec_ctx = self.hook.recording() if (choose and step == 0) else contextlib.nullcontext()
                    with rec_ctx as rec:
                        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                    logits = out.logits[:, :-1].float()
                    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         reduction="none").view(B, T - 1)
                    row_loss = (ce * valid).sum(1) / n_valid
                    losses.append(row_loss.detach().cpu())
                    if choose and step == 0:
                        ok = mask.bool().cpu()
                        conf = torch.stack([
                            router_confidence(rec.scores[l][0], rec.indices[l][0], ok, self.hook.scoring)
                            for l in self.moe_layers], dim=1)
                        self.confidence = conf
                        self.layer_mask = select_layers(conf, cfg.num_layers, cfg.layer_order)
                        del rec
                    opt.zero_grad(set_to_none=True)
                    row_loss.sum().backward()
                    with torch.no_grad():
                        delta.grad.mul_(self.layer_mask.to(device).unsqueeze(-1))
                    opt.step()
                    del out, logits, ce
        finally:
            self._busy = False
        self._finish(delta, losses, cfg.effective_steps, t0)

    def _lowest_live(self) -> int | None:
        """The lowest decoder layer whose gate gets a live offset under the current layer mask (None: none)."""
        live = [l for j, l in enumerate(self.moe_layers) if bool(self.layer_mask[:, j].any())]
        return min(live) if live else None

    def _optimise_fast(self, ids: torch.Tensor, mask: torch.Tensor, choose: bool) -> None:
        """schedule='fast': the same objective as 'paper' when ``window`` is 0 (the same deltas up to float
        summation order), at a lower cost:

        * the decoder layers below the lowest adapted MoE layer do not depend on the deltas: they run under
          no_grad in the first step, their output is kept, and later steps start from it (the layers below are
          replaced by a replay of that output for the duration of the adaptation);
        * with ``window`` w > 0 the loss is the next-token loss of the last w positions only; the tokens before
          them run once, under no_grad, into a DynamicCache (with the deltas as they are: none at prefill), and
          every step runs the w + 1 window tokens against that cache (restored before each step). The prefix's
          keys and values are then constants of the optimisation: its dependence on the deltas is not followed.
        """
        from transformers.cache_utils import DynamicCache

        cfg = self.config
        B, T = ids.shape
        device = ids.device
        steps = cfg.effective_steps
        t0 = time.perf_counter()
        delta = self.delta.detach().clone().requires_grad_(True)
        self.delta = delta
        opt = self._optimiser(delta)
        pos = _positions(mask)
        w = cfg.window
        split = T - 1 - w if 0 < w < T - 1 else 0  # tokens [0, split) are the no-grad prefix
        targets = ids[:, split + 1:]
        valid = (mask[:, split + 1:] * mask[:, split:-1]).bool()
        n_valid = valid.sum(1).clamp_min(1)
        layers = self.adapter.layers(self.model)
        st = _Replay()
        losses = []
        self._busy = True
        patches = []
        try:
            with contextlib.ExitStack() as stack:
                rec = stack.enter_context(self.hook.recording()) if choose else None
                cache = snapshot = None
                if split:
                    self._install()  # the deltas as they are (at prefill: none, or zeros)
                    cache = DynamicCache(config=self.model.config)
                    with torch.no_grad():
                        self.model(input_ids=ids[:, :split], attention_mask=mask[:, :split],
                                   position_ids=pos[:, :split], past_key_values=cache, use_cache=True)
                    if all(type(c) in _SNAPSHOT_LAYERS for c in cache.layers):
                        snapshot = [dict(c.__dict__) for c in cache.layers]
                    else:  # a cache layer that may update in place: no prefix split (the loss stays the window's)
                        cache, split = None, 0
                win_ids, win_pos = ids[:, split:], pos[:, split:]
                if not choose:  # the layers are known: keep only the output the later steps start from
                    st.record_layers = {(self._lowest_live() or 0) - 1}
                for i, layer in enumerate(layers):
                    patches.append(patch_forward(layer, _replaying_forward(i, layer, st)))
                with torch.enable_grad():
                    for step in range(steps):
                        if choose and step == 0:
                            self.layer_mask = torch.ones(B, len(self.moe_layers))  # delta is 0: nothing changes
                        self._install(live=True)
                        st.no_grad_below = self._lowest_live() or 0
                        st.record = step == 0
                        if snapshot is not None:
                            for c, saved in zip(cache.layers, snapshot):
                                c.__dict__.update(saved)
                        out = self.model(input_ids=win_ids, attention_mask=mask, position_ids=win_pos,
                                         past_key_values=cache, use_cache=cache is not None)
                        logits = out.logits[:, :-1].float()
                        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="none").view(B, -1)
                        row_loss = (ce * valid).sum(1) / n_valid
                        losses.append(row_loss.detach().cpu())
                        if choose and step == 0:
                            ok = mask.bool().cpu()
                            conf = torch.stack([
                                router_confidence(_per_sequence(rec.scores[l], B), _per_sequence(rec.indices[l], B),
                                                  ok, self.hook.scoring)
                                for l in self.moe_layers], dim=1)
                            self.confidence = conf
                            self.layer_mask = select_layers(conf, cfg.num_layers, cfg.layer_order)
                            stack.close()  # recording off
                            rec = None
                        if step == 0:  # from now on the layers below the lowest adapted one replay step 0
                            start = self._lowest_live() or 0
                            st.saved = st.outputs.get(start - 1) if start > 0 else None
                            st.start = start if st.saved is not None else None
                            st.outputs.clear()
                            st.record = False
                        opt.zero_grad(set_to_none=True)
                        row_loss.sum().backward()
                        with torch.no_grad():
                            delta.grad.mul_(self.layer_mask.to(device).unsqueeze(-1))
                        opt.step()
                        del out, logits, ce
        finally:
            for p in reversed(patches):
                p.restore()
            self._busy = False
        self._finish(delta, losses, steps, t0)

    def _start(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """A new request: zero deltas, choose layers, adapt on the prompt."""
        self._clear_state()
        B, T = ids.shape
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device).long()
        self._hist, self._hmask = ids, mask
        self.delta = torch.zeros(B, len(self.moe_layers), self.num_experts, device=ids.device)
        fixed = self._fixed_layer_mask(B)
        self.layer_mask = fixed if fixed is not None else torch.zeros(B, len(self.moe_layers))
        self._requests += 1
        self._sequences += B
        if self.config.effective_steps == 0 or T < 2:
            return  # nothing to learn from: no offsets at all (identical to the base model)
        self._optimise(ids, mask, choose=fixed is None)
        for b in range(B):
            for j, l in enumerate(self.moe_layers):
                if self.layer_mask[b, j] > 0:
                    self._layer_counts[l] += 1

    def adapt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Start a new request on ``input_ids`` [B, T] (adapt and install its deltas); returns ``stats()``'s
        ``last`` entry. Use ``with h.frozen():`` afterwards to run forwards with these deltas."""
        self._tracker.reset()
        self._start(input_ids, attention_mask)
        return self.stats()["last"]

    # ---------------------------------------------------------------- hooks
    def _pre_hook(self, module, args, kwargs):
        if self._busy or self._fixed:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise NotImplementedError("reroute adapts on token ids: call the model with input_ids, not inputs_embeds")
        B, T = ids.shape
        pkv = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None  # not a plain padding mask
        if self._tracker.start(pkv, force=self._hist is None or self._hist.shape[0] != B):
            self._start(ids, None if mask is None else mask[:, -T:])
            return None
        m = torch.ones_like(ids) if mask is None else mask[:, -T:].to(ids.device).long()
        self._hist = torch.cat([self._hist, ids], 1)
        self._hmask = torch.cat([self._hmask, m], 1)
        self._since += T
        cfg = self.config
        if cfg.effective_interval and cfg.effective_steps and self._since >= cfg.effective_interval:
            self._since = 0
            self._optimise(self._hist, self._hmask, choose=False)
            if cfg.kv_cache == "recompute":
                self._recompute_cache(pkv, self._hist[:, :-T], self._hmask[:, :-T])
        return None

    def _post_hook(self, module, args, output):
        if self._busy or self._fixed:
            return None
        self._tracker.finish(output)  # a cache made inside this forward belongs to this request
        return None

    @torch.no_grad()
    def _recompute_cache(self, pkv, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Rewrite ``pkv`` in place as the cache of ``ids`` under the current deltas."""
        from transformers.cache_utils import DynamicCache

        t0 = time.perf_counter()
        fresh = DynamicCache(config=self.model.config)
        self._busy = True
        try:
            self.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=fresh,
                       use_cache=True)
        finally:
            self._busy = False
        old_layers, new_layers = getattr(pkv, "layers", None), getattr(fresh, "layers", None)
        if (old_layers is None or new_layers is None or len(old_layers) != len(new_layers)
                or any(type(a) is not type(b) for a, b in zip(old_layers, new_layers))):
            raise RuntimeError("kv_cache='recompute' needs a transformers DynamicCache (as generate() makes by "
                               "default); use kv_cache='keep' with other cache types")
        for a, b in zip(old_layers, new_layers):
            a.__dict__.update(b.__dict__)
        self._n_recompute += 1
        self._time += time.perf_counter() - t0

    # ---------------------------------------------------------------- stats
    def reset_stats(self):
        self._n_adapt = 0
        self._n_steps = 0
        self._n_recompute = 0
        self._time = 0.0
        self._requests = 0
        self._sequences = 0
        self._layer_counts: Counter = Counter()

    def stats(self) -> dict:
        """Totals (adaptations, optimiser steps, cache recomputations, seconds, requests, sequences, how often
        each MoE layer was chosen) and ``last``: the current request's chosen layers, delta norms per layer,
        router confidence per layer and the per-step prompt losses of the last adaptation, per batch row."""
        last = {}
        if self.delta is not None:
            d = self.delta * self.layer_mask.to(self.delta.device).unsqueeze(-1)
            last = {
                "chosen_layers": [[l for j, l in enumerate(self.moe_layers) if row[j] > 0]
                                  for row in self.layer_mask.tolist()],
                "delta_norms": [{l: float(d[b, j].norm()) for j, l in enumerate(self.moe_layers)
                                 if self.layer_mask[b, j] > 0} for b in range(d.shape[0])],
                "confidence": None if self.confidence is None else [
                    {l: float(c) for l, c in zip(self.moe_layers, row)} for row in self.confidence.tolist()],
                "step_losses": self._last_losses,
                "tokens": 0 if self._hist is None else int(self._hist.shape[1]),
            }
        return {
            "adaptations": self._n_adapt,
            "steps": self._n_steps,
            "cache_recomputations": self._n_recompute,
            "time_s": self._time,
            "requests": self._requests,
            "sequences": self._sequences,
            "layer_counts": dict(sorted(self._layer_counts.items())),
            "moe_layers": list(getattr(self, "moe_layers", [])),
            "kv_cache": self.config.kv_cache,
            "schedule": self.config.schedule,
            "window": self.config.window,
            "last": last,
        }
