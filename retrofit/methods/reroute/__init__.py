"""Rewiring Experts on the Fly: test-time rerouting of MoE gates (arXiv 2510.14853).

Parts: ``config.py`` (RerouteConfig), ``runtime.py`` (the method: how it hooks in).
"""

from retrofit.methods.reroute.config import RerouteConfig
from retrofit.methods.reroute.runtime import (OWNER, router_confidence, select_layers, Reroute)

__all__ = ["RerouteConfig", "OWNER", "router_confidence", "select_layers", "Reroute"]
