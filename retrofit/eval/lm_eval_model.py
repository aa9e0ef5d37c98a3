"""The ``retrofit`` lm-eval model: lm-eval's HF model with a retrofit method attached.

``lm_eval --model retrofit --model_args pretrained=default,method=drllm,routers=DIR,skip_bias=0.5`` once this module
is imported (lm-eval 0.4.13 finds models only through ``@register_model`` in imported code; it does not read the
``lm_eval.models`` entry point in pyproject.toml). ``retrofit eval`` / ``python -m retrofit.eval`` import it for you.

model_args
    ``pretrained``: ``default`` (SmolLM2-135M-Instruct) or a local Hugging Face folder, loaded with
    :func:`retrofit.models.load_model`. ``method``: a retrofit method key (absent: the plain base model).
    ``routers``: an artifact folder for that method. Every other key that names a field of the method's config
    overrides it (``skip_bias=0.5``, ``plan=...``); the remaining keys go to lm-eval's ``HFLM``.
    ``plan`` (drllm) takes a JSON file (a list of actions, ``{"plan": [...]}`` or a retrofit.json), a JSON list, or a
    compact string with one letter per layer: ``s`` skip, ``e`` execute, ``r`` repeat (model_args split on commas).

Dr.LLM decisions for log-likelihood tasks
    lm-eval scores each (context, continuation) pair with one forward pass over context + continuation. Dr.LLM
    decides once per sequence from the prompt only, so here the routers read the *context* (the question prompt):
    each distinct context is prefilled once with the routers to get its plan (``handle.last_plans``), and every
    scored row built from it (one per answer choice) runs under that plan via ``handle.set_plan`` (per batch row).
    All choices of one question therefore run through the same layers, and the plan never depends on the answer
    being scored. A static plan (``plan=``) needs no prefill.

Compute accounting (:meth:`RetrofitLM.compute_metrics`)
    Counted per distinct prompt and per task: ``mean_layers_executed`` (block passes per prompt; repeat counts 2),
    ``layer_fraction`` (that over the number of decoder layers), ``layers_saved``, ``prompts`` and ``action_counts``
    (per layer ``[skip, execute, repeat]``). ``retrofit eval`` writes them as ``"<name>,none"`` keys into
    ``results["results"][task]`` next to the accuracy.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from retrofit.core.plans import ACTIONS, parse_plan, plan_passes

log = logging.getLogger(__name__)

# `retrofit lm-eval` sets a list here while lm-eval runs, to find the models lm-eval builds (their compute metrics)
COLLECT: list | None = None


@register_model("retrofit")
class RetrofitLM(HFLM):
    """lm-eval ``HFLM`` over a retrofit-attached model (see the module docstring for the arguments)."""

    def __init__(self, pretrained: Any = "default", method: str | None = None, routers: str | None = None,
                 device: str = "cpu", dtype: str | torch.dtype = "float32", batch_size: int | str = 1, **kwargs):
        import retrofit
        from retrofit.arch import get_adapter
        from retrofit.methods import get_method
        from retrofit.models import load_model

        cfg: dict[str, Any] = {}
        self.prompt_policy = "continuation"  # the base model
        if method:
            method_cls = get_method(method)
            self.prompt_policy = method_cls.prompt_policy
            if self.prompt_policy == "context":
                raise NotImplementedError(
                    f"method {method!r} adapts on the context (prompt policy 'context'); lm-eval scores context + "
                    "answer in one forward, so it would adapt on the answer too. The lm-eval model does not run "
                    "such methods (score them with an adapt-then-frozen loop, as bench/bench_reroute.py does).")
            fields = {f.name for f in dataclasses.fields(method_cls.config_cls)}
            cfg = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        elif routers is not None:
            raise ValueError("routers= given without method=; add method=drllm (or another method key)")
        hf_params = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(kwargs) - hf_params)
        if unknown:
            valid = sorted(fields) if method else []
            raise TypeError(f"retrofit model got unknown model_args {unknown}; "
                            f"{'config options of ' + repr(method) + ': ' + str(valid) + '; ' if method else ''}"
                            "or lm-eval HFLM arguments")
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "auto": torch.float32, "bfloat16": torch.bfloat16,
                     "float16": torch.float16}[dtype]
        if isinstance(pretrained, str) or pretrained is None:
            model, tok = load_model(pretrained or "default", dtype=dtype)
            self.pretrained_name = str(pretrained or "default")
        else:  # a pre-built (model, tokenizer) pair or a model with tokenizer= given
            model, tok = (pretrained if isinstance(pretrained, tuple) else (pretrained, kwargs.pop("tokenizer")))
            self.pretrained_name = type(model).__name__
        model = model.to(device)
        super().__init__(pretrained=model, tokenizer=tok, batch_size=batch_size, **kwargs)
        self.method = method or None
        self.num_layers = get_adapter(self._model).num_layers(self._model)
        if "plan" in cfg:
            cfg["plan"] = parse_plan(cfg["plan"], self.num_layers, allow_files=True)
        self.handle = retrofit.attach(self._model, method, routers=routers, **cfg) if method else None
        self.retrofit_config = {"pretrained": self.pretrained_name, "method": self.method,
                                "routers": str(routers) if routers else None,
                                **({k: v for k, v in cfg.items()} if cfg else {})}
        self._compute: dict[str | None, dict[tuple, list[str]]] = {}
        self._req_tasks: list | None = None
        self._row_plans: dict[tuple, list[str]] | None = None
        if COLLECT is not None:
            COLLECT.append(self)

    def close(self) -> None:
        """Detach the retrofit method from the model (the model is the base again), so that another
        configuration can be evaluated on the same model object. Idempotent."""
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- which plan a prompt runs ----------------------------------------------------------------------------
    def _static_plan(self) -> list[str] | None:
        """The plan every prompt runs when it does not depend on the prompt (base model, static drllm plan)."""
        if self.handle is None or self.prompt_policy != "prompt":
            return ["execute"] * self.num_layers
        plan = getattr(self.handle.config, "plan", None)
        if plan is not None:
            return list(plan)
        return None  # routers decide per prompt

    @torch.no_grad()
    def route_prompts(self, prompts: list[list[int]]) -> list[list[str]]:
        """Dr.LLM plans the routers choose for token-id prompts (prefill with the routers, batched, left-padded)."""
        static = self._static_plan()
        if static is not None:
            return [list(static) for _ in prompts]
        bs = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 16
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[list[str]] = []
        self.handle.set_plan(None)
        for i in range(0, len(prompts), bs):
            chunk = [p[-self.max_length:] for p in prompts[i:i + bs]]
            n = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (n - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            self._model(input_ids=ids, attention_mask=mask, use_cache=False)
            plans = self.handle.last_plans
            if plans is None or len(plans) != len(chunk):
                raise RuntimeError(f"the {self.method} handle did not report one plan per prompt (handle.last_plans)")
            out.extend([list(p) for p in plans])
        return out

    # --- lm-eval hooks -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._req_tasks = [getattr(r, "task_name", None) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._req_tasks = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        tasks = self._req_tasks if self._req_tasks is not None and len(self._req_tasks) == len(requests) \
            else [None] * len(requests)
        contexts = list(dict.fromkeys(tuple(ctx) for _, ctx, _ in requests))
        plans = dict(zip(contexts, self.route_prompts([list(c) for c in contexts])))
        for task, (_, ctx, _) in zip(tasks, requests):
            self._compute.setdefault(task, {})[tuple(ctx)] = plans[tuple(ctx)]
        per_row = self.handle is not None and self.prompt_policy == "prompt" and self._static_plan() is None
        if per_row:
            rows: dict[tuple, list[str]] = {}
            for _, ctx, cont in requests:
                rows.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), plans[tuple(ctx)])
            self._row_plans = rows
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._row_plans = None

    def _row_plan(self, row: list[int]) -> list[str]:
        # lm-eval right-pads rows with token id 0: find the unpadded row among the rows we planned
        n = len(row)
        while n > 0 and row[n - 1] == 0:
            n -= 1
        for end in range(n, len(row) + 1):
            plan = self._row_plans.get(tuple(row[:end]))
            if plan is not None:
                return plan
        raise RuntimeError("retrofit: a scored row does not match any planned request (lm-eval internals changed?)")

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._row_plans is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        self.handle.set_plan([self._row_plan(r) for r in inps.tolist()])
        try:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        finally:
            self.handle.set_plan(None)

    # --- compute metrics ---------------------------------------------------------------------------------------
    def reset_compute(self) -> None:
        self._compute = {}

    def compute_metrics(self, task: str | None = None) -> dict[str, Any]:
        """Compute accounting over the distinct prompts scored so far (for one task, or all when ``task`` is None)."""
        if task is None:
            plans = [p for d in self._compute.values() for p in d.values()]
        else:
            plans = list(self._compute.get(task, {}).values())
        L = self.num_layers
        counts = [[0, 0, 0] for _ in range(L)]
        for p in plans:
            for i, a in enumerate(p):
                counts[i][ACTIONS.index(a)] += 1
        mean = sum(plan_passes(p) for p in plans) / len(plans) if plans else float("nan")
        return {"mean_layers_executed": mean, "layer_fraction": mean / L, "layers_saved": L - mean,
                "num_layers": L, "prompts": len(plans), "action_counts": counts}

    def get_model_info(self) -> dict:
        info = {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(self._model.dtype), "retrofit": self.retrofit_config}
        return info
