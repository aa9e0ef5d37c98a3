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

# What ``steps`` / ``interval`` / ``window`` = None mean under each schedule (window 0 = the whole context).
SCHEDULE_DEFAULTS = {
    "paper": {"steps": 5, "interval": 128, "window": 0},
    "fast": {"steps": 5, "interval": 0, "window": 128},
}


@dataclass
class RerouteConfig(ValidatedConfig):
    """Rerouting options (validated).

    schedule: 'fast' (default) or 'paper'. 'paper' is the paper's schedule as first implemented here: every
        optimiser step runs the whole model over the whole sequence so far, at prefill and every ``interval``
        (128) generated tokens. 'fast' gives the same deltas for the same objective at a lower cost (the frozen
        layers below the lowest adapted MoE layer run once per adaptation, under no_grad, not once per step)
        and by default adapts on the last ``window`` (128) positions only (the prefix before them runs once,
        under no_grad, into a KV cache the window attends to) and at prefill only (``interval`` 0).
    steps: optimiser steps per adaptation (None: the schedule's, 5; 0 = never change the routing: identical to
        the base model).
    lr: learning rate (0.05).
    optimizer: 'adam' (default; torch defaults betas (0.9, 0.999), eps 1e-8) or 'sgd' (plain gradient steps).
    interval: re-adapt every this many generated tokens; 0 = adapt at prefill only (None: the schedule's,
        'paper' 128, 'fast' 0).
    window: 'fast' only: the loss is the next-token loss of the last ``window`` positions of the sequence so far
        (None: 128; 0 = every position, the paper's objective). 'paper' always uses every position.
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
    window: int | None = None
    layers: list[int] | None = None
    num_layers: int | None = None
    layer_order: str = "least_confident"
    kv_cache: str = "keep"

    def __post_init__(self):
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"RerouteConfig.schedule must be one of {_SCHEDULES} ('fast': the cheaper default, "
                             f"'paper': the paper's schedule), got {self.schedule!r}")
        for name in ("steps", "interval", "window"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"RerouteConfig.{name} must be an integer >= 0 or None (the schedule's default: "
                                 f"{SCHEDULE_DEFAULTS[self.schedule][name]}), got {v!r}")
        if self.schedule == "paper" and self.window not in (None, 0):
            raise ValueError(f"RerouteConfig.window={self.window!r} needs schedule='fast'; schedule='paper' adapts on "
                             "every position of the context (leave window=None, or set schedule='fast')")
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

    @property
    def effective_window(self) -> int:
        """Loss positions per adaptation; 0 = all of them."""
        return SCHEDULE_DEFAULTS[self.schedule]["window"] if self.window is None else self.window
