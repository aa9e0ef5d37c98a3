"""Training Dr.LLM routers on searched plans (teacher forcing, focal loss with class-balanced weights).

As in the paper: only the routers train; the blocks run by the label plan while the features are collected
(teacher forcing), so each example's window means are computed once and the routers train on them without
running the model again. Loss: focal loss (gamma 2) with class weights from effective numbers (beta 0.999);
AdamW lr 1e-3, weight decay 0.01, cosine schedule with warm-up, batch 16, up to 25 epochs. Departure: the
warm-up is min(500, 10% of all steps), since our searches have hundreds, not thousands, of examples; a
validation split with early stopping on its loss is added.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from retrofit.core.data import read_searches  # noqa: F401  (public here too)
from retrofit.core.plans import ACTIONS


TARGETS = ("shortest", "soft", "safety", "task")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    epochs: int = 25
    warmup_steps: int = 500
    gamma: float = 2.0
    beta: float = 0.999
    val_fraction: float = 0.1
    patience: int = 5
    seed: int = 0
    only_correct: bool = True  # drop examples whose search found no correct plan (as the paper does)
    # "shortest": the label is the search's shortest rewarded plan (the paper). "soft": each layer's target is the
    # share of the search's rewarded plans taking each action (records of `retrofit search` keep them all), so a
    # layer that only one of several good plans skips is not taught as "skip". "safety": each layer's skip target
    # is how often the search's plans that skip it were rewarded (see `safety_targets`). "task": no gradient
    # training; each router becomes a gate between per-task centres (`task_gate_routers`): the routers read which
    # kind of input they see (a multiple-choice question, running text, ...) and skip that kind's safest layers
    # (`task_orders`), not a per-question choice, which the prompt does not predict on SmolLM2 (docs/drllm.md)
    target: str = "shortest"
    # questions whose search found no rewarded plan: "drop" (the paper) or "execute" (taught the all-execute plan,
    # so the routers also see the questions on which skipping fails)
    unlabeled: str = "drop"
    # after training, each router's logits are pulled toward their mean over the training examples:
    # logits = mean + shrink * (logits - mean). 1.0 keeps the trained routers (the paper); 0.0 leaves the static
    # plan the routers' mean logits choose at each skip_bias. Where the labels' per-question signal is weak
    # (two seeds' labels agree per layer barely above chance on SmolLM2), a small value keeps the layers the
    # labels mostly skip and lets the routers decide per question only near the threshold. See docs/drllm.md.
    shrink: float = 1.0
    # what the shrink pulls toward: "routers" (the routers' own mean logits) or "labels" (per layer logits from the
    # search labels' skip and repeat shares, `label_center`: at shrink 0 the routers then skip the layers the
    # labels skip most, the labels' voted static plan, whatever the budget)
    center: str = "routers"
    # when set, the artifact's default skip_bias is chosen so that the routers execute this share of the block
    # passes on the training prompts (features under the all-execute plan; exact for shrink 0, an estimate
    # otherwise: ``stats()`` reports the realised share). None keeps skip_bias 0 (the paper).
    layer_fraction: float | None = None
    # target="task" with repeat probes (`retrofit search-repeats`): a task's centre repeats a layer whose single
    # repeat raised the probed questions' accuracy by more than repeat_z paired standard errors (and their gold
    # probability), at most max_repeats layers per task (`retrofit.core.repeat_probe.repeat_layers`)
    repeat_z: float = 3.0
    max_repeats: int = 1

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}: use one of {TARGETS} ('shortest' is the paper's)")
        if self.center not in ("routers", "labels"):
            raise ValueError(f"center={self.center!r}: use 'routers' (their own mean logits) or 'labels' (the "
                             "labels' action shares)")
        if self.unlabeled not in ("drop", "execute"):
            raise ValueError(f"unlabeled={self.unlabeled!r}: use 'drop' (the paper) or 'execute'")
        checks = {
            "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1, "warmup_steps": self.warmup_steps >= 0, "gamma": self.gamma >= 0,
            "beta": 0 <= self.beta < 1, "val_fraction": 0 <= self.val_fraction < 1, "patience": self.patience >= 1,
            "shrink": 0 <= self.shrink <= 1,
            "layer_fraction": self.layer_fraction is None or 0 < self.layer_fraction <= 2,
            "repeat_z": self.repeat_z >= 0, "max_repeats": self.max_repeats >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training option(s) {bad}: {asdict(self)}")


def class_weights(counts: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Class-balanced weights from effective numbers (Cui et al. 2019): w_c ∝ (1 - β) / (1 - β^n_c),
    normalised to sum to the number of classes present; absent classes get weight 0."""
    counts = counts.to(torch.float64)
    present = counts > 0
    eff = torch.where(present, (1 - beta ** counts) / (1 - beta), torch.ones_like(counts))
    w = torch.where(present, 1.0 / eff, torch.zeros_like(counts))
    w = w * present.sum() / w.sum()
    return w.to(torch.float32)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
               gamma: float = 2.0) -> torch.Tensor:
    """Mean over items of -w_y (1 - p_y)^gamma log p_y. logits [N, C], target [N] class indices, or [N, C]
    target distributions (then -sum_c t_c w_c (1 - p_c)^gamma log p_c)."""
    logp_all = torch.log_softmax(logits.float(), -1)
    if target.is_floating_point():
        t = target.float()
        loss = -(t * (1 - logp_all.exp()) ** gamma * logp_all)
        if weight is not None:
            loss = loss * weight.to(loss.device)
        return loss.sum(-1).mean()
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        loss = loss * weight.to(loss.device)[target]
    return loss.mean()


