"""Multilingual routing steering (arXiv 2510.04694): promote, in the middle layers, the experts that English
task inputs use more than English general text.

Parts: ``config.py`` (SteerConfig), ``runtime.py`` (the method: how it hooks in), ``cli.py``.
"""

from retrofit.methods.steer.config import SteerConfig
from retrofit.methods.steer.runtime import (OWNER, expert_usage, middle_layers, steering_masks, steer_logits,
                                            SteeringFit, routing_usage, fit_steering, load_texts, Steer, attach_fit)

__all__ = ["SteerConfig", "OWNER", "expert_usage", "middle_layers", "steering_masks", "steer_logits", "SteeringFit",
           "routing_usage", "fit_steering", "load_texts", "Steer", "attach_fit"]
