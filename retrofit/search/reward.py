"""What counts as a *correct* plan for the label search: a reward that a lucky guess cannot earn.

Dr.LLM's reward is binary: the plan's greedy answer is right. On a multiple-choice task where the model is
near chance, a plan that wrecks the model is still right about 1/n of the time, and the label (the shortest
correct plan among ~50) is then usually such a lucky wreck (measured on SmolLM2-135M, docs/search.md).

``RewardRule(kind="confident")`` (the default) accepts a plan only when the gold choice wins **and** the model
is sure of it:

* ``p_gold(plan) >= min_prob``, where ``p_gold`` is the gold choice's probability among the choices, a softmax
  over the choices' summed continuation log-likelihoods (the same numbers lm-eval's ``acc`` takes the argmax
  of), and
* ``p_gold(plan) >= p_gold(base) - max_drop``: not far below the base plan's own confidence in the gold answer;
* and the base plan answers the question correctly (``flips=False``, the default): a plan may keep a right
  answer at lower cost, but it cannot earn the reward by turning a wrong answer right.

Why no flips: on SmolLM2-135M (ARC-Easy train, the first 100 questions, 50 path-tree plans each) 31 % of the
plans that edit 1-4 layers turn a wrong base answer right (25 % would be chance among 4 choices), and such
flipped answers are as "sure" as real ones (median gold probability 0.80; 20 of ~40 wrong questions reach
>= 0.95), because a softmax over summed log-likelihoods is peaked. Confidence cannot tell a lucky flip from a
real one on a model this close to chance; the base plan's own right answer can. The search then skips the
tree on questions the base plan gets wrong (nothing there can be rewarded), which halves its cost.
``flips=True`` gives the permissive rule (a flip counts when it is sure).

``kind="binary"`` is the paper's rule (gold wins). Generative examples (GSM8K) have no choice scores; both
rules use exact match for them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["RewardRule", "gold_probability", "REWARD_KINDS"]

REWARD_KINDS = ("confident", "binary")


def gold_probability(scores, gold: int) -> float:
    """Probability of choice ``gold`` in a softmax over the per-choice log-likelihoods ``scores``."""
    scores = [float(s) for s in scores]
    if not scores or not 0 <= gold < len(scores):
        raise ValueError(f"gold index {gold} outside the {len(scores)} choices")
    if not all(math.isfinite(s) for s in scores):
        raise FloatingPointError(f"non-finite choice log-likelihoods {scores}: the model's outputs are broken")
    m = max(scores)
    z = sum(math.exp(s - m) for s in scores)
    return math.exp(scores[gold] - m) / z


@dataclass(frozen=True)
class RewardRule:
    kind: str = "confident"
    min_prob: float = 0.5
    max_drop: float = 0.1
    flips: bool = False

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"reward kind {self.kind!r}: use one of {REWARD_KINDS}")
        for k in ("min_prob", "max_drop"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"reward {k} must be a number in [0, 1], got {v!r}")
        if not isinstance(self.flips, bool):
            raise ValueError(f"reward flips must be true or false, got {self.flips!r}")

    def searchable(self, base_result) -> bool:
        """Whether any plan can earn the reward on this example (false: the search may skip it)."""
        return self.kind == "binary" or self.flips or base_result.scores is None or bool(base_result.correct)

    def to_dict(self) -> dict:
        return asdict(self)

    def correct(self, result, base_result=None) -> bool:
        """Whether a plan's ``PlanResult`` earns the reward; ``base_result`` is the all-execute plan's result on
        the same example (needed by ``confident`` for multiple-choice examples)."""
        if not result.correct:
            return False
        if self.kind == "binary" or result.scores is None:
            return True
        p = gold_probability(result.scores, result.gold)
        if p < self.min_prob:
            return False
        if base_result is None:
            raise ValueError("the confident reward needs the base plan's result of the same example")
        if not self.searchable(base_result):
            return False
        return p >= gold_probability(base_result.scores, base_result.gold) - self.max_drop
