"""Dr.LLM: per-layer routers that skip, execute or repeat each decoder block (arXiv 2510.12773).

How it hooks in (peft-style, in place): every decoder layer's ``forward`` is overridden on the instance
(removed again by ``detach``), and a pre-hook on the inner decoder sees each forward call first.

* A forward whose KV cache is new (or absent) is a prefill: the plan for each sequence of the batch is
  decided then (explicit plan > config plan > routers > execute everywhere) and kept for every later
  decode step on that cache. Routers decide layer by layer from the hidden states entering the layer.
* KV cache slots are handed out in execution order: the p-th block pass of a step that any row runs writes
  slot p. Plans are fixed per sequence, so a pass maps to the same slot at every step; a skipped block writes
  nothing, the second pass of a repeated block has its own slot, and slot 0 always belongs to the first
  executed pass (transformers reads the cache length from slot 0).
* Rows of a batch with different plans (sub-batches, the default): a block pass runs only on the rows that
  need it. Their hidden states, attention-mask rows, positions and rotary embeddings are gathered, the block
  runs on those k rows and the result is scattered back; the other rows keep their input. The set of rows of
  each pass is fixed for the whole request, so that pass's cache slot holds just those k rows (a dynamic
  cache layer fills itself from the first keys it is given). Rows that skip cost nothing, and a block that no
  row runs is never called. ``sub_batch_multiple`` (2 by default) pads k up to a multiple with rows that skip
  the pass (their output is dropped, their entries in that slot never read): on CPUs an odd-sized matrix
  product often costs more than the next even one; ``sub_batch_sizes`` (set by ``calibrate_sub_batches``, which
  measures a layer's cost by rows on the machine) pads to the cheapest measured size instead. Where a sub-batch
  cannot be formed (a cache with
  preallocated rows, such as a static cache, or one that already holds tokens when the request starts;
  positional layer arguments;
  ``sub_batch = False``) the block runs for the whole batch when any row needs it and the rows that skip it
  keep their input (``torch.where``), as before.
"""

from __future__ import annotations

import torch
from torch import nn

from retrofit.arch import get_adapter
from retrofit.core.hooks import RequestTracker, patch_forward
from retrofit.kernels import router_cpu
from retrofit.kernels.router_cpu import unpack_counts
from retrofit.methods import Method, register_method
from retrofit.core.plans import ACTIONS, EXECUTE, REPEAT, SKIP, validate_plan
from retrofit.methods.drllm.config import DrLLMConfig
from retrofit.methods.drllm.router import (NONFINITE, RouterBank, decision_codes, decision_tables, nonfinite_error,
                                          window_matrix, window_weights)

__all__ = ["DrLLM"]


class _StepState:
    """What one forward call of the inner decoder needs: the actions per row and the next free cache slot."""

    __slots__ = ("actions", "codes", "kernel_layers", "slot", "deciding", "mask", "pool", "capture", "cache",
                 "gathered")

    def __init__(self):
        self.actions: torch.Tensor | None = None  # [B, L] long
        self.codes: list = []  # (layer, router codes [B]) decided in this forward, not yet in actions
        self.kernel_layers: list = []  # layers whose codes the CPU kernel wrote into pool[5].codes, the same
        self.slot = 0
        self.deciding = False
        self.mask = None
        # per prefill: (averaging matrix [B, W, T], valid [B, W], window weights [B, 1, W], uniform, decision
        # tables, the CPU kernel's KernelPrefill or None)
        self.pool = None
        self.capture: list | None = None
        self.cache = None
        self.gathered: dict = {}  # this step's layer arguments gathered for a sub-batch, by rows and source


