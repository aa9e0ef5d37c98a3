"""``retrofit search``, ``retrofit search-merge``, ``retrofit search-optuna``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .mcts import MCTSConfig
from .reward import RewardRule

_M, _R = MCTSConfig(), RewardRule()  # the CLI's defaults are the dataclasses' own


def _setup(threads: int):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search(
        task: str = typer.Option(..., help="task name (arc_easy, piqa, ..., gsm8k) or a .jsonl with question/choices/answer"),
        out: Path = typer.Option(..., help="JSONL to append results to (resumes if it exists)"),
        model: str = typer.Option("default", help="'default' (SmolLM2-135M-Instruct) or a local model folder"),
        split: Optional[str] = typer.Option(None, help="data split (default: the task's evaluation split)"),
        limit: Optional[int] = typer.Option(None, help="first N examples only"),
        budget: str = typer.Option("1.0", help="compute budget: a fraction of the layers (0.9) or block passes (27)"),
        simulations: int = typer.Option(_M.simulations, help="MCTS simulations per example (Dr.LLM: 50)"),
        tree: str = typer.Option(_M.tree, help="'path': Dr.LLM's tree of whole plans edited anywhere from the "
                                 "all-execute root; 'prefix': plan prefixes decided from layer 0 down + rollouts"),
        reward: str = typer.Option(_R.kind, help="'confident': the gold choice wins with probability >= "
                                   "--min-prob and at most --max-drop below the base plan's; 'binary': gold wins"),
        min_prob: float = typer.Option(_R.min_prob, help="confident reward: least gold-choice probability among the choices"),
        max_drop: float = typer.Option(_R.max_drop, help="confident reward: largest drop below the base plan's gold probability"),
        flips: bool = typer.Option(_R.flips, help="confident reward: a plan may also earn it by turning the base plan's "
                                   "wrong answer right (off: such flips are mostly luck on a near-chance model)"),
        widen_alpha: float = typer.Option(_M.widen_alpha, help="path tree: a node with v visits holds <= ceil(v ** alpha) children"),
        batch: int = typer.Option(_M.batch, help="simulations evaluated together as one batch"),
        c: float = typer.Option(_M.c, help="UCB exploration constant"),
        lam: float = typer.Option(_M.lam, help="UCB length penalty"),
        p_random: float = typer.Option(_M.p_random, help="probability of a random child during selection"),
        rollout_skip: float = typer.Option(_M.rollout_skip, help="prefix tree's rollout: probability of skipping a layer"),
        rollout_repeat: float = typer.Option(_M.rollout_repeat, help="prefix tree's rollout: probability of repeating a layer"),
        no_repeat: bool = typer.Option(False, help="search skip/execute only"),
        seed: int = typer.Option(0),
        shard: Optional[str] = typer.Option(None, help="i/n: this process takes examples k with k % n == i"),
        max_new_tokens: int = typer.Option(256, help="generative tasks: greedy decoding length"),
        threads: int = typer.Option(1, help="torch CPU threads (1 is fastest on a shared machine)"),
        device: str = typer.Option("cpu"),
        summary_json: Optional[Path] = typer.Option(None, help="also write the summary here"),
        heldout: int = typer.Option(100, help="label diagnostics: score the labels' voted static plan on this many "
                                    "questions of the task's validation split (0: skip)"),
        compare: Optional[Path] = typer.Option(None, help="label diagnostics: another run (other seed) on the same "
                                               "questions, for label agreement"),
        progress: bool = typer.Option(True),
        repair: bool = typer.Option(False, "--repair", help="first drop damaged lines of --out (kept in "
                                    "OUT.dropped); their examples are searched again"),
    ):
        """Per-example MCTS over layer plans (skip / execute / repeat per decoder layer), Dr.LLM style."""
        _setup(threads)
        from retrofit.models import load_model

        from .diagnostics import format_diagnostics, label_diagnostics, save_diagnostics
        from .evaluator import PlanEvaluator
        from .run import format_summary, parse_shard, read_records, search_examples, summarize
        from .tasks import load_task

        try:
            sh = parse_shard(shard)
            if simulations < 1:
                raise ValueError(f"--simulations {simulations}: give at least 1 (Dr.LLM uses 50)")
            cfg = MCTSConfig(simulations=simulations, tree=tree, c=c, lam=lam, p_random=p_random, batch=batch,
                             rollout_skip=rollout_skip, rollout_repeat=rollout_repeat, allow_repeat=not no_repeat,
                             widen_alpha=widen_alpha)
            rule = RewardRule(kind=reward, min_prob=min_prob, max_drop=max_drop, flips=flips)
            examples = load_task(task, split, limit)
            if compare is not None and not compare.is_file():
                raise ValueError(f"--compare {compare}: no such file")
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        m, tok = load_model(model)
        m.to(device)
        ev = PlanEvaluator(m, tok, max_new_tokens=max_new_tokens)
        try:
            recs = search_examples(m, tok, examples, out, cfg=cfg, budget=budget, seed=seed, shard=sh,
                                   progress=progress, task=task, split=split, evaluator=ev, reward=rule,
                                   repair=repair)
        except ValueError as e:  # a results file of another run or of other data: nothing was written
            raise typer.BadParameter(str(e)) from None
        s = summarize(recs)
        typer.echo(format_summary(s))
        held = []
        if heldout > 0 and not Path(task).suffix:
            try:
                held = load_task(task, "validation", heldout)
            except ValueError as e:
                typer.echo(f"label diagnostics: no held-out questions ({e}); voted plan not scored")
        diag = label_diagnostics(recs, ev, held, read_records(compare) if compare else None)
        files = save_diagnostics(diag, out)
        typer.echo(format_diagnostics(diag))
        typer.echo(f"label diagnostics -> {', '.join(map(str, files))}")
        if summary_json:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps({**s, "labels": diag}, indent=2) + "\n")

    @app.command("search-merge")
    def search_merge(
        inputs: list[Path] = typer.Argument(..., help="shard JSONL files"),
        out: Path = typer.Option(..., help="merged JSONL"),
    ):
        """Join the JSONL files of `retrofit search --shard i/n` runs (ordered by example, duplicates checked)."""
        from .run import format_summary, merge_files, summarize

        missing = [str(p) for p in inputs if not p.exists()]
        if missing:
            raise typer.BadParameter(f"not found: {', '.join(missing)}")
        recs = merge_files(inputs, out)
        typer.echo(f"{len(recs)} examples -> {out}")
        typer.echo(format_summary(summarize(recs)))

    @app.command("search-text")
    def search_text(
        out: Path = typer.Option(..., help="JSONL (.gz) of text records for `retrofit train --target task`"),
        model: str = typer.Option("default"),
        windows: int = typer.Option(96, min=1, help="text windows to score"),
        seq_len: int = typer.Option(128, min=2, help="tokens per window"),
        sources: list[str] = typer.Option(None, "--source", help="text sources (repeatable; default: GSM8K train "
                                          "solutions, BoolQ passages, FLORES English train, the Shakespeare head)"),
        task: str = typer.Option("source", help="the records' task: 'source' (each text source is a task of its "
                                 "own, so routers can tell prose from worked solutions) or one name for all"),
        seed: int = typer.Option(1),
        threads: int = typer.Option(0, help="torch threads (0 = torch default)"),
    ):
        """Score every single-layer skip on running text: how much each skipped layer raises the next-token loss.
        The records teach task routers (`retrofit train --target task`) which layers text can spare."""
        from retrofit.models import load_model
        from retrofit.moe.distill import DEFAULT_SOURCES, SOURCES

        from .lm import lm_records, text_windows, write_lm_records

        _setup(threads)
        srcs = tuple(sources or DEFAULT_SOURCES)
        bad = [s for s in srcs if s not in SOURCES]
        if bad:
            raise typer.BadParameter(f"unknown text source(s) {bad}; use some of {sorted(SOURCES)}")
        if out.exists():
            raise typer.BadParameter(f"{out} exists; delete it or choose another --out")
        m, tok = load_model(model)
        try:
            ids, names = text_windows(tok, srcs, windows, seq_len=seq_len, seed=seed)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        recs = lm_records(m, tok, ids, task=names if task == "source" else task)
        write_lm_records(recs, out)
        import torch

        inc = torch.tensor([r["layer_loss_increase"] for r in recs]).mean(0)
        typer.echo(f"{len(recs)} windows of {seq_len} tokens -> {out}")
        typer.echo("safest layers to skip (mean loss increase): " + ", ".join(
            f"{i} ({float(inc[i]):.3f})" for i in inc.argsort()[:8].tolist()))

    @app.command("search-repeats")
    def search_repeats(
        task: str = typer.Option(..., help="multiple-choice task name (arc_easy, piqa, ...) or a .jsonl"),
        out: Path = typer.Option(..., help="JSONL to append the probe to (resumes if it exists)"),
        model: str = typer.Option("default"),
        split: Optional[str] = typer.Option("train", help="data split (probe training data, never the test)"),
        limit: Optional[int] = typer.Option(None, help="first N examples only"),
        z: float = typer.Option(3.0, help="report: the paired standard errors a repeat's gain must clear"),
        threads: int = typer.Option(1, help="torch CPU threads"),
        device: str = typer.Option("cpu"),
        progress: bool = typer.Option(True),
    ):
        """Score every single-layer repeat against the all-execute plan, question by question: which layers the
        task gains from running twice. The probe feeds `retrofit train --target task --repeat-probes`."""
        _setup(threads)
        from retrofit.models import load_model

        from .evaluator import PlanEvaluator
        from .repeats import probe_repeats, repeat_layers
        from .tasks import load_task

        try:
            if split == "test":
                raise ValueError("--split test: probe training or validation data; the test split scores the result")
            examples = load_task(task, split, limit)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        m, tok = load_model(model)
        m.to(device)
        ev = PlanEvaluator(m, tok)
        try:
            recs = probe_repeats(m, tok, examples, out, task=task, split=split, evaluator=ev, progress=progress)
            rep = repeat_layers(recs, ev.L, z=z, max_repeats=ev.L, min_questions=2)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        for t, v in rep.items():
            top = sorted(range(ev.L), key=lambda i: -v["gain"][i])[:5]
            typer.echo(f"{t}: {v['n']} questions; repeats clearing {z} standard errors: {v['layers'] or 'none'}")
            typer.echo("  largest gains: " + ", ".join(
                f"layer {i} {v['gain'][i]:+.3f} +- {v['se'][i]:.3f}" for i in top))
        typer.echo(f"probe -> {out}")

    @app.command("search-repair")
    def search_repair(path: Path = typer.Argument(..., help="a search JSONL")):
        """Drop the damaged lines (not JSON, not a record, a torn last line) of a search JSONL, keeping them in
        PATH.dropped; resuming the search (same --out) redoes those examples."""
        from retrofit.core.data import repair_search_file

        from .run import SearchLockedError, output_lock

        if not path.is_file():
            raise typer.BadParameter(f"{path}: no such file")
        try:
            with output_lock(path):
                dropped = repair_search_file(path)
        except (SearchLockedError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
        typer.echo(f"{path}: dropped lines {dropped} -> {path}.dropped" if dropped else f"{path}: nothing to repair")

    @app.command("search-optuna")
    def search_optuna(
        task: str = typer.Option(..., help="task name or .jsonl"),
        model: str = typer.Option("default"),
        split: Optional[str] = typer.Option(None),
        limit: Optional[int] = typer.Option(50, help="examples scored per trial"),
        budget: str = typer.Option("1.0", help="compute budget: fraction of layers or block passes"),
        trials: int = typer.Option(30),
        storage: str = typer.Option("sqlite:///runs/optuna.db", help="any SQLAlchemy URL (SQLite by default)"),
        study_name: Optional[str] = typer.Option(None),
        seed: int = typer.Option(0),
        no_repeat: bool = typer.Option(False),
        threads: int = typer.Option(1),
        out_json: Optional[Path] = typer.Option(None, help="write the best static plan and its score here"),
    ):
        """optuna study of ONE static layer plan for a whole task (the baseline for per-example MCTS)."""
        _setup(threads)
        from retrofit.models import load_model

        from .optuna_study import static_plan_study
        from .tasks import load_task

        examples = load_task(task, split, limit)
        m, tok = load_model(model)
        res = static_plan_study(m, tok, examples, budget=budget, n_trials=trials, storage=storage,
                                study_name=study_name or f"static-plan-{Path(task).stem}", seed=seed,
                                allow_repeat=not no_repeat)
        typer.echo(json.dumps(res, indent=2))
        if out_json:
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(res, indent=2) + "\n")
