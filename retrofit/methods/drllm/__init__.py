"""Dr.LLM: per-layer routers that skip, execute or repeat each decoder block (arXiv 2510.12773).

Parts: ``config.py`` (DrLLMConfig), ``router.py`` (window pooling, Router, RouterBank), ``runtime.py`` (the layer
runtime: how it hooks in), ``train.py`` (focal loss, class weights, training), ``cli.py`` (``retrofit train``).
"""

from retrofit.core.plans import ACTIONS
from retrofit.methods.drllm.config import DrLLMConfig
from retrofit.methods.drllm.router import (NONFINITE, RouterBank, decision_codes, decision_tables, nonfinite_error,
                                          window_matrix, window_means, window_weights)
from retrofit.methods.drllm.runtime import DrLLM

__all__ = ["DrLLM", "DrLLMConfig", "ACTIONS", "window_means", "window_matrix", "window_weights", "RouterBank",
           "decision_tables", "decision_codes", "nonfinite_error", "NONFINITE"]
