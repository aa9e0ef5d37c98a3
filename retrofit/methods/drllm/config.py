from __future__ import annotations

from dataclasses import dataclass

from retrofit.core.config import ValidatedConfig
from retrofit.core.plans import ACTIONS, EXECUTE, REPEAT, SKIP, validate_plan

__all__ = ["DrLLMConfig", "ACTIONS", "SKIP", "EXECUTE", "REPEAT", "validate_plan"]


@dataclass
class DrLLMConfig(ValidatedConfig):
    """Dr.LLM routers: one skip/execute/repeat decision per decoder layer and sequence, made at prefill.

    num_windows: prompt split into this many windows for mean pooling (paper: 8; more helps up to 16-32).
    bottleneck: router MLP width, Linear(d, bottleneck) -> GELU(tanh) -> Linear(bottleneck, 3) (paper: 128).
    skip_bias / repeat_bias: added to the skip / repeat logit at inference (the budget knob: > 0 skips more).
    allow_repeat: when False, "repeat" is never chosen and refused in explicit plans.
    plan: a static plan (one action per decoder layer) used for every sequence when set.
    """

    num_windows: int = 8
    bottleneck: int = 128
    skip_bias: float = 0.0
    repeat_bias: float = 0.0
    allow_repeat: bool = True
    plan: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.num_windows, int) or self.num_windows < 1:
            raise ValueError(f"num_windows must be a positive integer, got {self.num_windows!r}")
        if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        for name in ("skip_bias", "repeat_bias"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        if self.plan is not None:
            self.plan = validate_plan(self.plan, None, self.allow_repeat)

