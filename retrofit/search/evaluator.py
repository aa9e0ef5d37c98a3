"""Scoring one example under many layer plans, fast.

A *plan* is a tuple of L actions, one per decoder layer: ``"skip"`` (identity), ``"execute"`` (block once) or
``"repeat"`` (the same block twice in a row). Running the decoder layers this way through the ``retrofit.arch``
adapter (``call_layer`` / ``head``, no KV cache) is exactly the Dr.LLM runtime's semantics (docs/DRLLM spec).

Three things make the search cheap compared with a full forward per plan (``naive_scores``):

1. **Packing.** All choices of a multiple-choice example share the prompt; the prompt and every choice's
   continuation are laid out once as a token trie in a single sequence, with an attention mask that lets each
   token see only its own ancestors and position ids equal to the depth in the trie. Each choice's log-likelihood
   is then exactly what a separate forward of ``context + continuation`` gives (up to float rounding).
2. **Prefix cache.** The hidden state entering layer ``j`` depends only on the plan's first ``j`` actions; it is
   cached by that prefix, so a plan that differs from an evaluated one only from layer ``i`` on re-runs layers
   ``>= i`` only.
3. **Batching.** Plans evaluated together are advanced layer by layer as one batch: at each layer the distinct
   prefixes that need the block are stacked and run in one call; ``repeat`` reuses the ``execute`` output of the
   same prefix for its first pass.

The LM head runs only at the positions that predict continuation tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrofit.arch import get_adapter

from retrofit.core.data import (Example, continuation_logprobs, extract_number, numbers_match, pad_right,
                                tokenize_request)
from retrofit.core.plans import action_passes, validate_plan

__all__ = ["PlanEvaluator", "PlanResult", "naive_scores"]


@dataclass
class PlanResult:
    plan: tuple[str, ...]
    pred: int | str | None  # argmax choice (mc) or extracted number (gen)
    correct: bool
    scores: list[float] | None = None  # per-choice log-likelihoods (mc)
    text: str | None = None  # generated text (gen)
    gold: int | str | None = None  # the example's gold choice / answer


class _Packed:
    """The token trie of all (context + continuation[:-1]) inputs of one example."""

    def __init__(self, requests: list[tuple[list[int], list[int]]]):
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        index: dict[tuple[int, int], int] = {}
        self.targets: list[list[tuple[int, int]]] = []  # per request: (node predicting the token, token id)
        for ctx, cont in requests:
            seq = ctx + cont
            node = -1
            nodes = []
            for t in seq[:-1]:
                key = (node, t)
                if key not in index:
                    index[key] = len(self.tokens)
                    self.tokens.append(t)
                    self.parent.append(node)
                    self.depth.append(0 if node < 0 else self.depth[node] + 1)
                node = index[key]
                nodes.append(node)
            # token seq[k] (k >= len(ctx)) is predicted at the node holding seq[k-1] = nodes[k-1]
            self.targets.append([(nodes[k - 1], seq[k]) for k in range(len(ctx), len(seq))])

    def mask(self, dtype) -> torch.Tensor:
        T = len(self.tokens)
        allowed = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            j = i
            while j >= 0:
                allowed[i, j] = True
                j = self.parent[j]
        m = torch.zeros(T, T, dtype=dtype)
        m.masked_fill_(~allowed, torch.finfo(dtype).min)
        return m[None, None]


class PlanEvaluator:
    """Scores one example at a time under layer plans, with packing, a prefix cache and batching.

    ``set_example(ex)`` then ``evaluate(plans)``. ``stats`` counts configurations evaluated and block passes run.
    """

    def __init__(self, model, tokenizer, *, max_cache: int = 6000, max_new_tokens: int = 256,
                 prefix_cache: bool = True):
        self.model = model
        self.tok = tokenizer
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers(model)
        self.L = len(self.layers)
        self.max_cache = max_cache
        self.max_new_tokens = max_new_tokens
        self.prefix_cache = prefix_cache
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.ex: Example | None = None
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"configs": 0, "block_passes": 0, "cache_hits": 0}

    # ------------------------------------------------------------------ example setup
    def set_example(self, ex: Example):
        self.ex = ex
        self._cache: dict[tuple, torch.Tensor] = {}
        self._results: dict[tuple, PlanResult] = {}
        if ex.kind == "mc":
            reqs = [tokenize_request(self.tok, c, x) for c, x in ex.requests()]
            self._packed = _Packed(reqs)
            ids = torch.tensor([self._packed.tokens], device=self.device)
            pos = torch.tensor([self._packed.depth], device=self.device)
            inner = self.adapter.decoder(self.model)
            with torch.no_grad():
                emb = inner.embed_tokens(ids)
                pos_emb = inner.rotary_emb(emb, position_ids=pos)
            self._kwargs = dict(attention_mask=self._packed.mask(emb.dtype).to(self.device),
                                position_embeddings=pos_emb, position_ids=pos, past_key_values=None,
                                use_cache=False)
            self._cache[()] = emb[0]
            tgt_nodes = sorted({n for t in self._packed.targets for n, _ in t})
            self._tgt_nodes = torch.tensor(tgt_nodes, device=self.device)
            col = {n: i for i, n in enumerate(tgt_nodes)}
            self._tgt_flat = [[(col[n], t) for n, t in tg] for tg in self._packed.targets]
        else:
            self._prompt_ids = self.tok(ex.prompt, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, plans) -> list[PlanResult]:
        """Results for ``plans`` (each a sequence of L actions), in order. Already-scored plans are not re-run."""
        if self.ex is None:
            raise RuntimeError("call set_example(example) first")
        plans = [tuple(validate_plan(p, self.L)) for p in plans]
        todo = list(dict.fromkeys(p for p in plans if p not in self._results))
        if todo:
            if self.ex.kind == "mc":
                self._eval_mc(todo)
            else:
                for p in todo:
                    self._results[p] = self._eval_gen(p)
            self.stats["configs"] += len(todo)
        return [self._results[p] for p in plans]

    def _block(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        self.stats["block_passes"] += h.shape[0]
        return self.adapter.call_layer(self.layers[layer_idx], h, self._kwargs)

    @torch.no_grad()
    def _eval_mc(self, plans: list[tuple[str, ...]]):
        cache = self._cache
        if not self.prefix_cache:
            cache = {(): self._cache[()]}
        # start each plan at its longest cached prefix
        L = self.L
        start = []
        for p in plans:
            j = L
            while j > 0 and p[:j] not in cache:
                j -= 1
            start.append(j)
            if j > 0:
                self.stats["cache_hits"] += 1
        for j in range(min(start), L):
            active = [p for p, s in zip(plans, start) if s <= j]
            need = list(dict.fromkeys(p[: j + 1] for p in active if p[: j + 1] not in cache))
            run_parents = list(dict.fromkeys(k[:j] for k in need if k[j] != "skip"))
            if run_parents:
                h = torch.stack([cache[k] for k in run_parents])
                out1 = self._block(j, h)
                first = {k: out1[i] for i, k in enumerate(run_parents)}
                rep_parents = [k for k in run_parents if k + ("repeat",) in need]
                if rep_parents:
                    h2 = torch.stack([first[k] for k in rep_parents])
                    out2 = self._block(j, h2)
                    for i, k in enumerate(rep_parents):
                        cache[k + ("repeat",)] = out2[i]
                for k in run_parents:
                    if k + ("execute",) in need:
                        cache[k + ("execute",)] = first[k]
            for k in need:
                if k[j] == "skip":
                    cache[k] = cache[k[:j]]
        finals = torch.stack([cache[p] for p in plans])  # [n, T, d]
        hid = finals[:, self._tgt_nodes]  # [n, P, d]
        logp = torch.log_softmax(self.adapter.head(self.model, hid).float(), dim=-1)
        for i, p in enumerate(plans):
            scores = [float(sum(logp[i, c, t] for c, t in tg)) for tg in self._tgt_flat]
            pred = max(range(len(scores)), key=lambda k: scores[k])
            self._results[p] = PlanResult(p, pred, pred == self.ex.gold, scores, gold=self.ex.gold)
        # forget full-length entries (never reused as prefixes) and bound the cache
        for p in plans:
            cache.pop(p, None)
        if len(cache) > self.max_cache:
            root = cache[()]
            cache.clear()
            cache[()] = root

    @torch.no_grad()
    def run_plan(self, input_ids: torch.Tensor, plan) -> torch.Tensor:
        """Logits [B, T, V] of ``input_ids`` under ``plan`` (plain causal attention, no cache)."""
        plan = validate_plan(plan, self.L)
        h, kw = self.adapter.prepare(self.model, input_ids)
        for j, a in enumerate(plan):
            for _ in range(action_passes(a)):
                h = self.adapter.call_layer(self.layers[j], h, kw)
        return self.adapter.head(self.model, h)

    @torch.no_grad()
    def _eval_gen(self, plan) -> PlanResult:
        ids = list(self._prompt_ids)
        n0 = len(ids)
        eos = self.tok.eos_token_id
        for _ in range(self.max_new_tokens):
            logits = self.run_plan(torch.tensor([ids], device=self.device), plan)
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            text = self.tok.decode(ids[n0:])
            if "\n\n" in text or "Question:" in text:
                break
        text = self.tok.decode(ids[n0:])
        text = text.split("\n\n")[0].split("Question:")[0]
        pred = extract_number(text)
        return PlanResult(plan, pred, numbers_match(pred, str(self.ex.gold)), None, text, gold=self.ex.gold)


@torch.no_grad()
def naive_scores(model, tokenizer, ex: Example, plan) -> list[float]:
    """Reference scorer: a full forward of each choice's ``context + continuation`` (padded batch) under ``plan``.

    This is what one writes without the search machinery; the benchmark's baseline and the tests' oracle.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    plan = validate_plan(plan, len(layers))
    reqs = [tokenize_request(tokenizer, c, x) for c, x in ex.requests()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    ids, _ = pad_right([c + x for c, x in reqs], pad, dev)  # right padding: the causal mask suffices
    h, kw = adapter.prepare(model, ids)
    for j, a in enumerate(plan):
        for _ in range(action_passes(a)):
            h = adapter.call_layer(layers[j], h, kw)
    return [float(lp.sum()) for lp in continuation_logprobs(h, reqs, head=lambda x: adapter.head(model, x))]