def safety_targets(record: dict, L: int, strength: float = 2.0) -> torch.Tensor:
    """[L, 3] targets (skip, execute, repeat) = (s_l, 1 - s_l, 0), where s_l estimates how safe skipping layer l is
    for this question: the share of the search's evaluated plans that skip l and are rewarded (a rewarded plan is
    one of ``good_plans``), shrunk toward the question's overall share of rewarded edited plans with the weight of
    ``strength`` plans. The shortest plan (the paper's label) says which layers one lucky plan skipped; this says,
    for every layer, how often skipping it kept the answer. A record without an ``evaluated`` list (or with no
    rewarded plan) is taught its own plan."""
    ev = record.get("evaluated") or []
    good = set(record.get("good_plans") or [])
    base = "e" * L
    edited = [p for p, *_ in ev if p != base]
    if not good or not edited:
        idx = torch.tensor([ACTIONS.index(a) for a in record["plan"]])
        return torch.nn.functional.one_hot(idx, 3).float()
    if any(len(p) != L for p in edited):
        raise ValueError(f"record {record.get('id')!r}: evaluated plans do not have {L} layers")
    m = sum(p in good for p in edited) / len(edited)
    out = torch.zeros(L, 3)
    for i in range(L):
        tried = [p for p in edited if p[i] == "s"]
        s_i = (sum(p in good for p in tried) + strength * m) / (len(tried) + strength)
        out[i, 0], out[i, 1] = s_i, 1 - s_i
    return out


