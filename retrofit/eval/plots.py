"""Plots for ``retrofit eval`` (matplotlib, Agg backend): accuracy against layers executed, and per-layer actions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from retrofit.core.plans import ACTIONS  # noqa: E402


def accuracy_points(runs: list[dict], task: str, metric: str = "acc") -> list[tuple[str, float, float]]:
    """``(run name, mean layers executed, accuracy)`` for each run that has ``task``."""
    pts = []
    for r in runs:
        t = r.get("tasks", {}).get(task)
        if t is None or t.get(metric) is None:
            continue
        pts.append((r["run"], float(t["mean_layers_executed"]), float(t[metric])))
    return pts


def plot_accuracy_vs_layers(runs: list[dict], task: str, out: str | Path, metric: str = "acc") -> Path:
    """One point per run: x = mean layers executed, y = ``metric`` on ``task``; labelled by run name.

    Runs whose names share a prefix before ``_skip_bias`` (Dr.LLM at several budget-knob settings) are joined by a line.
    """
    fig = accuracy_figure(runs, task, metric)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def accuracy_figure(runs: list[dict], task: str, metric: str = "acc"):
    """The figure of :func:`plot_accuracy_vs_layers` (not saved)."""
    pts = accuracy_points(runs, task, metric)
    if not pts:
        raise ValueError(f"no run has results for task {task!r}")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[str, list] = {}
    for name, x, y in pts:
        key = name.split("_skip_bias")[0] if "_skip_bias" in name else name
        groups.setdefault(key, []).append((x, y, name))
    for key, g in groups.items():
        g.sort()
        xs, ys = [p[0] for p in g], [p[1] for p in g]
        if len(g) > 1:
            ax.plot(xs, ys, "-o", label=key)
        else:
            ax.plot(xs, ys, "o", markersize=8, label=key)
        for x, y, name in g:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean decoder layers executed per prompt")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_action_heatmap(action_counts, out: str | Path, title: str = "per-layer actions") -> Path:
    """Heatmap (layers x {skip, execute, repeat}) of the fraction of prompts taking each action."""
    counts = np.asarray(action_counts, dtype=float)
    if counts.ndim != 2 or counts.shape[1] != 3:
        raise ValueError(f"action_counts must be [L, 3] (skip, execute, repeat); got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    L = counts.shape[0]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * L + 1.5), 2.6))
    im = ax.imshow(frac.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(3), ACTIONS)
    ax.set_xticks(range(L), [str(i) for i in range(L)], fontsize=6)
    ax.set_xlabel("decoder layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="fraction of prompts")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_runs(runs: list[dict], out_dir: str | Path, metric: str = "acc") -> list[Path]:
    """Every plot for a set of runs: accuracy vs layers per task, and an action heatmap per (run, task)."""
    out_dir = Path(out_dir)
    written = []
    tasks = sorted({t for r in runs for t in r.get("tasks", {})})
    for task in tasks:
        written.append(plot_accuracy_vs_layers(runs, task, out_dir / f"acc_vs_layers_{task}.png", metric))
        for r in runs:
            t = r["tasks"].get(task)
            if t is not None and t.get("action_counts"):
                written.append(plot_action_heatmap(
                    t["action_counts"], out_dir / f"actions_{r['run']}_{task}.png",
                    title=f"{r['run']} on {task}: mean layers {t['mean_layers_executed']:.2f}"))
    return written
