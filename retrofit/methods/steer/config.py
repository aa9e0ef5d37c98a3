"""SteerConfig: the validated options of steer (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig

__all__ = ["SteerConfig"]

_MODES = ("soft", "hard")


@dataclass
class SteerConfig(ValidatedConfig):
    """Steering options (validated).

    mode: 'soft' (z_e += lam * std(z)) or 'hard' (z_e = max(z) + eps) for the task experts.
    lam: the soft strength lambda (0.5; 0 = no change).
    eps: the hard margin over the maximum logit (0.01).
    experts: task experts per MoE layer, {layer: [expert, ...]} (set by the fit or an artifact; None = none).
    tau: the Delta threshold the experts were fitted with (provenance).
    layer_range: the fractional decoder-layer range [lo, hi) the fit kept (provenance).
    """

    mode: str = "soft"
    lam: float = 0.5
    eps: float = 0.01
    experts: dict[int, list[int]] | None = None
    tau: float | None = None
    layer_range: list[float] | None = None

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"SteerConfig.mode must be one of {_MODES}, got {self.mode!r}")
        for name, ok, want in (("lam", lambda v: True, "a finite number"), ("eps", lambda v: v >= 0, ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"SteerConfig.{name} must be {want}, got {v!r}")
            setattr(self, name, float(v))
        if self.tau is not None:
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
                raise ValueError(f"SteerConfig.tau must be a number, got {self.tau!r}")
            self.tau = float(self.tau)
        if self.layer_range is not None:
            self.layer_range = _check_range(self.layer_range)
        if self.experts is not None:
            if not isinstance(self.experts, dict):
                raise ValueError(f"SteerConfig.experts must be a dict {{layer: [experts]}}, got {self.experts!r}")
            out = {}
            for k, v in self.experts.items():  # JSON turns int keys into strings
                try:
                    layer = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"SteerConfig.experts: layer key {k!r} is not an integer") from None
                if layer < 0 or isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                    raise ValueError(f"SteerConfig.experts[{k!r}] must be a list of expert indices, got {v!r}")
                es = [int(e) for e in v]
                if any(e < 0 for e in es) or len(set(es)) != len(es):
                    raise ValueError(f"SteerConfig.experts[{k!r}] has negative or repeated experts: {v!r}")
                out[layer] = sorted(es)
            self.experts = dict(sorted(out.items()))


def _check_range(r) -> list[float]:
    try:
        lo, hi = (float(x) for x in r)
    except (TypeError, ValueError):
        raise ValueError(f"layer_range must be two fractions (lo, hi), got {r!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"layer_range must satisfy 0 <= lo < hi <= 1, got {r!r}")
    return [lo, hi]
