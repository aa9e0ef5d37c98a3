"""Rewiring Experts on the Fly (``reroute``) on the MoE testbed: base vs test-time rerouting, same examples, same run,
both schedules (the default ``schedule="fast"`` and ``schedule="paper"``).

    OMP_NUM_THREADS=1 python bench/bench_reroute.py --arc-limit 100 --chunks 16 --out bench/results/reroute.json

Model: ``retrofit.moe.moefy.load_bench_model()`` (the distilled SmolLM2-135M MoE testbed; run ``retrofit moefy``
first) or ``--tiny`` (a random tiny Mixtral with SmolLM2's tokenizer: checks the script only, its numbers mean
nothing).

Quality, with the base model and with rerouting in each of ``--variants`` (``default``: the default config, every
MoE layer; ``paper``: ``schedule="paper"``; ``least_confident`` / ``most_confident``: ``--num-layers`` layers by
router confidence, default schedule; ``steps<N>``: the default with N steps), adaptation at prefill only:

* held-out text: ``--chunks`` windows of the Shakespeare tail the gate fit never read; adapt on the first
  ``--ctx`` tokens, then the next-token loss on the following ``--cont`` tokens (``base_loss`` / ``reroute_loss``,
  mean per token) -- the deltas never see the tokens they are scored on; ``loss_gain`` +- ``loss_gain_stderr``:
  base - reroute paired over the chunks (each chunk's mean), ``chunks_improved`` of ``n_text_chunks``;
* ARC-Easy test (first ``--arc-limit`` questions): adapt on the prompt ("Question: ...\\nAnswer:"), then lm-eval's
  ``acc`` (summed log-likelihood of " " + choice) with the adapted deltas (``base_acc`` / ``reroute_acc``);
* ``--long-ctx`` (0: off): the held-out text again (``--long-chunks`` windows) with that many context tokens:
  base, default, paper, and the default with ``window=--long-window`` (the loss on the last 128 positions, the
  prefix a fixed no-grad KV cache) (``long_context``; losses and CPU seconds of the whole text pass).

``reroute_loss`` / ``reroute_acc``: the ``default`` variant; ``paper_schedule_loss`` / ``paper_schedule_acc``: the
``paper`` variant.

``time_overhead``: the paper's setting, generation. ``--gen-prompts`` prompts of ``--ctx`` held-out tokens, greedy
``model.generate`` of ``--gen-tokens`` new tokens with the base model, with ``reroute`` at its defaults and with
``reroute`` at ``schedule="paper"`` (5 Adam steps at lr 0.05 on the prompt, re-adapted every 128 new tokens on the
sequence so far, all MoE layers, KV cache kept), the three interleaved prompt by prompt: (time with rerouting) /
(base time) - 1 over the same prompts, for the default (``time_overhead``) and the paper schedule
(``paper_schedule_time_overhead``); wall-clock seconds, and the same ratios in CPU seconds of this process
(``*_cpu``: the machine may be shared). ``time_overhead_scoring`` is the wall-clock ratio for the scoring work
above (one adaptation per item against one scoring forward: the worst case), default schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load(tiny: bool):
    from retrofit.moe.moefy import load_bench_model

    return load_bench_model(tiny)


@torch.no_grad()
def cont_loss(model, ids: torch.Tensor, ctx: int) -> tuple[float, int]:
    """Summed next-token loss of tokens ids[ctx:] given everything before them; and their count."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, ctx - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[ctx:], reduction="sum")
    return float(nll), int(ids.numel() - ctx)