def task_orders(records: list[dict], L: int) -> dict[str, list[int]]:
    """Per task (``record["task"]``), its layers from the safest to skip to the least safe. Text records
    (:mod:`retrofit.search.lm`, with ``layer_loss_increase``) rank the layers by their mean loss increase; search
    records by the share of their labels (``plan``) that skip the layer, ties toward the lower layer, as
    :func:`label_center` (the labels' voted order). A task mixing both kinds is refused."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get("task", "default")), []).append(r)
    orders = {}
    for task, recs in groups.items():
        lm = [r for r in recs if "layer_loss_increase" in r]
        if lm and len(lm) != len(recs):
            raise ValueError(f"task {task!r} mixes text records (layer_loss_increase) and search records; give "
                             "the text records a task name of their own")
        if lm:
            inc = torch.tensor([r["layer_loss_increase"] for r in lm], dtype=torch.float64)
            if inc.shape[1] != L:
                raise ValueError(f"task {task!r}: text records hold {inc.shape[1]} layers, the model {L}")
            key = inc.mean(0)
        else:
            key = -label_center(recs, L)[:, 0].double()  # log skip share, minus 1e-4 per layer: ties -> lower
        orders[task] = sorted(range(L), key=lambda i: (float(key[i]), i))
    return orders


def task_centers(records: list[dict], L: int, repeats: dict[str, list[int]] | None = None
                 ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(task names, centre logits [K, L, 3], the task of every record [N]). A task's centre ranks its layers
    (:func:`task_orders`): skip logit ``-rank``, execute 0, repeat ``-L``, so at ``skip_bias`` b a router that
    reads the centre skips exactly the task's ``ceil(b)`` safest layers (b in (k - 1, k] skips k), the same
    count in every task. ``repeats`` names, per task, layers to run twice (:func:`retrofit.core.repeat_probe.
    repeat_layers`): their repeat logit is ``L / 2``, so they are repeated at every ``repeat_bias`` above
    ``-L / 2`` and every budget short of ``skip_bias`` > rank + L / 2, and a router whose windows read partly
    as another task (a gate average) keeps the repeat unless a third of them do. The most frequent task comes
    first (the routers' reference, see
    :func:`task_gate_routers`)."""
    orders = task_orders(records, L)
    unknown = sorted(set(repeats or {}) - set(orders))
    if unknown:
        raise ValueError(f"repeat layers for task(s) {unknown}, which no training record has (tasks: "
                         f"{sorted(orders)}); probe the tasks the routers are trained on")
    counts: dict[str, int] = {}
    for r in records:
        t = str(r.get("task", "default"))
        counts[t] = counts.get(t, 0) + 1
    names = sorted(orders, key=lambda t: (-counts[t], t))
    centers = torch.zeros(len(names), L, 3)
    for k, t in enumerate(names):
        for rank, layer in enumerate(orders[t]):
            centers[k, layer, 0] = -float(rank)
        centers[k, :, 2] = -float(L)
        for layer in (repeats or {}).get(t, []):
            if not 0 <= layer < L:
                raise ValueError(f"task {t!r}: repeat layer {layer} outside the model's {L} layers")
            centers[k, layer, 2] = L / 2
    idx = torch.tensor([names.index(str(r.get("task", "default"))) for r in records])
    return names, centers, idx


