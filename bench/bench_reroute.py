"""Rewiring Experts on the Fly (``reroute``) on the MoE testbed: base vs test-time rerouting, same examples, same run.

    OMP_NUM_THREADS=1 python bench/bench_reroute.py --arc-limit 50 --chunks 8 --out bench/results/reroute.json

Model: ``retrofit.moe.moefy.load_testbed()`` (SmolLM2-135M made into an 8-expert top-2 Mixtral; run
``retrofit moefy`` first) or ``--tiny`` (a random tiny Mixtral with SmolLM2's tokenizer: checks the script only,
its numbers mean nothing).

Two measurements, each with the base model and with rerouting in three layer choices (all MoE layers;
``--num-layers`` least-confident layers; ``--num-layers`` most-confident layers), ``--steps`` Adam steps at
``--lr``:

* held-out text: ``--chunks`` windows of the Shakespeare tail the gate fit never read; adapt on the first
  ``--ctx`` tokens, then the next-token loss on the following ``--cont`` tokens (``base_loss`` / ``reroute_loss``,
  mean per token) -- the deltas never see the tokens they are scored on;
* ARC-Easy test (first ``--arc-limit`` questions): adapt on the prompt ("Question: ...\\nAnswer:"), then lm-eval's
  ``acc`` (summed log-likelihood of " " + choice) with the adapted deltas (``base_acc`` / ``reroute_acc``).

``time_overhead``: the paper's setting, generation. ``--gen-prompts`` prompts of ``--ctx`` held-out tokens, greedy
``model.generate`` of ``--gen-tokens`` new tokens with the base model and with ``reroute`` at its defaults (5 Adam
steps at lr 0.05 on the prompt, re-adapted every 128 new tokens on the sequence so far, all MoE layers, KV cache
kept): (time with rerouting) / (base time) - 1 over the same prompts. ``time_overhead_scoring`` is the same ratio
for the scoring work above (one adaptation per item against one scoring forward: the worst case).
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
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--num-layers", type=int, default=0, help="layers for the confidence orderings (0: a third)")
    ap.add_argument("--gen-prompts", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--variants", default="all_layers,least_confident,most_confident")
    ap.add_argument("--generation-only", action="store_true",
                    help="re-measure only the generation overhead and update it in --out (the rest is kept)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reroute.json"))
    args = ap.parse_args()

    import retrofit
    from retrofit.artifacts import fingerprint
    from retrofit.moe.moefy import heldout_text
    from retrofit.core.data import load_task

    from runlog import RunLog

    log = RunLog()
    t_start, log_lines = log.t0, log.lines

    torch.manual_seed(0)
    model, tok = load(args.tiny)
    n_moe = len(retrofit.arch.get_adapter(model).moe_gates(model))
    k = args.num_layers or max(1, n_moe // 3)
    variants = {"all_layers": dict(num_layers=None),
                "least_confident": dict(num_layers=k, layer_order="least_confident"),
                "most_confident": dict(num_layers=k, layer_order="most_confident")}
    variants = {v: variants[v] for v in args.variants.split(",")}
    common = dict(steps=args.steps, lr=args.lr, optimizer=args.optimizer, interval=0)
    log(f"model {type(model).__name__} ({'tiny random' if args.tiny else 'MoE testbed'}), {n_moe} MoE layers, "
        f"threads {torch.get_num_threads()}; variants {variants}; {common}")

    # ---- data (the same for every variant)
    text_ids = tok(heldout_text()[:400_000])["input_ids"]
    if args.generation_only:
        out = json.loads(Path(args.out).read_text())
        gen = generation_overhead(model, text_ids, args, log)
        out.update({"time_overhead": gen["time_overhead"], "generation": gen,
                    "generation_command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)})
        Path(args.out).write_text(json.dumps(out, indent=1))
        log(f"updated {args.out}")
        return
    W = args.ctx + args.cont
    stride = max(W, (len(text_ids) - W) // max(args.chunks, 1))
    chunks = [torch.tensor(text_ids[s:s + W]) for s in range(0, len(text_ids) - W, stride)][:args.chunks]
    arc = load_task("arc_easy", split="test", limit=args.arc_limit)
    log(f"{len(chunks)} text chunks of {args.ctx}+{args.cont} tokens; {len(arc)} ARC-Easy test questions")

    def run(handle):
        """(text loss per token, ARC acc, seconds, per-item correct list); handle=None: base model."""
        t0 = time.perf_counter()
        nll, n = 0.0, 0
        for c in chunks:
            if handle is not None:
                handle.adapt(c[None, :args.ctx])
                with handle.frozen():
                    a, b = cont_loss(model, c, args.ctx)
            else:
                a, b = cont_loss(model, c, args.ctx)
            nll += a
            n += b
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
        return nll / n, sum(correct) / len(correct), t_text, t_arc, correct

    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_loss, base_acc, bt_text, bt_arc, base_correct = run(None)
    log(f"base: loss {base_loss:.4f}, ARC acc {base_acc:.4f} ({bt_text:.0f} s text, {bt_arc:.0f} s ARC)")
    results = {}
    for name, kw in variants.items():
        h = retrofit.attach(model, "reroute", **common, **kw)
        try:
            loss, acc, t_text, t_arc, correct = run(h)
            st = h.stats()
        finally:
            h.detach()
        results[name] = {
            "reroute_loss": loss, "reroute_acc": acc,
            "time_overhead": (t_text + t_arc) / (bt_text + bt_arc) - 1,
            "time_overhead_text": t_text / bt_text - 1, "time_overhead_arc": t_arc / bt_arc - 1,
            "adaptations": st["adaptations"], "adapt_time_s": st["time_s"],
            "layer_counts": st["layer_counts"],
            "arc_flips": {"wrong_to_right": sum(1 for a, b in zip(base_correct, correct) if b > a),
                          "right_to_wrong": sum(1 for a, b in zip(base_correct, correct) if b < a)},
        }
        log(f"{name}: loss {loss:.4f} (base {base_loss:.4f}), ARC acc {acc:.4f} (base {base_acc:.4f}), "
            f"overhead {results[name]['time_overhead']:.2f}; layers chosen {st['layer_counts']}")
    gen = generation_overhead(model, text_ids, args, log)
    assert all(torch.equal(p, params0[n]) for n, p in model.named_parameters()), "base parameters changed"
    main_v = "all_layers"
    out = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "tiny random Mixtral (script check only)" if args.tiny else "MoE testbed (SmolLM2-135M, moefy)",
        "fingerprint": fingerprint(model),
        "config": {**common, "num_layers_ordered": k, "moe_layers": n_moe},
        "data": {"text": f"tinyshakespeare held-out tail, {len(chunks)} chunks, adapt on {args.ctx} tokens, score "
                         f"the next {args.cont}", "arc_easy_test": len(arc)},
        "base_loss": base_loss, "base_acc": base_acc,
        "reroute_loss": results[main_v]["reroute_loss"], "reroute_acc": results[main_v]["reroute_acc"],
        "time_overhead": gen["time_overhead"],
        "time_overhead_scoring": results[main_v]["time_overhead"],
        "generation": gen,
        "main_variant": main_v,
        "variants": results,
        "base_time_s": {"text": bt_text, "arc": bt_arc},
        "threads": torch.get_num_threads(),
        "seconds": time.time() - t_start,
        "log": log_lines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


@torch.no_grad()
def generation_overhead(model, text_ids, args, log) -> dict:
    """Greedy generation, base vs reroute at its default settings, the same prompts (see the module docstring)."""
    import retrofit

    n, W = args.gen_prompts, args.ctx
    starts = [len(text_ids) // 2 + i * 997 for i in range(n)]
    prompts = [torch.tensor([text_ids[s:s + W]]) for s in starts]
    model.generation_config.eos_token_id = None

    def gen_all():
        t = time.perf_counter()
        outs = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.gen_tokens,
                               do_sample=False, pad_token_id=0)[0, W:] for p in prompts]
        return time.perf_counter() - t, outs

    t_base, base_out = gen_all()
    h = retrofit.attach(model, "reroute")  # defaults: steps 5, lr 0.05, interval 128, all MoE layers, kv keep
    try:
        t_rr, rr_out = gen_all()
        st = h.stats()
        cfg = {"steps": h.config.steps, "lr": h.config.lr, "interval": h.config.interval,
               "kv_cache": h.config.kv_cache,
               "layers": "all MoE layers" if h.config.num_layers is None else h.config.num_layers}
    finally:
        h.detach()
    same = sum(int(torch.equal(a, b)) for a, b in zip(base_out, rr_out))
    res = {"prompts": n, "prompt_tokens": W, "new_tokens": args.gen_tokens, "config": cfg,
           "base_s": t_base, "reroute_s": t_rr, "time_overhead": t_rr / t_base - 1,
           "adaptations": st["adaptations"], "adapt_time_s": st["time_s"],
           "outputs_changed": n - same}
    log(f"generation: base {t_base:.1f} s, reroute {t_rr:.1f} s -> overhead {res['time_overhead']:.3f} "
        f"({st['adaptations']} adaptations, {st['time_s']:.1f} s adapting; {n - same}/{n} outputs changed)")
    return res


if __name__ == "__main__":
    main()
