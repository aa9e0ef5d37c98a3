"""MISA: a router over the heads of a DeepSeek-Sparse-Attention indexer (arXiv 2605.07363).

Parts: ``config.py`` (MisaConfig), ``runtime.py`` (the method: how it hooks in), ``cli.py``, ``distill.py``.
"""

from retrofit.methods.misa.config import MisaConfig
from retrofit.methods.misa.runtime import (Misa)

__all__ = ["MisaConfig", "Misa"]
