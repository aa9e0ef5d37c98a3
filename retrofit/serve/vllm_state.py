"""Per-request state for the vLLM plugin: a logits processor that mirrors vLLM's persistent batch.

vLLM hands a request's ``SamplingParams.extra_args`` to logits processors (``update_state`` runs before every
forward pass with the rows added, removed and moved in the persistent batch), never to the model. This
processor keeps one :class:`RowState` per batch row so that the retrofit model, in the same worker process, can
read each row's choice (artifact, plan, none) and keep the plan it decided at the row's prefill for the rest
of its decoding. It never changes logits, except for a row whose arguments the worker could not serve: that
row is ended at once (all logits but EOS at -inf) and the reason is logged, so no request silently runs
under the wrong plan.

Registered through the ``vllm.logits_processors`` entry point, so it loads in every vLLM engine of an
environment where retrofit is installed; with no retrofit model loaded it only does the bookkeeping.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

import torch

from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor, MoveDirectionality

from retrofit.serve.config import (REQUEST_KEYS, ServeConfigError, check_request_keys, frontend_serve_config,
                                   is_vllm_server, parse_request_args)

log = init_logger("vllm.retrofit")

_MIRROR: "RetrofitBatchMirror | None" = None


@functools.lru_cache(maxsize=1)
def _frontend_config():
    """The serve config the API front end can see (environment or the server's --hf-overrides), read once; an
    invalid one is logged and left to the worker, which refuses to start with it."""
    try:
        return frontend_serve_config()
    except ServeConfigError as e:
        log.warning("retrofit: the serve config on this server's command line is invalid (%s)", e)
        return None, ""


def current_mirror() -> "RetrofitBatchMirror | None":
    return _MIRROR


class RowState:
    __slots__ = ("extra_args", "prompt_len", "choice", "plan", "error")

    def __init__(self, extra_args, prompt_len):
        self.extra_args = dict(extra_args or {})
        self.prompt_len = prompt_len
        self.choice = None  # RequestChoice, resolved by the model on the row's first step
        self.plan = None  # torch.LongTensor [L] once decided
        self.error: str | None = None


class RetrofitBatchMirror(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params):
        """Format check at the API front end (HTTP 400 on a malformed plan or argument); names are checked
        against the environment's serve config when there is one."""
        args = sampling_params.extra_args or {}
        check_request_keys(args)  # a look-alike key ('retrofitt') is refused, never ignored
        if not any(k in args for k in REQUEST_KEYS):
            return
        cfg, _ = _frontend_config()
        if cfg is None and is_vllm_server():
            raise ServeConfigError("this vLLM server was started without a retrofit serve config, so it would "
                                   "ignore the retrofit arguments; start it with `retrofit serve` (or "
                                   "--hf-overrides with a 'retrofit' key, or RETROFIT_VLLM_CONFIG)")
        parse_request_args(args, cfg)

    def __init__(self, vllm_config, device, is_pin_memory):
        global _MIRROR
        self.rows: list[RowState | None] = []
        eos = getattr(vllm_config.model_config.hf_config, "eos_token_id", None)
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        _MIRROR = self

    def is_argmax_invariant(self) -> bool:
        return False  # rows with unservable arguments are ended through their logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.rows
        need = batch_update.batch_size
        for i in batch_update.removed:
            if i < len(rows):
                r = rows[i]
                if r is not None and r.plan is not None and not r.error:
                    run = int((r.plan != 0).sum())
                    log.info("retrofit: request left the batch: %d/%d decoder layers executed per token "
                             "(plan %s)", run, len(r.plan), "".join("ser"[int(a)] for a in r.plan))
                rows[i] = None
        for index, params, prompt_ids, _out in batch_update.added:
            while len(rows) <= index:
                rows.append(None)
            rows[index] = RowState(getattr(params, "extra_args", None),
                                   len(prompt_ids) if prompt_ids is not None else None)
        for a, b, kind in batch_update.moved:
            while len(rows) <= max(a, b):
                rows.append(None)
            if kind == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows[b], rows[a]
            else:
                rows[b], rows[a] = rows[a], None
        del rows[max(need, 0):]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bad = [i for i, r in enumerate(self.rows[: logits.shape[0]]) if r is not None and r.error]
        if bad and self.eos:  # end these rows now: EOS is the only token left
            rows = torch.tensor(bad, device=logits.device)
            logits[rows] = float("-inf")
            logits[rows.unsqueeze(1), torch.tensor(self.eos, device=logits.device).unsqueeze(0)] = 0.0
        return logits