def _low_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q)``, also past its 16M-element limit (then the k-th smallest value, k = ceil(q n))."""
    if x.numel() <= 1 << 24:
        return torch.quantile(x, q)
    return x.flatten().kthvalue(max(1, math.ceil(q * x.numel()))).values


@torch.no_grad()
def task_gate_routers(routers, features: torch.Tensor, valid: torch.Tensor, task_idx: torch.Tensor,
                      centers: torch.Tensor, l2: float = 1e-3, steps: int = 200, margin: float = 12.0,
                      val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Set every router, in place, to the centre of the task its input looks like.

    Router i becomes ``c_0 + sum_k (c_k - c_0) g_k(x)`` with ``c_k`` the task centres [K, L, 3]
    (:func:`task_centers`; task 0 the reference) and ``g_k`` a gate in (0, 1): a one-vs-rest logistic regression
    (L2 ``l2``, balanced classes, on the window means of the layer's input) scaled so that 99 % of the
    training windows lie ``margin`` logits or more from its boundary, passed through ``GELU(z + 1) - GELU(z)``, a smooth step from 0 to 1 that two fc1 units make; fc2
    holds the centre differences. A window's gate is averaged over the valid windows like every router's hidden
    units. An input classified with confidence therefore gets its task's centre exactly, whatever the budget;
    the classifiers' accuracy on held-out records (``val_fraction`` of each task) is reported per layer.
    Needs a bottleneck of at least 2 (K - 1) units; the other units are zeroed."""
    F = torch.nn.functional
    K = centers.shape[0]
    b = routers[0].fc1.out_features
    if 2 * (K - 1) > b:
        raise ValueError(f"{K} tasks need a router bottleneck of at least {2 * (K - 1)}, the routers have {b}")
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(task_idx), dtype=torch.bool)
    for k in range(K):  # the same share of every task is held out
        ids = (task_idx == k).nonzero().flatten()
        ids = ids[torch.randperm(len(ids), generator=g)]
        held[ids[:int(round(len(ids) * val_fraction))] if len(ids) >= 10 else ids[:0]] = True
    report = {"val_accuracy": [], "train_accuracy": []}
    held = held.to(task_idx.device)
    for i, r in enumerate(routers.router):
        X = features[:, i].float()  # [N, W, d]
        V = valid[:, i]
        window_task = task_idx.unsqueeze(1).expand_as(V)
        train_rows = V & ~held.unsqueeze(1)  # the training windows
        x = X[train_rows]
        mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
        xs = (x - mu) / sd
        w1 = torch.zeros_like(r.fc1.weight)
        b1 = torch.zeros_like(r.fc1.bias)
        w2 = torch.zeros_like(r.fc2.weight)
        accs_tr, accs_va = [], []
        for k in range(1, K):
            y = (window_task[train_rows] == k).float()
            w = torch.zeros(x.shape[1], requires_grad=True)
            c = torch.zeros(1, requires_grad=True)
            pos = y.mean().clamp(1e-3, 1 - 1e-3)
            wt = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
            opt = torch.optim.LBFGS([w, c], max_iter=steps, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                with torch.enable_grad():
                    z = xs @ w + c
                    loss = (F.binary_cross_entropy_with_logits(z, y, weight=wt) + l2 * (w * w).sum())
                    loss.backward()
                return loss
            with torch.enable_grad():
                opt.step(closure)
            w, c = w.detach() / sd, c.detach() - (w.detach() / sd) @ mu  # back to raw features
            z = x @ w + c
            # scale so that the training windows' logits clear the step: |z| >= margin for 99 % of them. GELU dips
            # below 0 on (-4, 0), so a window a few logits on the "no" side would still nudge the logits: far
            # enough out, GELU(z + 1) - GELU(z) is 0 to 1e-30
            q = _low_quantile(z.abs(), 0.01).clamp(min=1e-3)
            scale = margin / float(q)
            w, c = w * scale, c * scale
            u = 2 * (k - 1)
            w1[u], b1[u] = w, c + 1.0
            w1[u + 1], b1[u + 1] = w, c
            diff = centers[k, i] - centers[0, i]
            w2[:, u], w2[:, u + 1] = diff, -diff

            def acc(mask):
                rows = V & mask.unsqueeze(1)
                if not bool(rows.any()):
                    return None
                return float((((X[rows] @ w + c) > 0) == (window_task[rows] == k)).float().mean())
            accs_tr.append(acc(~held))
            accs_va.append(acc(held))
        r.fc1.weight.copy_(w1)
        r.fc1.bias.copy_(b1)
        r.fc2.weight.copy_(w2)
        r.fc2.bias.copy_(centers[0, i])
        report["train_accuracy"].append(min((a for a in accs_tr if a is not None), default=None))
        report["val_accuracy"].append(min((a for a in accs_va if a is not None), default=None))
    return report


def soft_targets(record: dict, L: int) -> torch.Tensor:
    """[L, 3] share of a search record's rewarded plans (``good_plans``, letter strings) taking each action; the
    record's own plan when it keeps none."""
    plans = [[{"s": 0, "e": 1, "r": 2}[c] for c in p] for p in record.get("good_plans") or []]
    if not plans:
        plans = [[ACTIONS.index(a) for a in record["plan"]]]
    idx = torch.tensor(plans)
    if idx.shape[1] != L:
        raise ValueError(f"record {record.get('id')!r}: good plans have {idx.shape[1]} layers, the model {L}")
    return torch.nn.functional.one_hot(idx, 3).float().mean(0)


@torch.no_grad()
def collect(handle, tokenizer, records, progress: bool = True):
    """Teacher-forced window means per example: features [N, L, W, d], valid [N, L, W], labels [N, L]."""
    from tqdm.auto import tqdm

    feats, valids, labels = [], [], []
    for r in tqdm(records, desc="features (teacher forcing)", disable=not progress):
        ids = tokenizer(r["prompt"], return_tensors="pt").input_ids.to(handle.model.device)
        f, v = handle.collect_features(ids, plan=r["plan"])
        feats.append(f[0])
        valids.append(v[0])
        labels.append(torch.tensor([ACTIONS.index(a) for a in r["plan"]]))
    return torch.stack(feats), torch.stack(valids), torch.stack(labels)


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed (other settings or data, or a damaged file)."""


def _checkpoint_key(cfg: "TrainConfig", features, valid, labels) -> dict:
    from retrofit.artifacts import tensor_digest

    return {"config": asdict(cfg), "features": tensor_digest(features), "valid": tensor_digest(valid.float()),
            "labels": tensor_digest(labels.float()), "shape": list(features.shape)}


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint


def _load_checkpoint(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say so, never train from half a state
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {e}); delete it or pass "
                              "--no-resume to start over") from None
    if state.get("key") != key:
        raise CheckpointError(f"{path} is a checkpoint of another training run (other settings, search files or "
                              "model); resume with the same command, or pass --no-resume to start over "
                              "(the checkpoint is replaced)")
    return state


def train_routers(handle, features, valid, labels, cfg: TrainConfig, progress: bool = True,
                  checkpoint: str | Path | None = None, stop_after: int | None = None,
                  center: torch.Tensor | None = None) -> dict:
    """Train ``handle.routers`` in place on collected features. Returns the training report.

    ``center`` [L, 3]: the logits that ``cfg.shrink`` pulls toward instead of the routers' own mean.

    ``checkpoint``: a file written after every epoch (routers, best routers so far, optimizer, schedule, RNG
    states, history; atomically). If it exists, training resumes after its last epoch and ends as an
    uninterrupted run would; a checkpoint of other settings or data is refused (:class:`CheckpointError`).
    ``stop_after`` stops after that many epochs of this call (tests simulate a kill with it)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    N = features.shape[0]
    perm = torch.randperm(N, generator=g)
    n_val = int(round(N * cfg.val_fraction)) if N >= 10 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    if labels.is_floating_point():  # target distributions [N, L, 3]
        counts = labels[tr_idx].reshape(-1, 3).sum(0).round().long().cpu()
    else:
        counts = torch.bincount(labels[tr_idx].flatten().cpu(), minlength=3)
    weight = class_weights(counts, cfg.beta)
    hard = labels.argmax(-1) if labels.is_floating_point() else labels
    if handle.routers is None:
        handle.init_routers(seed=cfg.seed)
    routers = handle.routers.to(features.device).train()
    labels = labels.to(features.device)
    for p in routers.parameters():
        p.requires_grad_(True)
    base_params = [p for p in handle.model.parameters()]
    if any(p.requires_grad for p in base_params):
        raise RuntimeError("the base model must stay frozen during router training, but some of its parameters "
                           "require gradients; attach the routers with retrofit.attach, which freezes it")
    opt = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr_idx) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = min(cfg.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))

    def evaluate(idx):
        if len(idx) == 0:
            return None, None
        routers.eval()
        with torch.no_grad():
            lg = routers(features[idx], valid[idx])
            loss = focal_loss(lg.reshape(-1, 3), _flat(labels[idx]), weight, cfg.gamma).item()
            acc = (lg.argmax(-1) == hard[idx]).float().mean().item()
        routers.train()
        return loss, acc

    history, best, best_state, bad = [], float("inf"), None, 0
    rng = random.Random(cfg.seed)
    start, stopped, interrupted = 0, False, False
    ckpt = Path(checkpoint) if checkpoint is not None else None
    key = _checkpoint_key(cfg, features, valid, labels) if ckpt is not None else None
    state = _load_checkpoint(ckpt, key) if ckpt is not None else None
    if state is not None:
        routers.load_state_dict(state["routers"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        torch.set_rng_state(state["torch_rng"])
        history, best, best_state, bad = state["history"], state["best"], state["best_state"], state["bad"]
        start, stopped = len(history), state["stopped"]
    bar = tqdm(range(start, cfg.epochs if not stopped else start), desc="router training", disable=not progress,
               initial=start, total=cfg.epochs)
    for epoch in bar:
        if stop_after is not None and epoch - start >= stop_after:
            interrupted = True
            break
        order = tr_idx.tolist()
        rng.shuffle(order)
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            b = torch.tensor(order[s:s + cfg.batch_size], device=features.device)
            lg = routers(features[b], valid[b])
            loss = focal_loss(lg.reshape(-1, 3), _flat(labels[b]), weight, cfg.gamma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"router loss became {loss.item()} at epoch {epoch}; lower the lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        tr_loss, tr_acc = evaluate(tr_idx)
        val_loss, val_acc = evaluate(val_idx)
        history.append({"epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc,
                        "val_loss": val_loss, "val_acc": val_acc, "mean_batch_loss": sum(losses) / len(losses)})
        bar.set_postfix(train=f"{tr_loss:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-")
        crit = val_loss if val_loss is not None else tr_loss
        if crit < best - 1e-6:
            best, bad = crit, 0
            best_state = {k: v.detach().clone() for k, v in routers.state_dict().items()}
        else:
            bad += 1
            stopped = bad >= cfg.patience
        if ckpt is not None:
            _save_checkpoint(ckpt, {"key": key, "routers": routers.state_dict(), "opt": opt.state_dict(),
                                    "sched": sched.state_dict(), "rng": list(rng.getstate()),
                                    "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                                    "best_state": best_state, "bad": bad, "stopped": stopped})
        if stopped:
            break
    if interrupted:
        return {"interrupted": True, "history": history, "resumed_from_epoch": start}
    if best_state is not None:
        routers.load_state_dict(best_state)
    routers.eval().requires_grad_(False)
    if cfg.shrink != 1.0 or center is not None:
        shrink_routers(routers, features, valid, cfg.shrink, center)
    calibrated = None
    if cfg.layer_fraction is not None:
        b, reached = calibrate_skip_bias(routers, features, valid, cfg.layer_fraction)
        handle.config.skip_bias = b
        calibrated = {"skip_bias": b, "layer_fraction": reached}
    with torch.no_grad():
        pred = routers(features, valid).argmax(-1)
    return {
        "calibrated": calibrated,
        "config": asdict(cfg),
        "examples": N,
        "train_examples": len(tr_idx),
        "val_examples": n_val,
        "label_counts": {a: int(c) for a, c in zip(ACTIONS, torch.bincount(hard.flatten().cpu(), minlength=3))},
        "class_weights": weight.tolist(),
        "history": history,
        "resumed_from_epoch": start,
        "best_epoch": min(range(len(history)), key=lambda i: (history[i]["val_loss"] if history[i]["val_loss"]
                                                             is not None else history[i]["train_loss"])),
        "predicted_layer_fraction": float(((pred == 1).sum() + 2 * (pred == 2).sum()) / pred.numel()),
        "label_layer_fraction": float(((hard == 1).sum() + 2 * (hard == 2).sum()) / hard.numel()),
    }


@torch.no_grad()
def shrink_routers(routers, features: torch.Tensor, valid: torch.Tensor, alpha: float,
                   center: torch.Tensor | None = None) -> torch.Tensor:
    """Pull every router's logits toward their mean over ``features`` [N, L, W, d] (``valid`` [N, L, W]), in place:
    logits' = mean + alpha * (logits - mean), exactly, because fc2 is linear in the window-averaged hidden units:
    fc2.weight <- alpha * fc2.weight, fc2.bias <- fc2.bias + (1 - alpha) * fc2.weight @ mean hidden. With
    ``center`` [L, 3], the mean is moved there too: logits' = center + alpha * (logits - mean). Returns the
    routers' mean logits [L, 3] before the shrink."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"shrink must lie in [0, 1], got {alpha!r}")
    F = nn.functional
    means = []
    for i, r in enumerate(routers.router):
        hid = F.gelu(F.linear(features[:, i].float(), r.fc1.weight, r.fc1.bias), approximate="tanh")  # [N, W, b]
        v = valid[:, i].to(hid.dtype).unsqueeze(-1)
        hbar = ((hid * v).sum(1) / v.sum(1).clamp(min=1)).mean(0)
        mean_logit = r.fc2.weight @ hbar + r.fc2.bias
        r.fc2.bias.add_((1 - alpha) * (r.fc2.weight @ hbar))
        r.fc2.weight.mul_(alpha)
        if center is not None:
            r.fc2.bias.add_(center[i].to(r.fc2.bias) - mean_logit)
        means.append(mean_logit)
    return torch.stack(means)


@torch.no_grad()
def label_center(records: list[dict], L: int) -> torch.Tensor:
    """[L, 3] centre logits from the labels' (``plan``) action shares per layer, Laplace-smoothed:
    (log s, log(1 - s), log r) for skip share s and repeat share r. Skip beats execute where
    logit(s) + skip_bias > 0, so at shrink 0 every skip_bias skips the layers with the highest skip share, the
    labels' voted plan (:func:`retrofit.search.diagnostics.voted_plan`); with the execute share itself as the
    second logit, a layer whose labels often *repeat* it would be skipped before layers the labels skip more.
    Ties in the skip share are broken toward the lower layer (1e-4 per layer)."""
    counts = torch.ones(L, 3)
    for r in records:
        for i, a in enumerate(r["plan"]):
            counts[i, ACTIONS.index(a)] += 1
    share = counts / counts.sum(-1, keepdim=True)
    c = torch.stack([share[:, 0].log(), (1 - share[:, 0]).log(), share[:, 2].log()], -1)
    # break ties between layers as voted_plan does (the lower layer first), so that every budget k is reachable
    # with one skip_bias: without it two layers with equal shares cross the threshold together
    c[:, 0] -= 1e-4 * torch.arange(L, dtype=c.dtype)
    return c


def passes_fraction(actions: torch.Tensor) -> float:
    """Share of the block passes that actions (0 skip, 1 execute, 2 repeat) run: repeat counts 2."""
    return (int((actions == 1).sum()) + 2 * int((actions == 2).sum())) / actions.numel()


@torch.no_grad()
def calibrate_skip_bias(routers, features: torch.Tensor, valid: torch.Tensor, layer_fraction: float,
                        repeat_bias: float = 0.0, logits: torch.Tensor | None = None) -> tuple[float, float]:
    """A skip_bias at which the routers execute ``layer_fraction`` of the block passes on ``features``, or the
    nearest share above it. The decisions change only at a few biases; of the interval of biases that all give
    the share reached, the middle is returned, as far as can be from the decisions of both neighbours (routers
    whose skip logits are a layer order one apart, as task routers', get k - 0.5 for k skips). ``logits``: the
    routers' logits on ``features`` when already computed. Returns (skip_bias, the share reached there)."""
    if logits is None:
        logits = routers(features, valid)  # [N, L, 3]

    def share(b: float) -> float:
        return passes_fraction((logits + torch.tensor([b, 0.0, repeat_bias], device=logits.device)).argmax(-1))

    lo, hi = -50.0, 50.0  # share(lo) >= share(hi)
    if share(hi) > layer_fraction or share(lo) < layer_fraction:
        raise ValueError(f"the routers cannot reach a layer fraction of {layer_fraction} with any skip_bias "
                         f"(from {share(hi):.3f} to {share(lo):.3f}); choose a value in that range")
    for _ in range(60):
        mid = (lo + hi) / 2
        if share(mid) >= layer_fraction:
            lo = mid
        else:
            hi = mid
    reached = share(lo)
    if share(-50.0) == reached:  # the plateau reaches the bottom of the range: one logit inside it
        return lo - 1.0, reached
    a, c = -50.0, lo  # share(a) > reached == share(c): where the plateau begins
    for _ in range(60):
        mid = (a + c) / 2
        if share(mid) > reached:
            a = mid
        else:
            c = mid
    return (c + lo) / 2, reached


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 3) if t.is_floating_point() else t.reshape(-1)


CHECKPOINT_NAME = "training_checkpoint.pt"


def train_from_searches(model, tokenizer, search_files, out_dir, cfg: TrainConfig | None = None,
                        num_windows: int = 8, bottleneck: int = 128, progress: bool = True, resume: bool = True,
                        stop_after: int | None = None, repeat_probes=()) -> dict:
    """Search JSONL -> trained router artifact in ``out_dir`` (+ ``training_report.json``). Returns the report.
    ``repeat_probes``: files of `retrofit search-repeats` (``target="task"`` only): the layers each task gains
    from repeating are repeated in its centre.

    Every epoch is checkpointed to ``out_dir/training_checkpoint.pt`` (removed once the artifact is saved); a
    killed run started again with the same settings (``resume``) continues after its last epoch, with the same
    result as an uninterrupted run (the features are collected again). ``resume=False`` starts over."""
    import retrofit
    from retrofit.artifacts import fingerprint
    from retrofit.core.repeat_probe import read_probe

    cfg = cfg or TrainConfig()
    if repeat_probes and cfg.target != "task":
        raise ValueError(f"repeat probes are read by target='task' only (this run: target={cfg.target!r})")
    probes = [r for p in repeat_probes for r in read_probe(p)]
    records = read_searches(search_files)
    if cfg.unlabeled == "execute":
        kept = [r if r.get("found", r.get("correct", True)) else
                {**r, "plan": ["execute"] * len(r["plan"]), "good_plans": []} for r in records]
    elif cfg.only_correct:
        kept = [r for r in records if r.get("found", r.get("correct", True))]
    else:
        kept = records
    if not kept:
        raise ValueError(f"no usable examples in {list(map(str, search_files))} (none has a correct plan)")
    before = fingerprint(model)
    handle = retrofit.attach(model, "drllm", num_windows=num_windows, bottleneck=bottleneck)
    try:
        # teacher forcing: the blocks run by the label plan (the paper); safety targets are per-layer marginals over
        # many plans, not one plan's decisions, so their features are read under the all-execute plan
        forced = kept if cfg.target not in ("safety", "task") else [
            {**r, "plan": ["execute"] * len(r["plan"])} for r in kept]
        feats, valid, labels = collect(handle, tokenizer, forced, progress)
        if labels.shape[1] != handle.num_layers:
            raise ValueError(f"the searched plans have {labels.shape[1]} layers, the model {handle.num_layers}")
        if cfg.target == "task":
            report = _train_task_gate(handle, feats, valid, kept, cfg, probes)
            report["repeat_probes"] = [str(p) for p in repeat_probes]
        else:
            if cfg.target != "shortest":
                fn = soft_targets if cfg.target == "soft" else safety_targets
                labels = torch.stack([fn(r, handle.num_layers) for r in kept]).to(labels.device)
            ckpt = Path(out_dir) / CHECKPOINT_NAME
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            if not resume:
                ckpt.unlink(missing_ok=True)
            center = label_center(kept, handle.num_layers) if cfg.center == "labels" else None
            report = train_routers(handle, feats, valid, labels, cfg, progress, checkpoint=ckpt,
                                   stop_after=stop_after, center=center)
            if report.get("interrupted"):
                return report  # stopped on purpose (a simulated kill): the checkpoint stays, nothing saved
        report["search_files"] = [str(p) for p in search_files]
        report["records_read"] = len(records)
        handle.save(out_dir)
        (Path(out_dir) / CHECKPOINT_NAME).unlink(missing_ok=True)
    finally:
        handle.detach()
    if fingerprint(model) != before:
        raise RuntimeError("the base model's weights changed during router training; nothing was saved over them, "
                           "but the model object is no longer the base model: reload it")
    Path(out_dir, "training_report.json").write_text(json.dumps(report, indent=2))
    return report


def _train_task_gate(handle, feats, valid, records, cfg: TrainConfig, probes: list[dict] | None = None) -> dict:
    """``target="task"``: routers built in closed form (:func:`task_gate_routers`), then calibrated. ``probes``:
    repeat-probe records (:mod:`retrofit.core.repeat_probe`), whose layers each task's centre repeats."""
    from retrofit.core.repeat_probe import repeat_layers

    rep = repeat_layers(probes, handle.num_layers, z=cfg.repeat_z, max_repeats=cfg.max_repeats) if probes else {}
    names, centers, idx = task_centers(records, handle.num_layers, {t: v["layers"] for t, v in rep.items()})
    if handle.routers is None:
        handle.init_routers(seed=cfg.seed)
    routers = handle.routers.to(feats.device).eval().requires_grad_(False)
    gate = task_gate_routers(routers, feats, valid, idx.to(feats.device), centers.to(feats.device),
                             val_fraction=cfg.val_fraction, seed=cfg.seed)
    with torch.no_grad():
        raw = routers(feats, valid)
    calibrated = None
    if cfg.layer_fraction is not None:
        b, reached = calibrate_skip_bias(routers, feats, valid, cfg.layer_fraction, logits=raw)
        handle.config.skip_bias = b
        calibrated = {"skip_bias": b, "layer_fraction": reached}
    bias = torch.tensor([handle.config.skip_bias, 0.0, 0.0])
    pred = (raw + bias.to(raw.device)).argmax(-1)
    want = (centers[idx] + bias).argmax(-1).to(pred.device)
    return {
        "calibrated": calibrated, "config": asdict(cfg), "examples": len(records), "tasks": names,
        "task_examples": {t: int((idx == k).sum()) for k, t in enumerate(names)},
        # the centres' skip logits are -rank: the order is theirs, sorted
        "task_orders": {t: centers[k, :, 0].argsort(descending=True, stable=True).tolist()
                        for k, t in enumerate(names)},
        "gate_train_accuracy": gate["train_accuracy"], "gate_val_accuracy": gate["val_accuracy"],
        "plans_equal_task_center": float((pred == want).all(-1).float().mean()),
        "predicted_layer_fraction": passes_fraction(pred), "label_layer_fraction": passes_fraction(want),
        "train_examples": len(records), "val_examples": 0, "history": [], "resumed_from_epoch": 0,
        "repeats": rep,
    }
