"""Monte Carlo Tree Search over layer plans (Dr.LLM's label search). Two trees, one interface.

``tree="path"`` (the default; Dr.LLM's tree). A node is a *complete* plan; the root is the base plan (every
layer once). A move edits the parent's plan anywhere: **skip** one pass of layer ``i`` (execute -> skip,
repeat -> execute), **skip two** consecutive layers ``i, i+1`` (one pass of each), or **repeat** layer ``i``
(execute -> repeat; only when the result stays within the budget). Every node is evaluated as is, so the
tree stays near the base plan and treats all layers alike. One simulation: *select* from the root by UCB (with
probability ``p_random`` a uniformly random child), stopping at the first node that may take a new child
(progressive widening: a node with ``v`` visits holds at most ``ceil(widen * v ** widen_alpha)`` children) or
has no child; *expand* one of its untried moves (seeded random order); *evaluate* the child's plan; *back up*
its reward. The paper's released code descends to a leaf and never widens a node again, so its "tree" is one
chain of random edits; progressive widening keeps Dr.LLM's moves and UCB but lets the search branch.

``tree="prefix"`` (retrofit's earlier tree, kept as an option). A node is a *prefix* of the plan (the actions
of layers ``0..d-1``), the root the empty prefix; moves: execute / skip / skip two / repeat layer ``d``; the
rest of the plan is a random rollout (``rollout_skip``, ``rollout_repeat``). With 50 simulations over 30
layers it explores the first few layers and leaves the rest to chance (docs/search.md).

UCB of a child ``ch`` of ``parent``: ``Q/v + c * sqrt(ln V / v) - lam * |pi| / L`` with ``Q`` the child's reward
sum, ``v`` its visits, ``V`` the parent's visits and ``|pi|`` the block passes of the child's plan (path tree)
or of its prefix completed by executing every remaining layer once (prefix tree). Dr.LLM: ``c = 1.8``,
``lam = 3.0``, ``p_random = 0.1``, 50 simulations per question.

Reward of a plan: ``1`` if ``evaluate`` calls it correct (``retrofit.search.reward``: by default the gold choice
must win *with confidence*) **and** its block passes are within the budget, else ``0``. The label is the
shortest rewarded plan among *all* plans evaluated; ties go to fewer unique layers, then to the plan found
first. ``SearchResult.good_plans`` keeps every rewarded plan (for label statistics and soft targets).

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

from retrofit.core.plans import ACTIONS, action_passes, plan_passes, plan_unique_layers

__all__ = ["MCTSConfig", "SearchResult", "mcts_search", "budget_passes", "TREES"]

TREES = ("path", "prefix")

_MOVES = ("execute", "skip", "skip2", "repeat")


@dataclass
class MCTSConfig:
    simulations: int = 50
    tree: str = "path"
    c: float = 1.8
    lam: float = 3.0
    p_random: float = 0.1
    batch: int = 8
    rollout_skip: float = 0.1
    rollout_repeat: float = 0.02
    allow_repeat: bool = True
    prune_exhausted: bool = True
    widen: float = 1.0
    widen_alpha: float = 0.7
    move_prior: bool = True

    def __post_init__(self):
        if self.tree not in TREES:
            raise ValueError(f"tree {self.tree!r}: use one of {TREES} ('path' is Dr.LLM's)")
        if not (self.widen > 0 and 0 <= self.widen_alpha <= 1):
            raise ValueError("widen must be > 0 and widen_alpha in [0, 1]")
        if isinstance(self.simulations, bool) or not isinstance(self.simulations, int):
            raise ValueError(f"simulations must be an integer, got {self.simulations!r}")
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
    __slots__ = ("prefix", "parent", "children", "untried", "visits", "value", "exhausted", "move")

    def __init__(self, prefix: tuple, parent, untried: list):
        self.prefix = prefix
        self.parent = parent
        self.children: list[_Node] = []
        self.untried = untried
        self.visits = 0
        self.value = 0.0
        self.exhausted = False
        self.move = None


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
    good_plans: list = None  # every rewarded plan, in the order found

    def to_dict(self):
        d = asdict(self)
        d["plan"] = list(self.plan)
        d["good_plans"] = [list(p) for p in (self.good_plans or [])]
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
    if cfg.tree == "path":
        return _path_search(evaluate, num_layers, cfg, rng, budget)
    return _prefix_search(evaluate, num_layers, cfg, rng, budget)


class _Scorer:
    """Plans -> rewards, each distinct plan evaluated once; tracks the best (shortest) rewarded plan."""

    def __init__(self, evaluate, budget: int):
        self.evaluate, self.budget = evaluate, budget
        self.seen: dict[tuple, bool] = {}  # plan -> correct (before the budget check)
        self.good: list[tuple] = []
        self.best = None

    def reward(self, p: tuple) -> float:
        return 1.0 if self.seen[p] and plan_passes(p) <= self.budget else 0.0

    def __call__(self, plans: list[tuple]) -> list[float]:
        new = [p for p in dict.fromkeys(plans) if p not in self.seen]
        if new:
            for p, ok in zip(new, evaluate_checked(self.evaluate, new)):
                self.seen[p] = bool(ok)
                if self.reward(p):
                    key = (plan_passes(p), plan_unique_layers(p), len(self.good))
                    self.good.append(p)
                    if self.best is None or key < self.best[0]:
                        self.best = (key, p)
        return [self.reward(p) for p in plans]

    def result(self, base, done, t0) -> SearchResult:
        plan, found = (self.best[1], True) if self.best is not None else (base, False)
        return SearchResult(plan=plan, found=found, reward=1.0 if found else 0.0, compute=plan_passes(plan),
                            base_correct=self.seen[base], simulations=done, configs=len(self.seen),
                            seconds=time.perf_counter() - t0, good_plans=list(self.good))


def evaluate_checked(evaluate, plans):
    out = list(evaluate(plans))
    if len(out) != len(plans):
        raise ValueError(f"evaluate() returned {len(out)} answers for {len(plans)} plans")
    return out


def _path_moves(plan: tuple, budget: int, allow_repeat: bool) -> list[tuple]:
    """Dr.LLM's path edits of ``plan`` as (kind, layer): drop one pass of a layer, one pass of each of two
    consecutive layers, or add a second pass to a layer executed once (only within the budget)."""
    L = len(plan)
    n = [action_passes(a) for a in plan]
    out = [("skip", i) for i in range(L) if n[i] > 0]
    out += [("skip2", i) for i in range(L - 1) if n[i] > 0 and n[i + 1] > 0]
    if allow_repeat and plan_passes(plan) + 1 <= budget:
        out += [("repeat", i) for i in range(L) if n[i] == 1]
    return out


def _path_apply(plan: tuple, move: tuple) -> tuple:
    kind, i = move
    n = [action_passes(a) for a in plan]
    if kind == "skip":
        n[i] -= 1
    elif kind == "skip2":
        n[i] -= 1
        n[i + 1] -= 1
    else:
        n[i] += 1
    return tuple(ACTIONS[k] for k in n)


def _path_search(evaluate, L: int, cfg: MCTSConfig, rng: random.Random, budget: int | None) -> SearchResult:
    t0 = time.perf_counter()
    budget = L if budget is None else budget
    score = _Scorer(evaluate, budget)
    base = tuple(["execute"] * L)
    score([base])

    def new_node(plan, parent) -> _Node:
        moves = _path_moves(plan, budget, cfg.allow_repeat)
        rng.shuffle(moves)
        return _Node(plan, parent, moves)

    def may_widen(nd: _Node) -> bool:
        return bool(nd.untried) and len(nd.children) < math.ceil(cfg.widen * max(nd.visits, 1) ** cfg.widen_alpha)

    def ucb(ch: _Node, parent_visits: int) -> float:
        return (ch.value / ch.visits + cfg.c * math.sqrt(math.log(max(parent_visits, 1)) / ch.visits)
                - cfg.lam * plan_passes(ch.prefix) / L)

    def mark_exhausted(nd: _Node):
        while nd is not None and not nd.untried and all(ch.exhausted for ch in nd.children):
            nd.exhausted = True
            nd = nd.parent

    # all-moves-as-first statistics: how often each edit (kind, layer) gave a rewarded child anywhere in this
    # tree. A node expands its untried edit with the best Beta(1, 1) posterior mean (ties in seeded random order):
    # an edit that already worked elsewhere is tried first, one that failed last.
    stats: dict[tuple, list] = {}

    def next_move(nd: _Node) -> tuple:
        if not cfg.move_prior:
            return nd.untried.pop()
        k = max(range(len(nd.untried)), key=lambda j: _posterior(stats.get(nd.untried[j])))
        return nd.untried.pop(k)

    root = new_node(base, None)
    in_tree: set[tuple] = {base}
    done = 0
    while done < cfg.simulations and not root.exhausted:
        paths, plans = [], []
        while len(paths) < min(cfg.batch, cfg.simulations - done) and not root.exhausted:
            node, path = root, [root]
            while not may_widen(node):
                live = [ch for ch in node.children if not ch.exhausted]
                if not live:
                    break
                node = _select_child(node, live, rng, cfg.p_random, ucb)
                path.append(node)
            child = None
            while node.untried:
                move = next_move(node)
                plan = _path_apply(node.prefix, move)
                if plan not in in_tree:  # one node per plan, whatever the order of its edits
                    in_tree.add(plan)
                    child = new_node(plan, node)
                    child.move = move
                    node.children.append(child)
                    break
            if child is None:  # nothing new below this node
                mark_exhausted(node)
                continue
            path.append(child)
            for nd in path:  # virtual loss: count the visit now, add the reward after evaluation
                nd.visits += 1
            paths.append(path)
            plans.append(child.prefix)
        if not paths:
            break
        for path, r in zip(paths, score(plans)):
            for nd in path:
                nd.value += r
            st = stats.setdefault(path[-1].move, [0, 0])
            st[0] += r
            st[1] += 1
        done += len(paths)
    return score.result(base, done, t0)


def _select_child(node: _Node, live: list, rng: random.Random, p_random: float, ucb) -> _Node:
    """With probability ``p_random`` a uniformly random live child (Dr.LLM), else the UCB best."""
    if rng.random() < p_random:
        return live[rng.randrange(len(live))]
    V = node.visits
    return max(live, key=lambda ch: ucb(ch, V))


def _posterior(st) -> float:
    return 0.5 if st is None else (st[0] + 1) / (st[1] + 2)


def _prefix_search(evaluate, num_layers: int, cfg: MCTSConfig, rng: random.Random,
                   budget: int | None) -> SearchResult:
    t0 = time.perf_counter()
    L = num_layers
    budget = L if budget is None else budget
    score = _Scorer(evaluate, budget)
    base = tuple(["execute"] * L)
    score([base])

    def new_node(prefix, parent):
        untried = _moves(len(prefix), L, cfg.allow_repeat) if len(prefix) < L else []
        rng.shuffle(untried)
        return _Node(prefix, parent, untried)

    root = new_node((), None)

    def ucb(ch: _Node, parent_visits: int) -> float:
        if ch.visits == 0:
            return math.inf
        length = plan_passes(ch.prefix) + (L - len(ch.prefix))
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
                node = _select_child(node, live, rng, cfg.p_random, ucb)
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

    return score.result(base, done, t0)
