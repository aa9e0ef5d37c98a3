"""RoMA: router-only finetuning with routing manifold alignment (arXiv 2511.07419).

Parts: ``config.py`` (RomaConfig), ``runtime.py`` (the method: how it hooks in), ``train.py``, ``cli.py``.
"""

from retrofit.methods.roma.config import RomaConfig
from retrofit.methods.roma.runtime import (routing_probs, kernel_weights, manifold_term, Roma)

__all__ = ["RomaConfig", "routing_probs", "kernel_weights", "manifold_term", "Roma"]