def choice_scores(model, tok, prompt: str, choices: list[str]) -> list[float]:
    """lm-eval style: summed log-likelihood of each " " + choice after the prompt (one batch)."""
    from retrofit.core.data import score_continuations

    return score_continuations(model, tok, [(prompt, " " + c) for c in choices], batch=len(choices))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--arc-limit", type=int, default=50)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="steps for every variant (default: each schedule's)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--long-ctx", type=int, default=0, help="context tokens of the long-context text check (0: off)")
    ap.add_argument("--long-chunks", type=int, default=0, help="chunks of the long-context check (0: --chunks)")
    ap.add_argument("--long-window", type=int, default=128, help="window of the long-context check's window arm")
    ap.add_argument("--num-layers", type=int, default=0, help="layers for the confidence orderings (0: a third)")
    ap.add_argument("--gen-prompts", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--variants", default="default,paper,least_confident,most_confident")
    ap.add_argument("--generation-only", action="store_true",
                    help="re-measure only the generation overhead and update it in --out (the rest is kept)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reroute.json"))
    args = ap.parse_args()

    import retrofit
    from retrofit.artifacts import fingerprint
    from retrofit.moe.moefy import heldout_text
    from retrofit.core.data import load_task

    from runlog import RunLog, command_line

    log = RunLog()
    t_start, log_lines = log.t0, log.lines

    torch.manual_seed(0)
    model, tok = load(args.tiny)
    n_moe = len(retrofit.arch.get_adapter(model).moe_gates(model))
    k = args.num_layers or max(1, n_moe // 3)
    known = {"default": dict(num_layers=None), "paper": dict(schedule="paper", num_layers=None),
             "least_confident": dict(num_layers=k, layer_order="least_confident"),
             "most_confident": dict(num_layers=k, layer_order="most_confident")}
    variants = {}
    for v in args.variants.split(","):
        if v in known:
            variants[v] = known[v]
        elif v.startswith("steps") and v[5:].isdigit():
            variants[v] = dict(num_layers=None, steps=int(v[5:]))
        else:
            ap.error(f"unknown variant {v!r}; known: {sorted(known)} or steps<N>")
    common = dict(lr=args.lr, optimizer=args.optimizer, interval=0)
    if args.steps is not None:
        common["steps"] = args.steps
    log(f"model {type(model).__name__} ({'tiny random' if args.tiny else 'MoE testbed'}), {n_moe} MoE layers, "
        f"threads {torch.get_num_threads()}; variants {variants}; {common}")

    # ---- data (the same for every variant)
    text_ids = tok(heldout_text()[:400_000])["input_ids"]
    if args.generation_only:
        out = json.loads(Path(args.out).read_text())
        gen = generation_overhead(model, text_ids, args, log)
        out.update({**_gen_keys(gen), "generation_command": command_line()})
        Path(args.out).write_text(json.dumps(out, indent=1))
        log(f"updated {args.out}")
        return
    W = args.ctx + args.cont
    stride = max(W, (len(text_ids) - W) // max(args.chunks, 1))
    chunks = [torch.tensor(text_ids[s:s + W]) for s in range(0, len(text_ids) - W, stride)][:args.chunks]
    arc = load_task("arc_easy", split="test", limit=args.arc_limit)
    log(f"{len(chunks)} text chunks of {args.ctx}+{args.cont} tokens; {len(arc)} ARC-Easy test questions")

    def text_loss(handle, chunks, ctx, per_chunk=None):
        """Mean next-token loss per token over ``chunks``; each chunk's own mean appended to ``per_chunk``."""
        nll, n = 0.0, 0
        for c in chunks:
            if handle is not None:
                handle.adapt(c[None, :ctx])
                with handle.frozen():
                    a, b = cont_loss(model, c, ctx)
            else:
                a, b = cont_loss(model, c, ctx)
            nll += a
            n += b
            if per_chunk is not None:
                per_chunk.append(a / b)
        return nll / n

    def run(handle):
        """(text loss per token, ARC acc, seconds, per-item correct list, per-chunk losses); handle=None: base."""
        t0 = time.perf_counter()
        per_chunk = []
        loss = text_loss(handle, chunks, args.ctx, per_chunk)
        t_text = time.perf_counter() - t0
        t0 = time.perf_counter()
        correct = []
        for ex in arc:
            if handle is not None:
                handle.adapt(torch.tensor([tok(ex.prompt)["input_ids"]]))
                with handle.frozen():
                    s = choice_scores(model, tok, ex.prompt, ex.choices)
            else:
                s = choice_scores(model, tok, ex.prompt, ex.choices)
            correct.append(int(max(range(len(s)), key=s.__getitem__) == ex.gold))
        t_arc = time.perf_counter() - t0
        return loss, sum(correct) / len(correct), t_text, t_arc, correct, per_chunk

    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_loss, base_acc, bt_text, bt_arc, base_correct, base_chunks = run(None)
    log(f"base: loss {base_loss:.4f}, ARC acc {base_acc:.4f} ({bt_text:.0f} s text, {bt_arc:.0f} s ARC)")
    results = {}
    for name, kw in variants.items():
        h = retrofit.attach(model, "reroute", **{**common, **kw})
        try:
            loss, acc, t_text, t_arc, correct, per_chunk = run(h)
            st = h.stats()
        finally:
            h.detach()
        # paired over the same chunks (each chunk's mean loss; all chunks have the same length): base - reroute
        gains = [b - r for b, r in zip(base_chunks, per_chunk)]
        gain, gain_se = mean_se(gains)
        results[name] = {
            "config": kw, "schedule": st["schedule"], "steps_per_adaptation": h.config.effective_steps,
            "window": st["window"],
            "reroute_loss": loss, "reroute_acc": acc, "reroute_acc_stderr": binomial_se(acc, len(correct)),
            "loss_gain": gain, "loss_gain_stderr": gain_se, "chunks_improved": sum(1 for g in gains if g > 0),
            "time_overhead": (t_text + t_arc) / (bt_text + bt_arc) - 1,
            "time_overhead_text": t_text / bt_text - 1, "time_overhead_arc": t_arc / bt_arc - 1,
            "adaptations": st["adaptations"], "adapt_time_s": st["time_s"],
            "layer_counts": st["layer_counts"],
            "arc_flips": {"wrong_to_right": sum(1 for a, b in zip(base_correct, correct) if b > a),
                          "right_to_wrong": sum(1 for a, b in zip(base_correct, correct) if b < a)},
        }
        log(f"{name}: loss {loss:.4f} (base {base_loss:.4f}; gain {results[name]['loss_gain']:.4f} +- "
            f"{results[name]['loss_gain_stderr']:.4f}, {results[name]['chunks_improved']}/{len(chunks)} chunks "
            f"better), ARC acc {acc:.4f} (base {base_acc:.4f}), "
            f"overhead {results[name]['time_overhead']:.2f}; layers chosen {st['layer_counts']}")
    long = None
    if args.long_ctx:
        W = args.long_ctx + args.cont
        n_long = args.long_chunks or args.chunks
        stride = max(W, (len(text_ids) - W) // max(n_long, 1))
        long_chunks = [torch.tensor(text_ids[s:s + W]) for s in range(0, len(text_ids) - W, stride)][:n_long]
        long = {"ctx": args.long_ctx, "cont": args.cont, "chunks": len(long_chunks)}
        t0 = time.process_time()
        long["base_loss"] = text_loss(None, long_chunks, args.long_ctx)
        long["base_cpu_s"] = time.process_time() - t0
        arms = [("default", {}), ("paper", dict(schedule="paper"))]
        if 0 < args.long_window < args.long_ctx - 1:
            arms.append((f"window{args.long_window}", dict(window=args.long_window)))
        for name, kw in arms:
            h = retrofit.attach(model, "reroute", **{**common, **kw})
            try:
                t0 = time.process_time()
                long[f"{name}_loss"] = text_loss(h, long_chunks, args.long_ctx)
                long[f"{name}_cpu_s"] = time.process_time() - t0
                long[f"{name}_adapt_s"] = h.stats()["time_s"]  # wall-clock seconds inside the adaptations
                long[f"{name}_window"] = h.config.window
            finally:
                h.detach()
        log(f"long context ({args.long_ctx} tokens): base {long['base_loss']:.4f}; " + ", ".join(
            f"{name} {long[name + '_loss']:.4f} ({long[name + '_cpu_s']:.0f} s)" for name, _ in arms))
    gen = generation_overhead(model, text_ids, args, log)
    assert all(torch.equal(p, params0[n]) for n, p in model.named_parameters()), "base parameters changed"
    main_v = "default" if "default" in results else next(iter(results))
    paper_v = results.get("paper", {})
    out = {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "tiny random Mixtral (script check only)" if args.tiny else "MoE testbed (SmolLM2-135M, moefy)",
        "fingerprint": fingerprint(model),
        "config": {**common, "num_layers_ordered": k, "moe_layers": n_moe},
        "data": {"text": f"tinyshakespeare held-out tail, {len(chunks)} chunks, adapt on {args.ctx} tokens, score "
                         f"the next {args.cont}", "arc_easy_test": len(arc)},
        "base_loss": base_loss, "base_acc": base_acc,
        "reroute_loss": results[main_v]["reroute_loss"], "reroute_acc": results[main_v]["reroute_acc"],
        "n_text_chunks": len(chunks), "n_arc": len(arc),
        "base_acc_stderr": binomial_se(base_acc, len(arc)),
        "reroute_acc_stderr": results[main_v]["reroute_acc_stderr"],
        "reroute_loss_gain": results[main_v]["loss_gain"],
        "reroute_loss_gain_stderr": results[main_v]["loss_gain_stderr"],
        "reroute_arc_flips": results[main_v]["arc_flips"],
        "paper_schedule_loss": paper_v.get("reroute_loss"), "paper_schedule_acc": paper_v.get("reroute_acc"),
        **_gen_keys(gen),
        "time_overhead_scoring": results[main_v]["time_overhead"],
        "paper_schedule_time_overhead_scoring": paper_v.get("time_overhead"),
        "main_variant": main_v,
        "variants": results,
        "long_context": long,
        "base_time_s": {"text": bt_text, "arc": bt_arc},
        "threads": torch.get_num_threads(),
        "seconds": time.time() - t_start,
        "log": log_lines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


def binomial_se(p: float, n: int) -> float:
    return (p * (1 - p) / max(n, 1)) ** 0.5


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for fewer than 2 values)."""
    n = len(xs)
    m = sum(xs) / max(n, 1)
    if n < 2:
        return m, 0.0
    return m, (sum((x - m) ** 2 for x in xs) / (n - 1) / n) ** 0.5


def _gen_keys(gen: dict) -> dict:
    return {"time_overhead": gen["default"]["time_overhead"],
            "paper_schedule_time_overhead": gen["paper"]["time_overhead"],
            "time_overhead_cpu": gen["default"]["time_overhead_cpu"],
            "paper_schedule_time_overhead_cpu": gen["paper"]["time_overhead_cpu"],
            "generation": gen}


@torch.no_grad()
def generation_overhead(model, text_ids, args, log) -> dict:
    """Greedy generation: base, reroute at its defaults and at schedule='paper', the same prompts, interleaved
    prompt by prompt (see the module docstring)."""
    import retrofit

    n, W = args.gen_prompts, args.ctx
    starts = [len(text_ids) // 2 + i * 997 for i in range(n)]
    prompts = [torch.tensor([text_ids[s:s + W]]) for s in starts]
    model.generation_config.eos_token_id = None
    arms = {"base": None, "default": {}, "paper": {"schedule": "paper"}}
    wall = {a: 0.0 for a in arms}
    cpu = {a: 0.0 for a in arms}
    outs = {a: [] for a in arms}
    stats = {a: {"adaptations": 0, "adapt_time_s": 0.0} for a in arms if a != "base"}
    cfgs = {}
    for p in prompts:
        for arm, kw in arms.items():
            h = None if kw is None else retrofit.attach(model, "reroute", **kw)  # the defaults of each schedule
            try:
                t, c = time.perf_counter(), time.process_time()
                o = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.gen_tokens,
                                   do_sample=False, pad_token_id=0)[0, W:]
                wall[arm] += time.perf_counter() - t
                cpu[arm] += time.process_time() - c
                outs[arm].append(o)
                if h is not None:
                    st = h.stats()
                    stats[arm]["adaptations"] += st["adaptations"]
                    stats[arm]["adapt_time_s"] += st["time_s"]
                    cfgs[arm] = {"schedule": h.config.schedule, "steps": h.config.effective_steps, "lr": h.config.lr,
                                 "interval": h.config.effective_interval, "window": h.config.window,
                                 "kv_cache": h.config.kv_cache,
                                 "layers": "all MoE layers" if h.config.num_layers is None else h.config.num_layers}
            finally:
                if h is not None:
                    h.detach()
    res = {"prompts": n, "prompt_tokens": W, "new_tokens": args.gen_tokens, "base_s": wall["base"],
           "base_cpu_s": cpu["base"]}
    for arm in ("default", "paper"):
        same = sum(int(torch.equal(a, b)) for a, b in zip(outs["base"], outs[arm]))
        res[arm] = {"config": cfgs[arm], "reroute_s": wall[arm], "reroute_cpu_s": cpu[arm],
                    "time_overhead": wall[arm] / wall["base"] - 1, "time_overhead_cpu": cpu[arm] / cpu["base"] - 1,
                    **stats[arm], "outputs_changed": n - same}
        log(f"generation, {arm}: base {wall['base']:.1f} s, reroute {wall[arm]:.1f} s -> overhead "
            f"{res[arm]['time_overhead']:.3f} (cpu {res[arm]['time_overhead_cpu']:.3f}; {stats[arm]['adaptations']} "
            f"adaptations, {stats[arm]['adapt_time_s']:.1f} s adapting; {n - same}/{n} outputs changed)")
    return res


if __name__ == "__main__":
    main()
