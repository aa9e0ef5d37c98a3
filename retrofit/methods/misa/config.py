"""MisaConfig: the validated options of misa (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig

__all__ = ["MisaConfig"]

_KERNELS = ("auto", "reference", "torch", "triton")


@dataclass
class MisaConfig(ValidatedConfig):
    """MISA options (validated).

    active_heads: indexer heads kept per query (h); ``>= n_heads`` gives the dense indexer exactly.
    block_size: tokens per key block for the head score (B).
    hierarchical: MISA-dagger -- re-score ``candidates`` routed candidates with all heads.
    candidates: k' for the hierarchical mode (must be >= the indexer's top-k).
    kernel: 'auto' (Triton on CUDA when available; on CPU the exact reference for short inputs, the chunked
        torch path for long ones), 'reference', 'torch' or 'triton'.
    measure: also compute the dense selection on every call and record recall per layer in ``stats()``.
    """

    active_heads: int = 8
    block_size: int = 1024
    hierarchical: bool = False
    candidates: int = 8192
    kernel: str = "auto"
    measure: bool = False

    def __post_init__(self):
        for name in ("active_heads", "block_size", "candidates"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MisaConfig.{name} must be a positive integer, got {v!r}")
        if self.kernel not in _KERNELS:
            raise ValueError(f"MisaConfig.kernel must be one of {_KERNELS}, got {self.kernel!r}")
        for name in ("hierarchical", "measure"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MisaConfig.{name} must be True or False, got {getattr(self, name)!r}")
