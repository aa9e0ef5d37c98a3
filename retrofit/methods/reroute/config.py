"""RerouteConfig: the validated options of reroute (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig

__all__ = ["RerouteConfig"]

_ORDERS = ("least_confident", "most_confident")
_OPTIMS = ("adam", "sgd")
_KV = ("keep", "recompute")


@dataclass
class RerouteConfig(ValidatedConfig):
    """Rerouting options (validated).

    steps: optimiser steps per adaptation (5; 0 = never change the routing: identical to the base model).
    lr: learning rate (0.05).
    optimizer: 'adam' (default; torch defaults betas (0.9, 0.999), eps 1e-8) or 'sgd' (plain gradient steps).
    interval: re-adapt every this many generated tokens (128); 0 = adapt at prefill only.
    layers: explicit decoder-layer indices of MoE layers to adapt (overrides num_layers / layer_order).
    num_layers: adapt this many MoE layers per sequence chosen by router confidence; None = all MoE layers.
    layer_order: 'least_confident' (largest C_l = mean -log p of the selected experts) or 'most_confident'.
    kv_cache: after a re-adaptation during generation, 'keep' the KV cache or 'recompute' it with the new deltas.
    """

    steps: int = 5
    lr: float = 0.05
    optimizer: str = "adam"
    interval: int = 128
    layers: list[int] | None = None
    num_layers: int | None = None
    layer_order: str = "least_confident"
    kv_cache: str = "keep"

    def __post_init__(self):
        for name, lo in (("steps", 0), ("interval", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"RerouteConfig.{name} must be an integer >= {lo}, got {v!r}")
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
