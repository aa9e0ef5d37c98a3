"""MisaConfig: the validated options of misa (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig

__all__ = ["MisaConfig"]

_KERNELS = ("auto", "reference", "torch", "triton")
_ROUTERS = ("moments", "blockmean")  # = retrofit.kernels.misa.ROUTERS


@dataclass
class MisaConfig(ValidatedConfig):
    """MISA options (validated).

    active_heads: indexer heads kept per query (h); ``>= n_heads`` gives the dense indexer exactly.
    block_size: tokens per key block (B): block means for ``router="blockmean"``, the boundaries at which the
        key moments are taken for ``router="moments"``.
    router: 'moments' (default: Gaussian model of each head's pre-activation from the causal key mean and
        covariance; routes the heads a linear fit describes worst, see kernels.misa) or 'blockmean' (the paper's
        block-mean head score).
    linear_threshold: moment router only -- the heads not routed whose ReLU slope P(pre-activation > 0) exceeds
        this enter the token score as one linear term (one extra dot product per key); None = heads only.
    hierarchical: MISA-dagger -- re-score ``candidates`` routed candidates with all heads.
    candidates: k' for the hierarchical mode: an int (must be >= the indexer's top-k) or 'auto' (from the
        context length: ``max(2 top-k, n / 8)``, kernels.misa.auto_candidates).
    kernel: 'auto' (Triton on CUDA when available; on CPU the exact reference for short inputs, the chunked
        torch path for long ones), 'reference', 'torch' or 'triton'.
    measure: also compute the dense selection on every call and record recall per layer in ``stats()``.
    """

    active_heads: int = 8
    block_size: int = 1024
    router: str = "moments"
    linear_threshold: float | None = 0.7
    hierarchical: bool = False
    candidates: int | str = "auto"
    kernel: str = "auto"
    measure: bool = False

    def __post_init__(self):
        for name in ("active_heads", "block_size", "candidates"):
            v = getattr(self, name)
            if name == "candidates" and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MisaConfig.{name} must be a positive integer"
                                 + (" or 'auto'" if name == "candidates" else "") + f", got {v!r}")
        if self.router not in _ROUTERS:
            raise ValueError(f"MisaConfig.router must be one of {_ROUTERS}, got {self.router!r}")
        t = self.linear_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
            raise ValueError(f"MisaConfig.linear_threshold must be a number in [0, 1] or None, got {t!r}")
        if self.kernel not in _KERNELS:
            raise ValueError(f"MisaConfig.kernel must be one of {_KERNELS}, got {self.kernel!r}")
        for name in ("hierarchical", "measure"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MisaConfig.{name} must be True or False, got {getattr(self, name)!r}")
