"""Dr.LLM plans and routers inside vLLM: vLLM's own model classes whose decoder layers follow a plan.

``RetrofitLlamaForCausalLM`` (and the Qwen2, Qwen3 and Mistral ones) is vLLM's own class; after it is built,
each decoder layer's class is swapped for a subclass whose forward consults the plan (same module, weights
and KV-cache slot); attention, cache and sampling are vLLM's. A layer returns its ``(hidden_states,
residual)`` unchanged to skip. Two modes, chosen from the serve config at load time:

* **static** (one server-wide plan, no artifacts, no per-request plans): the skipped layers are fixed
  Python booleans, so they cost nothing and the model still compiles (torch.compile traces the plan in).
* **per request** (artifacts and/or per-request plans; needs ``enforce_eager=True`` because a compiled
  graph would freeze the first step's decisions, and prefix caching off because a cached prefix computed
  under one plan must not serve another): before each forward the model reads every row's choice from
  :mod:`retrofit.serve.vllm_state`; a row's plan is decided at its prefill (routers decide layer by layer
  from the hidden states entering each layer, over the whole prompt: chunked prefill must be off) and kept
  for its decoding. A layer runs when any row of the step needs it. Then, with ``sub_batch`` (the default), it
  runs on just the tokens of the requests that execute it. With vLLM's CPU attention backend that is the whole
  layer through its own forward, while the step's attention metadata and KV-cache slots for that layer are
  swapped for ones describing only those requests (:func:`_cpu_sub_metadata`); a skipping request writes no
  cache entry there, and none is read, since its plan skips the layer for the whole request. Elsewhere (another
  backend, or a sub-batch padded to a multiple of ``sub_batch_multiple`` tokens with skipping ones, default 1)
  the attention kernel, input norm and rotary embedding run for every token, and the q/k/v and o projections and
  the MLP half on the sub-batch (the skipping tokens enter the kernel with zero queries, keys and values; their
  outputs are dropped). Either way a skipping token leaves with its stream unchanged, and the splits of a
  decoding step are kept for the next steps of the same batch. Without ``sub_batch`` the whole layer runs for
  every token and ``torch.where`` keeps the skipping rows' stream.

``repeat`` is refused with a clear error (a repeated block needs its own KV-cache slot, which vLLM's cache
spec does not give a layer here); routers are served with repeat masked (``allow_repeat: false``).
"""

from __future__ import annotations

import torch
from vllm.config import CompilationMode
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from retrofit.artifacts import ArtifactError, compare_fingerprint, fingerprint_of, fingerprinted, tensor_digest
from retrofit.core.plans import EXECUTE, SKIP, plan_codes
from retrofit.methods.drllm import NONFINITE, decision_codes, nonfinite_error, window_matrix, window_weights
from retrofit.serve.check import ServedArtifact, check_static_plan
from retrofit.serve.config import RequestChoice, ServeConfigError, find_serve_config, parse_request_args

log = init_logger("vllm.retrofit")

__all__ = ["RetrofitLlamaForCausalLM", "RetrofitQwen2ForCausalLM", "RetrofitQwen3ForCausalLM",
           "RetrofitMistralForCausalLM", "retrofit_counters"]


class _Step:
    __slots__ = ("acts", "qsl", "deciding", "rows", "pools", "layer_any", "layer_all", "tok_run", "split", "attn")

    def __init__(self, acts, qsl, deciding, rows):
        self.acts = acts  # [R, L] long
        self.qsl = qsl  # list of R + 1 token offsets
        self.deciding = deciding  # [(row, served)]
        self.rows = rows
        self.layer_any = self.layer_all = None  # per-layer "any / every row runs it" (decode-only steps)
        self.tok_run = None  # [T, L, 1] per-token run mask (decode-only steps with mixed plans)
        self.pools = {}  # row -> (averaging matrix, window weights, windows all filled, decision tables)
        self.split = {}  # run pattern of a layer (per row) -> (token indices that run it, that skip it)
        self.attn = {}  # (attention layer name, run pattern) -> that sub-batch's attention metadata and slots


