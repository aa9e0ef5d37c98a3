"""RerouteConfig: the validated options of reroute (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig

__all__ = ["RerouteConfig", "SCHEDULE_DEFAULTS"]

_ORDERS = ("least_confident", "most_confident")
_OPTIMS = ("adam", "sgd")
_KV = ("keep", "recompute")
_SCHEDULES = ("fast", "paper")

# What ``steps`` / ``interval`` = None mean under each schedule.
SCHEDULE_DEFAULTS = {
    "paper": {"steps": 5, "interval": 128},
    "fast": {"steps": 3, "interval": 0},
}


@dataclass
class RerouteConfig(ValidatedConfig):
    """Rerouting options (validated).

    schedule: 'fast' (default) or 'paper'. 'paper' is the paper's schedule as first implemented here: 5 steps,
        every step a forward of the whole model over the whole sequence so far, at prefill and every 128
        generated tokens. 'fast' is 3 steps at prefill only, and computes the same deltas as 'paper' would for
        the same steps and layers at a lower cost: the frozen layers below the lowest adapted MoE layer run once
        per adaptation, under no_grad, not once per step (docs/moe_methods.md).
    steps: optimiser steps per adaptation (None: the schedule's, 'paper' 5, 'fast' 3; 0 = never change the
        routing: identical to the base model).
    lr: learning rate (0.05).
    optimizer: 'adam' (default; torch defaults betas (0.9, 0.999), eps 1e-8) or 'sgd' (plain gradient steps).
    interval: re-adapt every this many generated tokens; 0 = adapt at prefill only (None: the schedule's,
        'paper' 128, 'fast' 0).
    window: 'fast' only: 0 (default) = the loss is the next-token loss of every position of the sequence so far
        (the paper's objective); w > 0 = of the last w positions only, the tokens before them run once, under
        no_grad, into a KV cache the window attends to (cheaper on long contexts, but measured to lose the gain
        at 512 tokens of context: docs/moe_methods.md). 'paper' always uses every position.
    layers: explicit decoder-layer indices of MoE layers to adapt (overrides num_layers / layer_order).
    num_layers: adapt this many MoE layers per sequence chosen by router confidence; None = all MoE layers.
    layer_order: 'least_confident' (largest C_l = mean -log p of the selected experts) or 'most_confident'.
    kv_cache: after a re-adaptation during generation, 'keep' the KV cache or 'recompute' it with the new deltas.
    """

    schedule: str = "fast"
    steps: int | None = None
    lr: float = 0.05
    optimizer: str = "adam"
    interval: int | None = None
    window: int = 0
    layers: list[int] | None = None
    num_layers: int | None = None
    layer_order: str = "least_confident"
    kv_cache: str = "keep"

    def __post_init__(self):
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"RerouteConfig.schedule must be one of {_SCHEDULES} ('fast': the cheaper default, "
                             f"'paper': the paper's schedule), got {self.schedule!r}")
        for name in ("steps", "interval"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"RerouteConfig.{name} must be an integer >= 0 or None (the schedule's default: "
                                 f"{SCHEDULE_DEFAULTS[self.schedule][name]}), got {v!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"RerouteConfig.window must be an integer >= 0 (0: every position), got {self.window!r}")
        if self.schedule == "paper" and self.window != 0:
            raise ValueError(f"RerouteConfig.window={self.window!r} needs schedule='fast'; schedule='paper' adapts on "
                             "every position of the context (leave window=0, or set schedule='fast')")
        v = self.lr
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"RerouteConfig.lr must be a finite number > 0, got {v!r}")
        self.lr = float(v)
        if self.optimizer not in _OPTIMS:
            raise ValueError(f"RerouteConfig.optimizer must be one of {_OPTIMS}, got {self.optimizer!r}")
        if self.layer_order not in _ORDERS:
            raise ValueError(f"RerouteConfig.layer_order must be one of {_ORDERS}, got {self.layer_order!r}")
        if self.kv_cache not in _KV:
            raise ValueError(f"RerouteConfig.kv_cache must be one of {_KV}, got {self.kv_cache!r}")
        if self.num_layers is not None:
            v = self.num_layers
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RerouteConfig.num_layers must be a positive integer or None, got {v!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"RerouteConfig.layers must be a list of MoE layer indices, got {self.layers!r}")
            layers = list(self.layers)
            if not layers or any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"RerouteConfig.layers must be a non-empty list of layer indices >= 0, "
                                 f"got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"RerouteConfig.layers has duplicates: {self.layers!r}")
            self.layers = sorted(layers)

    # the values in effect (None resolved by the schedule)
    @property
    def effective_steps(self) -> int:
        return SCHEDULE_DEFAULTS[self.schedule]["steps"] if self.steps is None else self.steps

    @property
    def effective_interval(self) -> int:
        return SCHEDULE_DEFAULTS[self.schedule]["interval"] if self.interval is None else self.interval