class _Request:
    """What stays fixed for one request (one KV cache): the plans and, per layer, which rows run each pass.

    ``routes[i]`` is None until layer i's actions are known, then a tuple with one entry per block pass that
    any row runs: None when every row runs it, else a :class:`_Pass`."""

    __slots__ = ("plans", "routes", "sub_batch", "sizes", "rows", "slot_rows")

    def __init__(self, plans: torch.Tensor, num_layers: int, sub_batch: bool, sizes: tuple = ()):
        self.plans = plans
        self.routes: list[tuple | None] = [None] * num_layers
        self.sub_batch = sub_batch
        self.sizes = sizes  # the sub-batch sizes to pad to (_Pass); () pads every pass to the whole batch
        self.rows: dict[tuple, _Pass] = {}
        self.slot_rows: list[_Pass | None] = []  # per cache slot: whom it holds (None: every row)

    def route(self, i: int, acts: torch.Tensor | None, counts: list[int], offset: int = 0) -> tuple:
        """Layer i's route from its actions [B] (``offset`` added: a router's codes are action + 1) and their
        counts [skip, execute, repeat]; ``acts`` is read only when the rows' actions differ (None will do when
        every row takes the same one)."""
        batch = sum(counts)
        passes = []
        for p, n in enumerate((batch - counts[SKIP], counts[REPEAT])):
            if n == 0:
                break
            if n == batch:
                passes.append(None)
                continue
            real = acts > p + offset
            key = tuple(real.nonzero().flatten().tolist())
            if key not in self.rows:
                self.rows[key] = _Pass(real, key, batch, self.sizes)
            passes.append(self.rows[key])
        self.routes[i] = tuple(passes)
        return self.routes[i]

    def guard_cache(self, pkv) -> None:
        """Make a cache whose slots hold sub-batches safe for generate()'s whole-batch cache edits: beam search's
        reorder maps each slot's rows (a new row takes the history of its source beam, which runs the same
        passes: beams of one prompt share its plan), and the batch edits of other decoding modes are refused."""
        slot_rows = self.slot_rows
        if pkv is None or not any(r is not None for r in slot_rows) or not hasattr(pkv, "layers"):
            return
        batch = self.plans.shape[0]

        def reorder_cache(beam_idx):
            for s, layer in enumerate(pkv.layers):
                ps = slot_rows[s] if s < len(slot_rows) else None
                if ps is None:
                    layer.reorder_cache(beam_idx)
                    continue
                rows = ps.rows
                local = torch.full((batch,), -1, dtype=torch.long, device=rows.device)
                local[rows] = torch.arange(rows.numel(), device=rows.device)
                src = local[beam_idx.to(rows.device)[rows]]
                # a padding row's entries are never read (its output is dropped): any history will do
                src = torch.where((src < 0) & ~ps.kept_mask, torch.zeros_like(src), src)
                if bool((src < 0).any()):
                    raise RuntimeError("Dr.LLM: beam search moved a sequence onto a row with another plan; the "
                                       "per-layer sub-batch cache cannot follow that (set handle.sub_batch = False)")
                layer.reorder_cache(src)

        def refuse(*args, **kwargs):
            raise RuntimeError("Dr.LLM: this decoding mode edits the KV cache's batch, whose layers hold per-layer "
                               "sub-batches here; set handle.sub_batch = False for it")

        pkv.reorder_cache = reorder_cache
        pkv.batch_repeat_interleave = refuse
        pkv.batch_select_indices = refuse


class _Pass:
    """One block pass that only some rows run: ``real`` [B] bool, the rows whose output is kept (``key``: their
    indices). The sub-batch is padded to the smallest of ``sizes`` (increasing) that holds them, else the whole
    batch, with rows that do not run the pass (their output is dropped and their cache entries in this slot are
    never read): on CPUs some matrix product sizes cost more than larger ones. ``rows``: the sub-batch (sorted),
    ``sel``: where the kept rows sit in it (None when all of it is kept), ``kept``: their indices; ``full``: the
    sub-batch is the whole batch (then the block runs on every row and ``keep`` [B, 1, 1] picks the kept outputs)."""

    __slots__ = ("key", "kept", "rows", "sel", "kept_mask", "full", "keep")

    def __init__(self, real: torch.Tensor, key: tuple, batch: int, sizes: tuple):
        self.key = key
        self.keep = real.view(-1, 1, 1)
        n = len(key)
        size = min(batch, next((m for m in sizes if m >= n), batch))
        self.full = size == batch
        self.kept = real.nonzero().flatten()
        if size > n:  # pad with the first rows that do not run the pass
            extra = (~real).nonzero().flatten()[: size - n]
            rows, _ = torch.sort(torch.cat([self.kept, extra]))
        else:
            rows = self.kept
        self.rows = rows
        self.kept_mask = real[rows]
        self.sel = None if size == n else self.kept_mask.nonzero().flatten()


