"""Monte Carlo Tree Search over layer plans (Dr.LLM's label search), deciding layer by layer.

Tree: a node is a *prefix* of the plan (the actions of layers ``0..d-1``); the root is the empty prefix. From a
node at depth ``d`` the actions are Dr.LLM's: **execute** layer ``d``, **skip** layer ``d``, **skip two**
consecutive layers ``d, d+1`` (one move), or **repeat** layer ``d``. A node is terminal at depth ``L``.

One simulation: *select* from the root by UCB until a node with untried actions (with probability
``p_random`` a uniformly random child instead of the UCB best), *expand* one untried action (in a seeded random
order), *roll out* the rest of the plan by the default policy (each remaining layer skipped with probability
``rollout_skip``, repeated with ``rollout_repeat``, else executed), *evaluate* the full plan on the real model,
*back up* the reward along the selected path.

UCB of a child ``ch`` of ``parent``: ``Q/v + c * sqrt(ln V / v) - lam * |pi| / L`` with ``Q`` the child's reward
sum, ``v`` its visits, ``V`` the parent's visits and ``|pi|`` the block passes of the child's prefix completed
by executing every remaining layer once (the length of its path). Dr.LLM: ``c = 1.8``, ``lam = 3.0``,
``p_random = 0.1``, 50 simulations per question.

Reward of a plan (binary): ``1`` if it answers the example correctly **and** its block passes are within the
budget, else ``0``. The label is the shortest correct in-budget plan among *all* plans evaluated (tree leaves,
rollouts and the all-execute base plan); ties go to fewer unique layers, then to the plan found first.

Simulations run in rounds of ``batch`` with a virtual loss (visits are counted at selection), so the plans of
one round are evaluated together in one batched, prefix-cached pass (``PlanEvaluator``).

The search only sees plans through ``evaluate(plans) -> list[bool]``, so it is tested with oracles whose best
plan is known by construction.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .evaluator import plan_compute, plan_unique_layers

__all__ = ["MCTSConfig", "SearchResult", "mcts_search", "budget_passes"]

_MOVES = ("execute", "skip", "skip2", "repeat")


@dataclass
class MCTSConfig:
    simulations: int = 50
    c: float = 1.8
    lam: float = 3.0
    p_random: float = 0.1
    batch: int = 8
    rollout_skip: float = 0.1
    rollout_repeat: float = 0.02
    allow_repeat: bool = True
    prune_exhausted: bool = True

    def __post_init__(self):
        if self.simulations < 0:
            raise ValueError("simulations must be >= 0")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        for k in ("p_random", "rollout_skip", "rollout_repeat"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1]")
        if self.rollout_skip + self.rollout_repeat > 1.0:
            raise ValueError("rollout_skip + rollout_repeat must be <= 1")
        if self.c < 0 or self.lam < 0:
            raise ValueError("c and lam must be >= 0")


def budget_passes(budget: float | int | str | None, num_layers: int) -> int:
    """Block passes allowed. A float (or a string with a '.') is a fraction of L (1.0 = the base model's
    compute); an int (or a digit string) is a number of block passes. None = L."""
    if budget is None:
        return num_layers
    if isinstance(budget, str):
        try:
            budget = float(budget) if "." in budget else int(budget)
        except ValueError:
            raise ValueError(f"budget {budget!r}: give a fraction like 0.9 or a number of layers like 27") from None
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    if isinstance(budget, float):
        if budget > 2.0:
            raise ValueError(f"a fractional budget must be <= 2.0 (all layers repeated), got {budget}")
        return int(math.floor(budget * num_layers + 1e-9))
    return int(budget)


class _Node:
    __slots__ = ("prefix", "parent", "children", "untried", "visits", "value", "exhausted")

    def __init__(self, prefix: tuple, parent, untried: list):
        self.prefix = prefix
        self.parent = parent
        self.children: list[_Node] = []
        self.untried = untried
        self.visits = 0
        self.value = 0.0
        self.exhausted = False


@dataclass
class SearchResult:
    plan: tuple[str, ...]
    found: bool  # a correct in-budget plan was found
    reward: float
    compute: int
    base_correct: bool
    simulations: int
    configs: int  # distinct plans evaluated
    seconds: float

    def to_dict(self):
        d = asdict(self)
        d["plan"] = list(self.plan)
        return d


def _moves(depth: int, L: int, allow_repeat: bool) -> list[str]:
    out = ["execute", "skip"]
    if depth + 1 < L:
        out.append("skip2")
    if allow_repeat:
        out.append("repeat")
    return out


def _apply(prefix: tuple, move: str) -> tuple:
    if move == "skip2":
        return prefix + ("skip", "skip")
    return prefix + (move,)


def mcts_search(evaluate: Callable[[list[tuple]], list[bool]], num_layers: int, cfg: MCTSConfig,
                rng: random.Random, budget: int | None = None) -> SearchResult:
    """Search the plan space of an L-layer model; ``evaluate`` answers whether each plan is correct."""
    t0 = time.perf_counter()
    L = num_layers
    budget = L if budget is None else budget
    seen: dict[tuple, bool] = {}
    order: dict[tuple, int] = {}
    best: list = [None]

    def score(plans: list[tuple]) -> list[float]:
        new = [p for p in dict.fromkeys(plans) if p not in seen]
        if new:
            for p, ok in zip(new, evaluate(new)):
                seen[p] = bool(ok)
                order[p] = len(order)
                if ok and plan_compute(p) <= budget:
                    key = (plan_compute(p), plan_unique_layers(p), order[p])
                    if best[0] is None or key < best[0][0]:
                        best[0] = (key, p)
        return [1.0 if seen[p] and plan_compute(p) <= budget else 0.0 for p in plans]

    base = tuple(["execute"] * L)
    score([base])
    base_correct = seen[base]

    def new_node(prefix, parent):
        untried = _moves(len(prefix), L, cfg.allow_repeat) if len(prefix) < L else []
        rng.shuffle(untried)
        return _Node(prefix, parent, untried)

    root = new_node((), None)

    def ucb(ch: _Node, parent_visits: int) -> float:
        if ch.visits == 0:
            return math.inf
        length = plan_compute(ch.prefix) + (L - len(ch.prefix))
        return (ch.value / ch.visits + cfg.c * math.sqrt(math.log(max(parent_visits, 1)) / ch.visits)
                - cfg.lam * length / L)

    def rollout(prefix: tuple) -> tuple:
        rest = []
        for _ in range(L - len(prefix)):
            u = rng.random()
            if u < cfg.rollout_skip:
                rest.append("skip")
            elif u < cfg.rollout_skip + cfg.rollout_repeat and cfg.allow_repeat:
                rest.append("repeat")
            else:
                rest.append("execute")
        return prefix + tuple(rest)

    done = 0
    while done < cfg.simulations and not root.exhausted:
        n = min(cfg.batch, cfg.simulations - done)
        paths, plans = [], []
        for _ in range(n):
            if root.exhausted:  # every plan of the tree has been evaluated
                break
            node = root
            path = [node]
            while not node.untried and node.children:
                live = [ch for ch in node.children if not ch.exhausted] if cfg.prune_exhausted else node.children
                if rng.random() < cfg.p_random:
                    node = live[rng.randrange(len(live))]
                else:
                    V = node.visits
                    node = max(live, key=lambda ch: ucb(ch, V))
                path.append(node)
            if node.untried:
                move = node.untried.pop()
                child = new_node(_apply(node.prefix, move), node)
                node.children.append(child)
                node = child
                path.append(node)
            if cfg.prune_exhausted and len(node.prefix) == L:
                # a complete plan is deterministic: once evaluated, visiting it again teaches nothing
                nd = node
                while nd is not None and not nd.untried and all(ch.exhausted for ch in nd.children):
                    nd.exhausted = True
                    nd = nd.parent
            for nd in path:  # virtual loss: count the visit now, add the reward after evaluation
                nd.visits += 1
            paths.append(path)
            plans.append(rollout(node.prefix))
        rewards = score(plans)
        for path, r in zip(paths, rewards):
            for nd in path:
                nd.value += r
        done += len(paths)

    if best[0] is not None:
        plan, found = best[0][1], True
    else:
        plan, found = base, False
    reward = 1.0 if found else 0.0
    return SearchResult(plan=plan, found=found, reward=reward, compute=plan_compute(plan),
                        base_correct=base_correct, simulations=done, configs=len(seen),
                        seconds=time.perf_counter() - t0)
