from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("skip", "execute", "repeat")
SKIP, EXECUTE, REPEAT = 0, 1, 2


@dataclass
class DrLLMConfig:
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


def validate_plan(plan, num_layers: int | None, allow_repeat: bool = True) -> list[str]:
    """Check one plan (a list of action names or 0/1/2 codes) and return it as action names."""
    if isinstance(plan, str) or not hasattr(plan, "__iter__"):
        raise ValueError(f"a plan is a list of actions {ACTIONS}, one per decoder layer; got {plan!r}")
    out = []
    for i, a in enumerate(plan):
        if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 3:
            a = ACTIONS[a]
        if a not in ACTIONS:
            raise ValueError(f"plan entry {i} is {a!r}; each entry must be one of {ACTIONS}")
        if a == "repeat" and not allow_repeat:
            raise ValueError(f"plan entry {i} is 'repeat' but allow_repeat=False")
        out.append(a)
    if num_layers is not None and len(out) != num_layers:
        raise ValueError(f"the plan has {len(out)} entries but the model has {num_layers} decoder layers")
    return out