def _sub_batch_cache(pkv) -> bool:
    """Whether a cache can hold per-layer sub-batches: none, or an empty one whose layers fill themselves from
    the first keys they get (transformers' dynamic layers); a static layer preallocates every row."""
    if pkv is None:
        return True
    layers = getattr(pkv, "layers", None)
    if layers is None:
        return False
    from transformers.cache_utils import DynamicLayer

    if not all(isinstance(x, DynamicLayer) for x in layers):
        return False
    return all(not getattr(x, "is_initialized", False) for x in layers)


# layer arguments that carry the batch in their first dimension (or 1, broadcast over it); gathered per sub-batch
_BATCH_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


def _take_rows(x, rows: torch.Tensor, batch: int):
    if torch.is_tensor(x):
        return x.index_select(0, rows) if x.dim() > 0 and x.shape[0] == batch else x
    if isinstance(x, tuple):
        return tuple(_take_rows(t, rows, batch) for t in x)
    return x


def _batch_shaped(x, batch: int) -> bool:
    if torch.is_tensor(x):
        return x.dim() > 0 and x.shape[0] == batch
    if isinstance(x, (tuple, list)):
        return any(_batch_shaped(t, batch) for t in x)
    return False


@register_method("drllm")
class DrLLM(Method):
    config_cls = DrLLMConfig
    prompt_policy = "prompt"  # the plan is decided from the prompt at prefill and kept

    def __init__(self, model, config: DrLLMConfig, adapter):
        super().__init__(model, config, adapter)
        self.layers = adapter.layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = int(model.config.hidden_size)
        self.routers: RouterBank | None = None
        self._explicit_plan: torch.Tensor | None = None
        self._step = _StepState()
        self._plans: torch.Tensor | None = None  # plans of the current request batch [B, L]
        self._request: _Request | None = None
        #: run each block pass on just the rows that need it (per-layer sub-batches with their own cache rows);
        #: False runs it for the whole batch when any row needs it (``torch.where``), the pre-sub-batch runtime
        self.sub_batch = True
        #: pad each sub-batch up to a multiple of this many rows (rows that skip the pass fill it; their output is
        #: dropped). 2 by default: on this CPU (MKL) a matrix product of an odd number of rows often costs more
        #: than the next even one; 1 runs exactly the rows that need the pass
        self.sub_batch_multiple = 2
        #: None, or the sub-batch sizes to pad to (increasing): a pass run by n rows runs on the smallest size
        #: >= n (else the whole batch); overrides sub_batch_multiple. :meth:`calibrate_sub_batches` measures them
        self.sub_batch_sizes: tuple[int, ...] | None = None
        self._pool_cache: dict = {}
        self._tables_cache: tuple | None = None
        self._tracker = RequestTracker()
        self._hooks = []
        self._patches = []
        self._slot_modules: list[list[nn.Module]] = []
        self._orig_idx: list[list[int]] = []
        self.reset_stats()

    # ---------------------------------------------------------------- lifecycle
    def _attach(self, tensors, meta):
        cfg = self.config
        if cfg.plan is not None:
            validate_plan(cfg.plan, self.num_layers, cfg.allow_repeat)
        if tensors:
            ints = [f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point()]
            if ints:
                from retrofit.artifacts import ArtifactError

                raise ArtifactError(f"router tensors must be floating point, but {', '.join(ints[:3])} are not: "
                                    "the artifact is corrupt; retrain or save it again")
            bank = RouterBank(self.num_layers, self.hidden_size, cfg.bottleneck)
            try:
                bank.load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                from retrofit.artifacts import ArtifactError

                raise ArtifactError(f"router tensors do not match this model/config: {e}") from e
            self.routers = bank.to(next(self.model.parameters()).device).eval()
        decoder = self.adapter.decoder(self.model)
        self._hooks.append(decoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(decoder.register_forward_hook(self._post_hook))
        for i, layer in enumerate(self.layers):
            mods = self.adapter.cache_slot_modules(layer)
            self._slot_modules.append(mods)
            self._orig_idx.append([m.layer_idx for m in mods])
            self._patches.append(patch_forward(layer, self._make_forward(i, layer)))

    def _detach(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in reversed(self._patches):
            p.restore()
        self._patches.clear()
        self._tracker.reset()
        for mods, idx in zip(self._slot_modules, self._orig_idx):
            for m, j in zip(mods, idx):
                m.layer_idx = j
        self._slot_modules.clear()
        self._orig_idx.clear()

    def _check_config_change(self, new: DrLLMConfig) -> None:
        if new.plan is not None:
            validate_plan(new.plan, self.num_layers, new.allow_repeat)
        if self.routers is not None and new.bottleneck != self.routers[0].fc1.out_features:
            raise ValueError(f"bottleneck is {self.routers[0].fc1.out_features}, fixed by the attached routers; "
                             "attach routers of another width instead")

    def state_tensors(self):
        return {} if self.routers is None else dict(self.routers.state_dict())

    def init_routers(self, seed: int | None = None) -> RouterBank:
        """Fresh (untrained) routers, e.g. to train them; Xavier-uniform weights, zero biases."""
        if seed is not None:
            torch.manual_seed(seed)
        bank = RouterBank(self.num_layers, self.hidden_size, self.config.bottleneck)
        self.routers = bank.to(next(self.model.parameters()).device)
        return self.routers

    # ---------------------------------------------------------------- plans
    def set_plan(self, plan):
        """Fix the plan: a list of L actions for every sequence, a list of such lists (one per batch row),
        or None to return to the config plan / routers."""
        if plan is None:
            self._explicit_plan = None
            return
        if len(plan) > 0 and not isinstance(plan[0], (str, int)):
            rows = [validate_plan(p, self.num_layers, self.config.allow_repeat) for p in plan]
        else:
            rows = [validate_plan(plan, self.num_layers, self.config.allow_repeat)]
        self._explicit_plan = torch.tensor([[ACTIONS.index(a) for a in r] for r in rows], dtype=torch.long)

    @property
    def last_plans(self) -> list[list[str]] | None:
        if self._plans is None:
            return None
        return [[ACTIONS[a] for a in row] for row in self._plans.tolist()]

    def _initial_actions(self, batch: int, device) -> tuple[torch.Tensor, bool]:
        """Actions [B, L] known before the forward, and whether routers still have to decide them."""
        plan = self._explicit_plan
        if plan is None and self.config.plan is not None:
            plan = torch.tensor([[ACTIONS.index(a) for a in self.config.plan]], dtype=torch.long)
        if plan is not None:
            if plan.shape[0] == 1:
                plan = plan.expand(batch, -1)
            elif plan.shape[0] != batch:
                raise ValueError(f"set_plan() got {plan.shape[0]} per-row plans but the batch has {batch} rows")
            return plan.to(device).clone(), False
        acts = torch.full((batch, self.num_layers), EXECUTE, dtype=torch.long, device=device)
        return acts, self.routers is not None

    # ---------------------------------------------------------------- hooks
    def _pre_hook(self, module, args, kwargs):
        st = self._step
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        batch = ref.shape[0]
        pkv = kwargs.get("past_key_values")
        prefill = self._tracker.start(pkv, force=self._plans is None or self._plans.shape[0] != batch)
        st.slot = 0
        st.codes = []
        st.kernel_layers = []
        st.cache = pkv
        st.gathered = {}
        if prefill:
            multiple = self.sub_batch_multiple  # checked before any state of the step is set
            if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
                raise ValueError(f"sub_batch_multiple must be a positive integer, got {multiple!r}")
            sizes = self.sub_batch_sizes
            if sizes is not None:
                if (not isinstance(sizes, tuple) or not sizes or list(sizes) != sorted(set(sizes))
                        or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in sizes)):
                    raise ValueError(f"sub_batch_sizes must be None or an increasing tuple of positive integers "
                                     f"(calibrate_sub_batches() sets one), got {sizes!r}")
            else:  # multiples of sub_batch_multiple
                sizes = tuple(range(multiple, batch + 1, multiple))
            acts, deciding = self._initial_actions(batch, ref.device)
            st.actions, st.deciding = acts, deciding
            st.mask = kwargs.get("attention_mask")
            if st.mask is not None and (st.mask.dim() != 2 or st.mask.shape[-1] != ref.shape[1]):
                st.mask = None  # not a plain padding mask: pool over every token
            st.pool = None
            # self._plans (last_plans) becomes these plans in the post hook, once the prefill has run: a prefill
            # that raises leaves the last finished request's plans there, not half-decided ones
            req = self._request = _Request(acts, self.num_layers, bool(self.sub_batch) and _sub_batch_cache(pkv),
                                           sizes)
            if not deciding:  # every layer's rows are known now: route them all at once
                counts = torch.nn.functional.one_hot(acts, 3).sum(0).tolist()  # [L, 3]
                for i in range(self.num_layers):
                    req.route(i, acts[:, i], counts[i])
        else:
            st.actions, st.deciding = self._plans, False
        return None

    def _post_hook(self, module, args, output):
        st = self._step
        if st.codes:  # the routers' decisions of this prefill, one write for all layers
            idx, codes = zip(*st.codes)
            st.actions[:, list(idx)] = torch.stack(codes, 1) - 1
            st.codes = []
        if st.kernel_layers:  # the same from the CPU kernel's codes [L, B]
            idx = st.kernel_layers
            st.actions[:, idx] = st.pool[5].codes[idx].t().to(st.actions.device) - 1
            st.kernel_layers = []
        if self._tracker.finish(output):  # a cache created inside the forward is adopted by the request
            self._plans = st.actions
            self._record(st.actions)
            pkv = getattr(output, "past_key_values", None)
            self._request.guard_cache(pkv if pkv is not None else st.cache)
        st.deciding = False
        st.cache = None
        st.actions = None
        st.gathered = {}
        return None

    def _record(self, actions: torch.Tensor):
        counts = torch.stack([(actions == a).sum(0) for a in (SKIP, EXECUTE, REPEAT)], dim=1).cpu()
        self._action_counts += counts
        self._sequences += actions.shape[0]

    # ---------------------------------------------------------------- the layer wrapper
    def _decide(self, i: int, hidden: torch.Tensor):
        """Layer i's router: window means of its input, then its MLP for every row at once (one fixed sequence
        of batched ops, nothing per row); the rows each pass runs are routed now, the actions are written into
        the step's actions [B, L] after the last layer (:meth:`_post_hook`)."""
        st = self._step
        if st.pool is None or st.pool[0].shape[-1] != hidden.shape[1]:
            A, valid, weights, uniform = self._pooling(st.mask, hidden)
            tables, kernel = self._tables(hidden.device)
            kp = (kernel.prefill(A, weights, hidden.shape[-1])
                  if kernel is not None and hidden.device.type == "cpu" else None)
            st.pool = (A, valid, weights, uniform, tables, kp)
        A, valid, weights, uniform, tables, kp = st.pool
        x = hidden if hidden.dtype == torch.float32 else hidden.float()
        if kp is not None and st.capture is None and x.is_cpu:
            # one C call (retrofit/kernels/router_cpu.py): codes into kp.codes[i], their counts returned
            bad, n_skip, n_exec, n_rep = unpack_counts(kp.run(i, x))
            if bad:
                raise nonfinite_error(i, (kp.codes[i] == NONFINITE).nonzero().flatten().tolist())
            st.kernel_layers.append(i)
            counts = [n_skip, n_exec, n_rep]
            mixed = max(counts) != kp.rows
            self._request.route(i, kp.codes[i] if mixed else None, counts, 1)
            return
        means = torch.bmm(A, x)
        if st.capture is not None:
            st.capture.append((means, valid))
        if not st.deciding:
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                codes = decision_codes(tables, i, means, weights, uniform)
        else:
            codes = decision_codes(tables, i, means, weights, uniform)
        cl = codes.tolist()  # the one read-back per layer: which rows run it (counted in C, not per row)
        if NONFINITE in cl:  # the router's input held NaN / inf (NaN would otherwise read as "skip")
            raise nonfinite_error(i, [r for r, c in enumerate(cl) if c == NONFINITE])
        st.codes.append((i, codes))  # written into st.actions (code - 1) once, after the last layer
        self._request.route(i, codes, [cl.count(SKIP + 1), cl.count(EXECUTE + 1), cl.count(REPEAT + 1)], 1)

    def _pooling(self, mask, hidden: torch.Tensor):
        """(averaging matrix [B, W, T], validity [B, W], window weights [B, 1, W], whether every window of every
        row holds tokens) of one prefill. Without padding they depend only on (T, W), so they are kept for the
        next prefill of that length."""
        W = self.config.num_windows
        if mask is not None:  # every window holds tokens iff every row has W real tokens or more
            A, valid = window_matrix(mask.to(hidden.device), W)
            return A, valid, window_weights(valid), int(mask.sum(1).min()) >= W
        B, T = hidden.shape[:2]
        key = (T, W, hidden.device)
        hit = self._pool_cache.get(key)
        if hit is None:
            A, valid = window_matrix(torch.ones(1, T, dtype=torch.long, device=hidden.device), W)
            hit = (A, valid, window_weights(valid), T >= W)
            if len(self._pool_cache) >= 64:
                self._pool_cache.clear()
            self._pool_cache[key] = hit
        return (*(x.expand(B, *x.shape[1:]) for x in hit[:3]), hit[3])

    def _tables(self, device):
        """(the routers' :func:`decision_tables`, their CPU kernel or None) for a prefill ((None, None) without
        routers), the budget knob folded into fc2's biases. Rebuilt only when the routers, their weights
        (training writes them in place), the knob or the kernel switch (``RETROFIT_ROUTER_KERNEL``) change."""
        if self.routers is None:
            return None, None
        cfg = self.config
        # the parameters read straight from the modules' dicts (the same objects as r.fc1.weight etc.; nn.Module's
        # __getattr__ made this loop 160 us of every prefill, more than the first layer's decision)
        params = []
        for r in self.routers.router._modules.values():
            f1, f2 = r._modules["fc1"]._parameters, r._modules["fc2"]._parameters
            params += (f1["weight"], f1["bias"], f2["weight"], f2["bias"])
        key = (id(self.routers), cfg.skip_bias, cfg.repeat_bias, cfg.allow_repeat, cfg.num_windows, device,
               tuple([(p._version, p.data_ptr()) for p in params]))
        if self._tables_cache is None or self._tables_cache[0] != key:
            tables = decision_tables(self.routers.router, self._decision_bias(device), cfg.num_windows, device)
            self._tables_cache = (key, [tables, None])
        entry = self._tables_cache[1]
        fn = router_cpu.load() if torch.device(device).type == "cpu" else None
        if fn is None:  # no kernel here, or switched off: the torch path (the kernel, if built, is kept)
            return entry[0], None
        if entry[1] is None:
            entry[1] = router_cpu.RouterKernel(fn, self.routers.router, self._decision_bias(device))
        return entry[0], entry[1]

    def _decision_bias(self, device) -> torch.Tensor:
        """The budget knob as one logit bias [skip, execute, repeat], read from the config at each prefill."""
        cfg = self.config
        bias = torch.tensor([float(cfg.skip_bias), 0.0, float(cfg.repeat_bias)], device=device)
        if not cfg.allow_repeat:
            bias[REPEAT] = float("-inf")
        return bias

    def _gather(self, key: tuple, rows: torch.Tensor, kwargs: dict, batch: int) -> dict:
        """The layer arguments of a sub-batch (mask rows, positions, rotary embeddings), made once per step for
        each set of rows and the arguments it was taken from (layers may get different masks)."""
        src = tuple(kwargs.get(n) for n in _BATCH_KWARGS)
        ck = (key, *map(id, src))
        hit = self._step.gathered.get(ck)
        if hit is not None and all(a is b for a, b in zip(hit[0], src)):
            return dict(hit[1])
        kw = dict(kwargs)
        for n in _BATCH_KWARGS:
            if n in kw:
                kw[n] = _take_rows(kw[n], rows, batch)
        self._step.gathered[ck] = (src, kw)
        return dict(kw)

    def _make_forward(self, i: int, layer: nn.Module):
        orig = layer.__dict__.get("forward") or type(layer).forward.__get__(layer)
        slot_mods = self._slot_modules[i]
        orig_idx = self._orig_idx[i]
        passthrough = self.adapter.extra.get("layer_passthrough")
        fixed = set(_BATCH_KWARGS) | {"past_key_values", passthrough}

        def forward(hidden_states, *args, **kwargs):
            st = self._step
            if st.actions is None:  # called outside the decoder's forward (e.g. by the search): plain block
                return orig(hidden_states, *args, **kwargs)
            if st.deciding or st.capture is not None:
                self._decide(i, hidden_states)
            req = self._request
            route = req.routes[i]  # known: from the plan at the start of the request, or from the router just now
            if route is None:
                raise RuntimeError(f"Dr.LLM: decoder layer {i} was reached before its actions were known (the "
                                   "decoder did not run its layers in order through their forwards)")
            batch = hidden_states.shape[0]
            # a sub-batch needs every batch-shaped argument to be one it knows how to gather
            sub = req.sub_batch and not args and not any(
                _batch_shaped(v, batch) for k, v in kwargs.items() if k not in fixed)
            out = hidden_states
            pkv = kwargs.get("past_key_values")
            try:
                for p, entry in enumerate(route):
                    slot = st.slot
                    st.slot += 1
                    if len(req.slot_rows) == slot:  # first step of the request: record who holds the slot
                        req.slot_rows.append(entry if entry is not None and sub and not entry.full else None)
                    _ensure_slot(pkv, slot)
                    for m in slot_mods:
                        m.layer_idx = slot
                    prev = kwargs.get(passthrough) if passthrough else None
                    if entry is None:  # every row runs this pass
                        new = orig(out, *args, **kwargs)
                        if isinstance(new, tuple):  # e.g. GLM-MoE-DSA returns (hidden, topk_indices)
                            new, extra = new[0], new[1]
                            if passthrough:
                                kwargs[passthrough] = extra
                        out = new
                    elif sub and not entry.full:  # only these rows, with their own cache rows in this slot
                        rows = entry.rows
                        kw = self._gather(entry.key, rows, kwargs, batch)
                        if prev is not None:
                            kw[passthrough] = prev.index_select(0, rows)
                        new = orig(out.index_select(0, rows), **kw)
                        if isinstance(new, tuple):
                            new, extra = new[0], new[1]
                            if passthrough and extra is not None:
                                if entry.sel is not None:
                                    extra = extra.index_select(0, entry.sel)
                                # rows without a value yet get -1 (a layer that reads it fails, as the row alone)
                                full = prev if prev is not None else extra.new_full((batch, *extra.shape[1:]), -1)
                                kwargs[passthrough] = full.index_copy(0, entry.kept, extra)
                        if entry.sel is not None:
                            new = new.index_select(0, entry.sel)
                        out = out.index_copy(0, entry.kept, new)
                    else:  # all rows run it; the others keep what they had
                        keep = entry.keep
                        new = orig(out, *args, **kwargs)
                        if isinstance(new, tuple):
                            new, extra = new[0], new[1]
                            if passthrough:
                                kwargs[passthrough] = extra if prev is None else torch.where(
                                    keep.view(-1, *[1] * (extra.dim() - 1)), extra, prev)
                        out = torch.where(keep, new, out)
            finally:
                for m, j in zip(slot_mods, orig_idx):
                    m.layer_idx = j
            if passthrough:  # the layer hands a value to the next one; a skipped layer passes it through
                return (out, kwargs.get(passthrough))
            return out

        return forward

    # ---------------------------------------------------------------- features for training
    @torch.no_grad()
    def collect_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         plan=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Window means of the hidden states entering every layer under ``plan`` (teacher forcing).

        Returns features [B, L, W, d] and validity [B, L, W]; routers can then be trained without running the
        model again (routers do not change the hidden states they read when the plan is given).
        """
        old = self._explicit_plan
        self.set_plan(plan if plan is not None else ["execute"] * self.num_layers)
        self._step.capture = []
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            caps = self._step.capture
        finally:
            self._step.capture = None
            self._explicit_plan = old
        feats = torch.stack([c[0] for c in caps], dim=1)
        valid = torch.stack([c[1] for c in caps], dim=1)
        return feats, valid

    # ---------------------------------------------------------------- stats
    def reset_stats(self):
        self._action_counts = torch.zeros(self.num_layers, 3, dtype=torch.long)
        self._sequences = 0

    def calibrate_sub_batches(self, batch: int, context: int = 64, calls: int = 15) -> dict:
        """Measure what a sub-batch of k rows costs on this machine and pad sub-batches to the cheapest size.

        Times one decode-step call of the middle decoder layer for k = 1..``batch`` rows (a cache of ``context``
        tokens, median of ``calls``), then keeps the sizes no larger size undercuts: a pass run by n rows is
        padded to the cheapest size >= n (rows that skip it fill the pad; their output is dropped). CPU matrix
        kernels can cost more at 13-15 rows than at 16 (BENCHMARKS.md, issue 16); padding then turns a loss into
        no change. Sets :attr:`sub_batch_sizes` and returns {"cost_by_rows": {k: seconds}, "sizes": ...}; takes
        about ``batch`` x ``calls`` layer calls."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        cost = layer_cost_by_rows(self.model, range(1, batch + 1), context=context, calls=calls)
        sizes, best = [], float("inf")
        for k in range(batch, 0, -1):  # keep k when it is cheaper than every larger size
            if cost[k] < best:
                sizes.append(k)
                best = cost[k]
        self.sub_batch_sizes = tuple(sorted(sizes))
        return {"cost_by_rows": cost, "sizes": self.sub_batch_sizes}

    def stats(self) -> dict:
        n = max(self._sequences, 1)
        c = self._action_counts
        passes = float((c[:, EXECUTE] + 2 * c[:, REPEAT]).sum()) / n if self._sequences else float(self.num_layers)
        return {
            "num_layers": self.num_layers,
            "sequences": self._sequences,
            "mean_layers_executed": passes,
            "layer_fraction": passes / self.num_layers if self.num_layers else 1.0,  # a model without layers
            "action_counts": c.tolist(),
        }


def _ensure_slot(pkv, slot: int):
    """Give a cache one more layer slot when repeats need more slots than the model has layers."""
    layers = getattr(pkv, "layers", None)
    if layers is None or slot < len(layers) or getattr(pkv, "layer_class_to_replicate", None) is not None:
        return
    from transformers.cache_utils import DynamicLayer

    try:
        extra = type(layers[0])()
    except TypeError:
        extra = DynamicLayer()
    while len(layers) <= slot:
        layers.append(type(extra)() if type(extra) is not DynamicLayer else DynamicLayer())


def layer_cost_by_rows(model, rows, context: int = 64, calls: int = 15) -> dict:
    """Median wall time (s) of one decode-step call of the middle decoder layer for each k in ``rows`` (random
    hidden states, a dynamic cache of ``context`` tokens, cropped back after each call): what a sub-batch of k
    rows costs on this machine."""
    import statistics
    import time

    from transformers import DynamicCache

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    layer = layers[len(layers) // 2]
    rotary = adapter.decoder(model).rotary_emb
    d = model.config.hidden_size
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        for k in rows:
            cache = DynamicCache(config=model.config)
            h = torch.randn(k, context, d, generator=g).to(p.device, p.dtype)
            pos = torch.arange(context, device=p.device).unsqueeze(0).expand(k, -1)
            layer(h, position_embeddings=rotary(h, pos), position_ids=pos, past_key_values=cache, use_cache=True)
            x = torch.randn(k, 1, d, generator=g).to(p.device, p.dtype)
            pos1 = torch.full((k, 1), context, device=p.device)
            pe1 = rotary(x, pos1)
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                layer(x, position_embeddings=pe1, position_ids=pos1, past_key_values=cache, use_cache=True)
                ts.append(time.perf_counter() - t)
                cache.layers[layer.self_attn.layer_idx].crop(-1)  # back to the context for the next call
            out[k] = statistics.median(ts)
    return out
