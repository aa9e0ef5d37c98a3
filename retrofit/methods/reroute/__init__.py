"""Rewiring Experts on the Fly: test-time rerouting of MoE gates (arXiv 2510.14853).

Two schedules: ``schedule="fast"`` (default: 3 Adam steps at prefill only, the frozen layers below the adapted
ones run once under no_grad; optionally the loss on a last ``window`` of positions) and ``schedule="paper"``
(5 steps on the whole sequence at prefill and every 128 generated tokens). Parts: ``config.py`` (RerouteConfig,
SCHEDULE_DEFAULTS), ``runtime.py`` (the method: how it hooks in).
"""

from retrofit.methods.reroute.config import SCHEDULE_DEFAULTS, RerouteConfig
from retrofit.methods.reroute.runtime import (OWNER, router_confidence, select_layers, Reroute)

__all__ = ["RerouteConfig", "SCHEDULE_DEFAULTS", "OWNER", "router_confidence", "select_layers", "Reroute"]