class RetrofitController:
    """Plans for one vLLM model instance (shared by its decoder layers)."""

    def __init__(self, vllm_config, num_layers: int, hidden: int):
        hf = vllm_config.model_config.hf_config
        self.cfg = find_serve_config(hf)
        if self.cfg is None:
            raise ServeConfigError(
                "RetrofitLlamaForCausalLM needs a retrofit serve config: hf_overrides={'architectures': "
                "['RetrofitLlamaForCausalLM'], 'retrofit': {...}} or RETROFIT_VLLM_CONFIG (see docs/serve.md)")
        self.num_layers = num_layers
        if self.cfg.num_layers is not None and self.cfg.num_layers != num_layers:
            raise ServeConfigError(f"the retrofit serve config says num_layers={self.cfg.num_layers} but the model "
                                   f"has {num_layers} decoder layers")
        self.served = {n: ServedArtifact(n, a.path, a.overrides, num_layers, hidden)
                       for n, a in self.cfg.artifacts.items()}
        self.static_skip = [False] * num_layers
        if self.cfg.plan is not None:
            check_static_plan(self.cfg.plan, num_layers)
            self.static_skip = [a == "skip" for a in self.cfg.plan]
        self.dynamic = not self.cfg.static
        self.sub_batch = self.cfg.sub_batch
        self.sub_batch_multiple = self.cfg.sub_batch_multiple
        self.rows = _RowSubset()  # the tokens a sub-batched layer's projections run on, while it runs
        self.tokens_mlp_skipped = 0  # tokens whose MLP half a sub-batched layer did not run (for benchmarks)
        self.tokens_attention_skipped = 0  # of those, tokens whose attention did not run either
        self._attention_off: str | None = None  # why whole-layer sub-batches are off (logged once), or None
        if self.dynamic:
            mode = vllm_config.compilation_config.mode
            if mode not in (None, CompilationMode.NONE):
                raise ServeConfigError(
                    "per-request retrofit plans (artifacts or allow_request_plans) need eager mode: a compiled "
                    "graph would keep the first step's decisions for every request. Start vLLM with "
                    "enforce_eager=True (--enforce-eager), or serve one static 'plan'.")
            if vllm_config.cache_config.enable_prefix_caching:
                raise ServeConfigError(
                    "per-request retrofit plans need prefix caching off (a prefix cached under one plan would "
                    "serve a request with another): enable_prefix_caching=False (--no-enable-prefix-caching)")
            if any(s.routers is not None for s in self.served.values()) and \
                    vllm_config.scheduler_config.enable_chunked_prefill:
                raise ServeConfigError(
                    "retrofit routers decide from the whole prompt at prefill: start vLLM with "
                    "enable_chunked_prefill=False (--no-enable-chunked-prefill) and max_num_batched_tokens >= "
                    "max_model_len")
        self.step: _Step | None = None
        self._fixed_step = None  # (signature of the last step whose plans were all known, what begin() derived)
        self.layers_run = 0  # decoder-layer passes actually executed (for benchmarks)
        self._step_layers_run = 0
        self.steps = 0
        self.plans_decided = 0
        # {HF checkpoint name: retrofit.artifacts.tensor_digest} of every loaded weight, for the fingerprint
        self.fingerprint_digests: dict[str, str] = {}

    # ------------------------------------------------------------ fingerprint
    def check_fingerprints(self, hf_config, architecture: str):
        if not self.served:
            self.fingerprint_digests.clear()
            return
        try:
            actual = fingerprint_of(architecture, hf_config, self.num_layers, self.fingerprint_digests)
        except ArtifactError as e:  # never serve an artifact unchecked
            raise ArtifactError(f"retrofit: {e}, so the artifacts' base-model fingerprint cannot be checked; "
                                "serve this model without retrofit artifacts") from None
        for s in self.served.values():
            compare_fingerprint(s.meta["base_model"], actual, s.path)
        self.fingerprint_digests.clear()

    # ------------------------------------------------------------ per step
    def _choice(self, row) -> RequestChoice:
        if row.choice is None:
            row.choice = parse_request_args(row.extra_args, self.cfg, self.num_layers)
        return row.choice

    def check_static_rows(self, rows) -> None:
        """One plan serves every request: a request that still sends retrofit arguments (only possible when the
        front end could not see the config, e.g. offline with hf_overrides) is ended rather than answered under a
        plan it did not ask for."""
        for row in rows:
            if row is None or row.choice is not None or row.error is not None:
                continue
            try:
                row.choice = parse_request_args(row.extra_args, self.cfg, self.num_layers)
            except ServeConfigError as e:
                row.error = str(e)
                log.error("retrofit: request ended: %s", e)

    def begin(self):
        md = get_forward_context().attn_metadata if is_forward_context_available() else None
        if isinstance(md, list):
            md = md[0] if md else None
        if not self.dynamic:
            self.steps += 1
            self.step = None
            if md:  # a real step (profiling and warm-up runs have no attention metadata)
                from retrofit.serve.vllm_state import current_mirror

                mirror = current_mirror()
                if mirror is not None:
                    self.check_static_rows(mirror.rows)
                skipped = sum(self.static_skip)
                tokens = int(next(iter(md.values())).query_start_loc[-1])
                _METRICS.count(self.num_layers - skipped, skipped, tokens * skipped)
            return
        if not md:  # profiling / warm-up run: execute everything
            self.step = None
            return
        self.steps += 1  # real steps only (profiling and warm-up runs have no attention metadata)
        self._step_layers_run = self.layers_run
        meta = next(iter(md.values()))
        qsl = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        R = len(qsl) - 1
        from retrofit.serve.vllm_state import current_mirror

        mirror = current_mirror()
        rows = mirror.rows[:R] if mirror is not None else []
        if len(rows) < R:
            raise RuntimeError("retrofit: the per-request state (RetrofitBatchMirror logits processor) is not "
                               "loaded; it is disabled with speculative decoding, which the plugin does not support")
        acts = torch.full((R, self.num_layers), EXECUTE, dtype=torch.long)
        deciding = []
        for r, row in enumerate(rows):
            if row is None:
                continue
            if row.plan is not None:
                acts[r] = row.plan
                continue
            try:
                choice = self._choice(row)
            except ServeConfigError as e:  # only reachable when the config came through hf_overrides
                row.error = str(e)
                log.error("retrofit: request ended: %s", e)
                row.plan = acts[r].clone()
                continue
            kind = choice.kind
            name = choice.name if kind == "artifact" else (self.cfg.default if kind == "default" else None)
            if kind == "plan":
                row.plan = torch.tensor(plan_codes(choice.plan), dtype=torch.long)
            elif name is None or name == "none":
                row.plan = acts[r].clone()
            else:
                served = self.served[name]
                if served.plan is not None:
                    row.plan = served.plan
                else:
                    # A new row computes its whole sequence in this step (the prompt; after a preemption, the
                    # prompt and the output so far). Anything else means chunked prefill or prefix caching,
                    # both refused at start-up.
                    if seq_lens[r] != qsl[r + 1] - qsl[r]:
                        raise RuntimeError("retrofit routers need the whole prompt in one step; chunked prefill "
                                           "or prefix caching split it (turn both off)")
                    deciding.append((r, served))
                    continue
            acts[r] = row.plan
        st = self.step = _Step(acts, qsl, deciding, rows)
        if not deciding:  # every row's plan is known: per-layer decisions and token masks once for the step
            sig = (acts.numpy().tobytes(), tuple(qsl))  # decoding steps of one batch repeat it: reuse all of it
            if self._fixed_step is not None and self._fixed_step[0] == sig:
                st.layer_any, st.layer_all, st.tok_run, st.split = self._fixed_step[1]
                return
            run = acts != SKIP
            st.layer_any = run.any(0).tolist()
            st.layer_all = run.all(0).tolist()
            if not all(st.layer_all):
                st.tok_run = self._token_mask(st, run)  # [T, L, 1]
            self._fixed_step = (sig, (st.layer_any, st.layer_all, st.tok_run, st.split))

    def end(self):
        st = self.step
        if st is not None:
            for r, _ in st.deciding:
                st.rows[r].plan = st.acts[r].clone()
                self.plans_decided += 1
            run = self.layers_run - self._step_layers_run
            counts = torch.tensor([st.qsl[r + 1] - st.qsl[r] for r in range(len(st.qsl) - 1)])
            token_skips = int(((st.acts == SKIP).sum(1) * counts).sum()) if len(counts) else 0
            _METRICS.count(run, self.num_layers - run, token_skips)
        self.step = None

    # ------------------------------------------------------------ per layer
    def run_layer(self, i: int, forward, positions, hidden, residual, layer=None):
        st = self.step
        if st is None:
            if self.static_skip[i]:  # a plain bool: traced into the graph when vLLM compiles
                return _passthrough(hidden, residual)
            return forward(positions, hidden, residual)
        for r, served in st.deciding:
            s, e = st.qsl[r], st.qsl[r + 1]
            stream = hidden[s:e] if residual is None else hidden[s:e] + residual[s:e]
            pool = st.pools.get(r)
            if pool is None:  # the row's averaging matrix etc., the same for every layer of this prefill
                W = served.config.num_windows
                A, valid = window_matrix(torch.ones(1, e - s, dtype=torch.long), W)
                pool = st.pools[r] = (A.to(stream.device), window_weights(valid).to(stream.device), e - s >= W,
                                      served.tables(stream.device))
            means = torch.bmm(pool[0], stream.float().unsqueeze(0))
            code = int(decision_codes(pool[3], i, means, pool[1], pool[2]))  # the HF runtime's decision path
            if code == NONFINITE:  # NaN / inf in the stream: an error, never a silent "skip"
                raise nonfinite_error(i, [r])
            st.acts[r, i] = code - 1
        if st.layer_any is not None:  # decode-only step: decided in begin()
            any_run, all_run = st.layer_any[i], st.layer_all[i]
        else:
            run = st.acts[:, i] != SKIP
            any_run, all_run = bool(run.any()), bool(run.all())
        if not any_run:
            return _passthrough(hidden, residual)
        self.layers_run += 1
        if all_run:
            return forward(positions, hidden, residual)
        split = self._split(st, i, hidden.shape[0], hidden.device) if (
            self.sub_batch and layer is not None and _splittable(layer)) else None
        if split is not None:
            run_idx, skip_idx = split
            skipped = hidden.shape[0] - int(run_idx.numel())
            self.tokens_mlp_skipped += skipped
            sub = self._attention_sub_batch(st, i, layer, positions, run_idx, skip_idx, hidden.shape[0],
                                            hidden.dtype)
            if sub is not None:
                self.tokens_attention_skipped += skipped
                return _whole_sub_batch(forward, positions, hidden, residual, run_idx, *sub)
            return _sub_batch_layer(layer, positions, hidden, residual, run_idx, skip_idx, self.rows)
        new_h, new_r = forward(positions, hidden, residual)
        if st.tok_run is not None:
            tm = st.tok_run[:, i]
        else:
            tm = self._token_mask(st, (st.acts[:, i] != SKIP).unsqueeze(1), hidden.shape[0])[:, 0]
        if tm.shape[0] != hidden.shape[0]:
            tm = self._token_mask(st, st.acts[:, i:i + 1] != SKIP, hidden.shape[0])[:, 0]
        tm = tm.to(hidden.device)
        old_r = residual if residual is not None else torch.zeros_like(hidden)
        return torch.where(tm, new_h, hidden), torch.where(tm, new_r, old_r)

    def _split(self, st: "_Step", i: int, num_tokens: int, device):
        """(tokens that run layer i's sub-batch, tokens that skip layer i), or None when the sub-batch would be
        every token. The running tokens are padded with the first skipping ones up to a multiple of
        ``sub_batch_multiple`` (their outputs are computed and dropped). The same for every layer with the same
        per-row pattern, so computed once per pattern; when no row decides in the step, also looked up by layer,
        and kept for the following steps of the same batch (:meth:`begin`)."""
        fixed = (i, num_tokens) if not st.deciding else None
        if fixed is not None:
            hit = st.split.get(fixed, _MISSING)
            if hit is not _MISSING:
                return hit
        run = st.acts[:, i] != SKIP
        key = (tuple(run.tolist()), num_tokens)
        if key not in st.split:
            tm = self._token_mask(st, run.unsqueeze(1), num_tokens)[:, 0, 0]
            run_idx, skip_idx = tm.nonzero().flatten(), (~tm).nonzero().flatten()
            m = self.sub_batch_multiple
            size = -(-len(run_idx) // m) * m
            if size >= num_tokens:
                st.split[key] = None
            else:
                if size > len(run_idx):
                    run_idx = torch.sort(torch.cat([run_idx, skip_idx[: size - len(run_idx)]])).values
                st.split[key] = (run_idx.to(device), skip_idx.to(device))
        if fixed is not None:
            st.split[fixed] = st.split[key]
        return st.split[key]

    def _attention_sub_batch(self, st: "_Step", i: int, layer, positions, run_idx, skip_idx, num_tokens: int,
                             dtype: torch.dtype):
        """(forward context, layer name, the sub-batch's attention metadata, its KV-cache slots) so that the whole
        layer, attention included, runs on the tokens ``run_idx`` alone; None where that is not possible (then
        only the projections and the MLP are a sub-batch). Possible with vLLM's CPU attention backend when the
        sub-batch is exactly the running requests' tokens (no padding) and the step's metadata is the plain
        causal kind; the metadata of a run pattern is built once per step."""
        if self._attention_off is not None or run_idx.numel() + skip_idx.numel() != num_tokens:
            return None
        attn = getattr(layer.self_attn, "attn", None)
        name = getattr(attn, "layer_name", None)
        fc = get_forward_context() if is_forward_context_available() else None
        md_all = fc.attn_metadata if fc is not None else None
        slots_all = fc.slot_mapping if fc is not None else None
        if not isinstance(md_all, dict) or not isinstance(slots_all, dict) or name not in md_all \
                or name not in slots_all or positions.dim() != 1:
            return None
        key = (name, id(run_idx))  # one index tensor per run pattern and step (_split), alive in st.split
        hit = st.attn.get(key)
        if hit is None:
            try:
                hit = _cpu_sub_metadata(attn, md_all[name], slots_all[name], st.qsl, st.acts[:, i] != SKIP,
                                        run_idx, dtype)
            except (TypeError, ValueError, RuntimeError, AttributeError) as e:
                self._attention_off = str(e)
                log.warning("retrofit: attention runs for every token of a split layer (%s)", e)
                return None
            st.attn[key] = hit
        return (fc, name, *hit)

    @staticmethod
    def _token_mask(st: "_Step", run: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """Per-row decisions [R, n] -> per-token [T, n, 1] (a row's tokens are contiguous, in batch order);
        padding tokens after the last row (no row) are computed like any other."""
        counts = torch.tensor([st.qsl[r + 1] - st.qsl[r] for r in range(len(st.qsl) - 1)])
        tm = torch.repeat_interleave(run, counts, dim=0)
        total = num_tokens if num_tokens is not None else st.qsl[-1]
        if total > tm.shape[0]:
            tm = torch.cat([tm, torch.ones(total - tm.shape[0], run.shape[1], dtype=torch.bool)])
        return tm.unsqueeze(-1)


class _PrometheusCounters:
    """Prometheus counters of decoder-layer passes, created on first use in the worker. They reach the server's
    ``/metrics`` when ``PROMETHEUS_MULTIPROC_DIR`` is set for all of vLLM's processes (``retrofit serve`` sets
    it), since the worker is not the process that serves ``/metrics``."""

    def __init__(self):
        self.counters = None

    def count(self, run: int, saved: int, token_skips: int) -> None:
        if self.counters is None:
            from prometheus_client import Counter

            self.counters = (
                Counter("retrofit_layer_passes", "decoder-layer forward passes run (one per layer run in a step)"),
                Counter("retrofit_layer_passes_saved", "decoder-layer forward passes skipped: every request of the "
                        "step skips the layer"),
                Counter("retrofit_token_layers_skipped", "layers skipped by the requests' plans, summed over the "
                        "tokens computed (what the plans save before batching)"),
            )
        for c, v in zip(self.counters, (run, saved, token_skips)):
            if v:
                c.inc(v)


_METRICS = _PrometheusCounters()


def retrofit_counters(model) -> dict:
    """Counters of a served retrofit model (``LLM.apply_model(retrofit_counters)``): forward steps, decoder-layer
    passes run (a layer run for any row of a step counts once), router plans decided, and the token-layers whose
    MLP half a sub-batched layer did not run."""
    ctl = getattr(model, "retrofit", None)
    if ctl is None:
        return {}
    return {"steps": ctl.steps, "layers_run": ctl.layers_run, "plans_decided": ctl.plans_decided,
            "tokens_mlp_skipped": ctl.tokens_mlp_skipped, "tokens_attention_skipped": ctl.tokens_attention_skipped}


_MISSING = object()


def _splittable(layer) -> bool:
    """vLLM's pre-norm decoder layers (Llama, Qwen2, Qwen3, Mistral): input norm, attention, post-attention norm
    (fused with the residual add), MLP."""
    return all(hasattr(layer, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"))


class _RowSubset:
    """The tokens (an index tensor) that a sub-batched layer's q/k/v and o projections run on, set by
    :func:`_sub_batch_layer` only while that layer runs; None otherwise (the projections run as vLLM's own)."""

    __slots__ = ("idx",)

    def __init__(self):
        self.idx = None


def _has_projections(attn) -> bool:
    """vLLM attention modules of the served families: ``qkv, _ = qkv_proj(h)`` first, ``out, _ = o_proj(a)``
    last, and in between only per-token work and the attention kernel."""
    return hasattr(attn, "qkv_proj") and hasattr(attn, "o_proj")


def install_projection_sub_batches(attn, rows: _RowSubset) -> None:
    """Let a layer's q/k/v and o projections run on ``rows.idx`` only, while it is set: the q/k/v product runs on
    those tokens and the others get zeros (queries, keys and values of tokens whose request skips the layer,
    so no answer reads them); the o product runs on those tokens and returns just their rows, so the attention
    module returns the sub-batch. With ``rows.idx`` None both are vLLM's own forward."""
    if getattr(attn, "_retrofit_rows", None) is not None:
        raise RuntimeError("retrofit: this attention module's projections are already sub-batched")
    qkv_forward, o_forward = attn.qkv_proj.forward, attn.o_proj.forward

    def qkv_rows(x):
        idx = rows.idx
        if idx is None:
            return qkv_forward(x)
        out = qkv_forward(x.index_select(0, idx))
        y = out[0] if isinstance(out, tuple) else out
        full = y.new_zeros((x.shape[0], y.shape[1])).index_copy_(0, idx, y)
        return (full, *out[1:]) if isinstance(out, tuple) else full

    def o_rows(x):
        idx = rows.idx
        return o_forward(x if idx is None else x.index_select(0, idx))

    attn.qkv_proj.forward, attn.o_proj.forward = qkv_rows, o_rows
    object.__setattr__(attn, "_retrofit_rows", rows)


def _sub_batch_layer(layer, positions, hidden, residual, run_idx, skip_idx, rows: _RowSubset | None = None):
    """One decoder layer that runs only for the tokens ``run_idx``, except for the attention kernel (and the
    input norm and rotary embedding), which vLLM runs on the whole step; the tokens ``skip_idx`` leave with
    their stream (hidden + residual) unchanged, as ``(0, stream)``. Where the attention's projections were installed
    (:func:`install_projection_sub_batches`, sharing ``rows``) they run on ``run_idx`` too; otherwise the whole
    attention runs for every token and only the MLP half is a sub-batch. The same operations as the layer's own
    forward, per token, so a running token's result does not depend on which other tokens run (up to the float
    rounding of a smaller matrix product)."""
    if residual is None:  # before the first executed layer the stream is hidden alone
        residual = hidden
        h = layer.input_layernorm(hidden)
    else:  # the stream hidden + residual (vLLM's fused add-norm may write it into residual in place)
        h, residual = layer.input_layernorm(hidden, residual)
    projected = rows is not None and getattr(layer.self_attn, "_retrofit_rows", None) is rows
    if projected:
        rows.idx = run_idx
        try:
            h = layer.self_attn(positions=positions, hidden_states=h)  # the running tokens' rows only
        finally:
            rows.idx = None
    else:
        h = layer.self_attn(positions=positions, hidden_states=h).index_select(0, run_idx)
    hs, rs = layer.post_attention_layernorm(h, residual.index_select(0, run_idx))
    hs = layer.mlp(hs)
    # a skipping token leaves as (0, its stream): the same stream hidden + residual, exactly (0 + x = x), in two
    # scatters instead of keeping copies of both halves
    out_h = hs.new_zeros(hidden.shape).index_copy_(0, run_idx, hs)
    out_r = residual.index_copy(0, run_idx, rs)
    if run_idx.numel() + skip_idx.numel() != hidden.shape[0]:  # padded with skipping tokens: theirs back
        out_h.index_fill_(0, skip_idx, 0)
        out_r.index_copy_(0, skip_idx, residual.index_select(0, skip_idx))
    return out_h, out_r


def _cpu_sub_metadata(attn, md, slots: torch.Tensor, qsl: list, run_rows: torch.Tensor, run_idx: torch.Tensor,
                      dtype: torch.dtype):
    """vLLM's CPU attention metadata (and the layer's KV-cache slots) for the requests ``run_rows`` [R] bool of a
    step whose requests' tokens lie at ``qsl``; ``run_idx`` are those requests' tokens; ``dtype`` the model's.
    The same fields the
    backend's builder makes (query offsets, sequence lengths, block table, the kernel's work schedule), for fewer
    requests. Raises ValueError for metadata of another kind."""
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata

    if type(md) is not CPUAttentionMetadata or not isinstance(attn.impl, CPUAttentionBackendImpl):
        raise ValueError(f"{type(md).__name__} is not vLLM's CPU attention metadata")
    if md.dynamic_causal is not None or md.use_sdpa_prefill or md.encoder_cache is not None:
        raise ValueError("the step's attention metadata is not the plain causal kind")
    R = run_rows.shape[0]
    decode = qsl[-1] == R  # one token per request: the requests are their tokens
    rows = run_idx if decode else run_rows.nonzero().flatten()
    n = int(rows.numel())
    if decode:
        sub_qsl = torch.arange(n + 1, dtype=md.query_start_loc.dtype)
        max_q = 1
    else:
        counts = torch.tensor([qsl[r + 1] - qsl[r] for r in rows.tolist()], dtype=md.query_start_loc.dtype)
        sub_qsl = torch.zeros(n + 1, dtype=counts.dtype)
        torch.cumsum(counts, 0, out=sub_qsl[1:])
        max_q = int(counts.max())
    rows_d = rows.to(md.seq_lens.device)
    seq_lens = md.seq_lens.index_select(0, rows_d)
    sub_qsl = sub_qsl.to(md.query_start_loc.device)
    impl = attn.impl
    sched = torch.ops._C.get_scheduler_metadata(  # vllm._custom_ops.cpu_attn_get_scheduler_metadata, as the builder
        n, impl.num_heads, impl.num_kv_heads, impl.head_size, seq_lens, dtype, sub_qsl, md.causal,
        impl.sliding_window, attn.isa, envs.VLLM_CPU_ATTN_SPLIT_KV, None, impl.kv_cache_dtype)
    sub = CPUAttentionMetadata(
        num_actual_tokens=int(run_idx.numel()), max_query_len=max_q, query_start_loc=sub_qsl,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=md.block_table.index_select(0, rows_d),
        slot_mapping=md.slot_mapping.index_select(0, run_idx.to(md.slot_mapping.device)),
        scheduler_metadata=sched, causal=md.causal)
    return sub, slots.index_select(0, run_idx.to(slots.device))


def _whole_sub_batch(forward, positions, hidden, residual, run_idx, fc, name, sub_md, sub_slots):
    """The whole decoder layer (its own forward) on the tokens ``run_idx`` alone, with the attention metadata and
    KV-cache slots of just their requests in place of the step's while it runs; the other tokens leave as
    ``(0, their stream)``: hidden + residual unchanged, exactly."""
    md_all, slots_all = fc.attn_metadata, fc.slot_mapping
    old_md, old_slots = md_all[name], slots_all[name]
    md_all[name], slots_all[name] = sub_md, sub_slots
    try:
        h, r = forward(positions.index_select(0, run_idx), hidden.index_select(0, run_idx),
                       None if residual is None else residual.index_select(0, run_idx))
    finally:
        md_all[name], slots_all[name] = old_md, old_slots
    stream = hidden if residual is None else hidden + residual
    return h.new_zeros(hidden.shape).index_copy_(0, run_idx, h), stream.index_copy(0, run_idx, r)


def _passthrough(hidden, residual):
    """A skipped layer: the stream (hidden + residual) unchanged. Before the first executed layer vLLM's residual
    is None; it becomes zeros here so the final norm (which expects a residual once any layer ran) still works
    when every layer is skipped: hidden + 0 is exact."""
    return hidden, (residual if residual is not None else torch.zeros_like(hidden))


_LAYER_CLASSES: dict[type, type] = {}


def _retrofit_layer_class(cls: type) -> type:
    """A subclass of a vLLM decoder layer whose forward(positions, hidden_states, residual) follows the plan."""
    sub = _LAYER_CLASSES.get(cls)
    if sub is None:
        def forward(self, positions, hidden_states, residual, **kw):
            ctl = self._retrofit_ctl
            base = super(sub, self).forward
            if ctl is None:
                return base(positions, hidden_states, residual, **kw)
            return ctl.run_layer(self.retrofit_index, lambda p, h, r: base(p, h, r, **kw), positions,
                                 hidden_states, residual, layer=None if kw else self)

        sub = type(f"Retrofit{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _LAYER_CLASSES[cls] = sub
    return sub


class _RetrofitMixin:
    """Turns a vLLM causal LM whose decoder layers take (positions, hidden_states, residual) into a retrofit one:
    each layer's class is swapped for a plan-following subclass (same module, same weights, same cache)."""

    hf_architecture = ""

    def _retrofit_init(self, vllm_config):
        hf = vllm_config.model_config.hf_config
        ctl = RetrofitController(vllm_config, int(hf.num_hidden_layers), int(hf.hidden_size))
        for i, layer in enumerate(self.model.layers):  # the ModuleList index is the layer index
            if not hasattr(layer, "self_attn"):  # pipeline-parallel placeholder
                continue
            layer.__class__ = _retrofit_layer_class(type(layer))
            object.__setattr__(layer, "retrofit_index", i)
            object.__setattr__(layer, "_retrofit_ctl", ctl)
            if ctl.dynamic and ctl.sub_batch and _splittable(layer) and _has_projections(layer.self_attn):
                install_projection_sub_batches(layer.self_attn, ctl.rows)
        object.__setattr__(self, "retrofit", ctl)
        log.info("retrofit: %s on %s, %s mode, artifacts %s, default %r, static skips %s", type(self).__name__,
                 self.hf_architecture, "per-request" if ctl.dynamic else "static", sorted(ctl.served),
                 ctl.cfg.default, [i for i, s in enumerate(ctl.static_skip) if s])

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        ctl = self.retrofit
        ctl.begin()
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        finally:
            ctl.end()

    def load_weights(self, weights):
        ctl = self.retrofit

        def tap(it):
            for name, t in it:
                if ctl.served and fingerprinted(name):
                    ctl.fingerprint_digests[name] = tensor_digest(t)
                yield name, t

        out = super().load_weights(tap(weights))
        ctl.check_fingerprints(self.config, self.hf_architecture)
        return out


def _make(base: type, doc: str) -> type:
    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self._retrofit_init(vllm_config)

    return type(f"Retrofit{base.__name__}", (_RetrofitMixin, base),
                {"__init__": __init__, "hf_architecture": base.__name__, "__doc__": doc, "__module__": __name__})


RetrofitLlamaForCausalLM = _make(LlamaForCausalLM, "vLLM's LlamaForCausalLM (Llama, SmolLM2) with retrofit plans.")
RetrofitQwen2ForCausalLM = _make(Qwen2ForCausalLM, "vLLM's Qwen2ForCausalLM with retrofit plans.")
RetrofitQwen3ForCausalLM = _make(Qwen3ForCausalLM, "vLLM's Qwen3ForCausalLM with retrofit plans.")
RetrofitMistralForCausalLM = _make(MistralForCausalLM, "vLLM's MistralForCausalLM with retrofit plans.")
