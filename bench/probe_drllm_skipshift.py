"""Probe: does a skipped layer lose less when its average update is added back (issue 12)?

Skipping a block replaces ``h + f(h)`` with ``h``. Part of what a block adds is the same for every token (the
mean of ``f(h)`` over text); adding that mean back costs one vector add. A step further is a ridge fit of
``f(h)`` on ``h`` (one d x d product: ~10 % of a SmolLM2 layer). Both are fitted on ARC-Easy **train** prompts
with their gold answers (fit in layer order, earlier replacements in place), position 0 (the attention sink,
whose update is unlike the others') fitted on its own. Plans are scored on ARC-Easy **validation** (never used
to fit): base, the skip plan, the skip plan with mean shifts, the skip plan with linear maps; paired standard
errors against the plain skip plan.

    python bench/probe_drllm_skipshift.py --skips 18,19,20 --fit-limit 400 \
        --out bench/results/drllm_skipshift_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from retrofit.arch import get_adapter
from retrofit.core.data import load_task
from retrofit.models import load_model
from retrofit.search.evaluator import PlanEvaluator


class Replaced(nn.Module):
    """Stands in for a skipped block: ``h + delta`` (mean shift) or ``h + (h - mu) W + delta`` (linear)."""

    def __init__(self, delta, delta0, W=None, mu=None, W0=None, mu0=None):
        super().__init__()
        self.delta, self.delta0, self.W, self.mu, self.W0, self.mu0 = delta, delta0, W, mu, W0, mu0

    def forward(self, h, position_ids=None, **kw):
        out = h + self.delta
        if self.W is not None:
            out = out + (h - self.mu) @ self.W
        sink = (position_ids == 0).reshape(-1) if position_ids is not None else None
        if sink is not None and bool(sink.any()):
            h0 = h[:, sink]
            out0 = h0 + self.delta0
            if self.W0 is not None:
                out0 = out0 + (h0 - self.mu0) @ self.W0
            out[:, sink] = out0
        return out


def ridge(X, Y, lam):
    mu = X.mean(0)
    Xc = X - mu
    A = Xc.T @ Xc + lam * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
    W = torch.linalg.solve(A, Xc.T @ (Y - Y.mean(0)))
    return W, mu, Y.mean(0)


@torch.no_grad()
def fit(model, tok, layers, skips, exs, mode, lam, device):
    """Replacement modules for ``skips``, fitted in order on the gold-answer texts of ``exs``."""
    adapter = get_adapter(model)
    texts = []
    for ex in exs:
        c, x = ex.requests()[ex.gold]
        texts.append(c + x)
    orig = {j: layers[j] for j in skips}
    out = {}
    try:
        for j in skips:
            X, Y = [], []

            def hook(mod, args, kwargs, res):
                h = args[0] if args else kwargs["hidden_states"]
                o = res[0] if isinstance(res, tuple) else res
                X.append(h[0].float().clone())
                Y.append((o[0] - h[0]).float().clone())

            hd = orig[j].register_forward_hook(hook, with_kwargs=True)
            for t in texts:
                ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]], device=device)
                h, kw = adapter.prepare(model, ids)
                for k in range(j + 1):
                    h = adapter.call_layer(layers[k], h, kw)
            hd.remove()
            X0 = torch.stack([x[0] for x in X])
            Y0 = torch.stack([y[0] for y in Y])
            Xr = torch.cat([x[1:] for x in X])
            Yr = torch.cat([y[1:] for y in Y])
            if mode == "shift":
                rep = Replaced(Yr.mean(0), Y0.mean(0))
            else:
                W, mu, d = ridge(Xr, Yr, lam)
                W0, mu0, d0 = ridge(X0, Y0, lam * 10)
                rep = Replaced(d, d0, W, mu, W0, mu0)
            resid = (Yr - rep.delta - ((Xr - rep.mu) @ rep.W if rep.W is not None else 0)).pow(2).sum(1).mean()
            print(f"layer {j} {mode}: tokens {len(Xr)}, |f(h)|^2 {Yr.pow(2).sum(1).mean():.2f}, "
                  f"residual {resid:.2f}, |h|^2 {Xr.pow(2).sum(1).mean():.1f}")
            out[j] = rep
            layers[j] = rep  # later layers are fitted with this one in place
    finally:
        for j in skips:
            layers[j] = orig[j]
    return out


def paired(c, i, j):
    n = len(c)
    a = [float(r[i]) for r in c]
    d = [float(r[i]) - float(r[j]) for r in c]
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)
    return round(sum(a) / n, 4), round(m, 4), round(se, 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skips", default="18,19,20")
    ap.add_argument("--fit-limit", type=int, default=400, help="ARC-Easy train questions to fit on")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--lam", type=float, default=1e-2, help="ridge penalty (times the mean token count)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/drllm_skipshift_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model()
    device = next(model.parameters()).device
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    L = len(layers)
    skips = [int(x) for x in args.skips.split(",")]
    fit_exs = load_task("arc_easy", "train", args.fit_limit)
    reps = {m: fit(model, tok, layers, skips, fit_exs, m, args.lam, device) for m in ("shift", "linear")}
    val = load_task("arc_easy", "validation", args.val_limit)
    base = tuple("execute" for _ in range(L))
    skip = tuple("skip" if i in skips else "execute" for i in range(L))
    orig = {j: layers[j] for j in skips}
    rows = []
    for ex in tqdm(val, desc="validation", mininterval=30):
        ev = PlanEvaluator(model, tok)
        ev.set_example(ex)
        r = [x.correct for x in ev.evaluate([base, skip])]
        for m in ("shift", "linear"):
            for j in skips:
                layers[j] = reps[m][j]
            try:
                ev = PlanEvaluator(model, tok)
                ev.set_example(ex)
                r.append(ev.evaluate([base])[0].correct)
            finally:
                for j in skips:
                    layers[j] = orig[j]
        rows.append(r)
    names = ["base", "skip", "skip_shift", "skip_linear"]
    res = {"model": "SmolLM2-135M-Instruct", "skips": skips, "fit": f"arc_easy train first {len(fit_exs)}",
           "eval": "arc_easy validation", "n": len(rows), "lam": args.lam}
    for i, nm in enumerate(names):
        acc, d, se = paired(rows, i, 1)
        res[nm] = {"acc": acc, "vs_skip": d, "vs_skip_se": se}
    res.update(seconds=round(time.time() - t0, 1), machine=f"x86_64 CPU, {args.threads} threads",
               command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat())
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
