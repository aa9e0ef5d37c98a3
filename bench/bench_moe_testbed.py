"""The MoE testbed (issues 5, 17) against the dense original, its own gate-only build and random routing.

    OMP_NUM_THREADS=1 python bench/bench_moe_testbed.py --experts 8 --top-k 2 [--limit 500]
    # in two parts (e.g. while the distillation still runs), the second merging the first:
    ... --only dense,gates_only --out part.json ; ... --only moe,random_routing --merge part.json

Reads ``retrofit moefy``'s SmolLM2 MoE (the distilled testbed and the gate-only build before the distillation,
``<cache>/moe/smollm2-moe-e8k2`` and ``...-gates``; ``--build`` builds missing ones), then measures on held-out
data that neither the gate fit nor the distillation read:
* perplexity on tinyshakespeare characters 1,000,000+ (``--seqs`` x ``--seq-len`` tokens, each sequence
  scored on its own), and
* ARC-Easy test accuracy (lm-eval's ``acc``: summed log-likelihood of " " + choice after
  "Question: ...\\nAnswer:"), scored with retrofit's PlanEvaluator (all layers executed),

* KL(dense || MoE) of the next-token distributions on the first ``--kl-seqs`` of those sequences,

for the dense model, the gate-only MoE (``gates_only``: before the distillation), the distilled MoE (``moe``)
and the distilled MoE with random routing (every gate's logits replaced by fresh N(0, 1) draws through
GateHook, so each token gets k uniformly random experts with random softmax-renormalised weights). Writes
``bench/results/moe_testbed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrofit.arch.gates import GateHook  # noqa: E402
from retrofit.artifacts import fingerprint  # noqa: E402
from retrofit.models import load_model  # noqa: E402
from retrofit.moe.distill import kl_to_teacher  # noqa: E402
from retrofit.moe.moefy import (SHAKESPEARE_HELDOUT_START, MoefyConfig, _complete, build_testbed,  # noqa: E402
                                heldout_text, read_report, testbed_dir)
from retrofit.search.evaluator import PlanEvaluator, naive_scores  # noqa: E402
from runlog import command_line  # noqa: E402
from retrofit.core.data import load_task  # noqa: E402


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for s in range(0, len(seqs), batch):
        ids = seqs[s:s + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        nll -= float(lp.sum())
        n += lp.numel()
    return math.exp(nll / n)


@torch.no_grad()
def heldout_kl(model, dense, seqs: torch.Tensor, batch: int = 2) -> float:
    tot, n = 0.0, 0
    for s in range(0, len(seqs), batch):
        ids = seqs[s:s + batch]
        tot += float(kl_to_teacher(model(input_ids=ids, use_cache=False).logits,
                                   dense(input_ids=ids, use_cache=False).logits)) * ids.numel()
        n += ids.numel()
    return tot / n


def arc_accuracy(model, tok, examples, desc: str) -> tuple[float, list[int]]:
    from tqdm.auto import tqdm

    ev = PlanEvaluator(model, tok, prefix_cache=False)
    plan = ("execute",) * ev.L
    preds = []
    for ex in tqdm(examples, desc=desc, mininterval=10):
        ev.set_example(ex)
        preds.append(int(ev.evaluate([plan])[0].pred))
    acc = sum(p == ex.gold for p, ex in zip(preds, examples)) / len(examples)
    return acc, preds


class RandomRouting:
    """Replace every gate's logits with N(0, 1) draws (seeded) while active."""

    def __init__(self, model, seed: int = 0):
        self.hook = GateHook.install(model)
        self.gen = torch.Generator().manual_seed(seed)
        for layer in self.hook.layers:
            self.hook.set_offset(layer, self._random, owner="random_routing")

    def _random(self, z):
        return torch.randn(z.shape, generator=self.gen).to(z)

    def close(self):
        self.hook.clear("random_routing")
        self.hook.release()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=MoefyConfig.top_k)
    ap.add_argument("--shared", type=int, default=768, help="shared-expert neurons (0 with --arch mixtral)")
    ap.add_argument("--arch", default="qwen2_moe", choices=["qwen2_moe", "mixtral"])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--limit", type=int, default=500, help="first N ARC-Easy test questions (0 = all 2376)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "moe_testbed.json"))
    ap.add_argument("--kl-seqs", type=int, default=4, help="held-out sequences for the KL to the dense model")
    ap.add_argument("--only", default="dense,gates_only,moe,random_routing",
                    help="comma-separated subset of dense, gates_only, moe, random_routing")
    ap.add_argument("--merge", default=None, help="a results JSON of an earlier part whose numbers to keep")
    ap.add_argument("--build", action="store_true", help="build missing testbeds (hours on a CPU)")
    ap.add_argument("--testbed", default=None,
                    help="the distilled testbed folder to measure as 'moe' (default: retrofit moefy's default build), "
                         "e.g. one built with other --distill-sources")
    args = ap.parse_args()
    t0 = time.time()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in ("dense", "gates_only", "moe", "random_routing")]
    if bad:
        raise SystemExit(f"--only: unknown {bad}")

    dense, tok = load_model("default")
    mcfg = MoefyConfig(experts=args.experts, top_k=args.top_k, shared=args.shared, arch=args.arch)
    paths = {"gates_only": testbed_dir(args.experts, args.top_k, args.shared, args.arch, distilled=False),
             "moe": Path(args.testbed).expanduser() if args.testbed else
             testbed_dir(args.experts, args.top_k, args.shared, args.arch, distilled=True)}
    models = {}
    for key, distilled in (("gates_only", False), ("moe", True)):
        if key == "moe" and not {"moe", "random_routing"} & set(names) or key == "gates_only" and key not in names:
            continue
        if not _complete(paths[key], distilled=distilled):
            if not args.build:
                raise SystemExit(f"{paths[key]}: no {'distilled' if distilled else 'gate-only'} testbed; run "
                                 f"`retrofit moefy{'' if distilled else ' --no-distill'}` first (or --build)")
            build_testbed(mcfg, out=paths[key], distill=distilled)
        models[key] = load_model(str(paths[key]))[0]
    path = paths["moe"] if _complete(paths["moe"], distilled=True) else paths["gates_only"]
    report = read_report(path)

    ids = tok(heldout_text(), add_special_tokens=False)["input_ids"]
    need = args.seqs * args.seq_len
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids)} tokens < {need}")
    seqs = torch.tensor(ids[:need]).view(args.seqs, args.seq_len)

    examples = load_task("arc_easy", split="test", limit=args.limit or None)
    # the packed scorer agrees with a plain padded forward on the MoE (routing is per token)
    for m in models.values():
        for ex in examples[:2]:
            ev = PlanEvaluator(m, tok, prefix_cache=False)
            ev.set_example(ex)
            a = ev.evaluate([("execute",) * ev.L])[0].scores
            b = naive_scores(m, tok, ex, ("execute",) * ev.L)
            if max(abs(x - y) for x, y in zip(a, b)) >= 1e-2:
                raise SystemExit(f"packed scorer disagrees with a plain forward: {a} vs {b}")

    prev = json.loads(Path(args.merge).read_text()) if args.merge else {}
    res = {k: v for k, v in prev.items() if k.endswith(("_ppl", "_acc", "_kl"))}
    timing = dict(prev.get("timing", {}))

    def write(done: bool):
        n = len(examples)
        if prev and prev.get("arc_n") != n:
            raise SystemExit(f"--merge: {args.merge} scored {prev.get('arc_n')} ARC questions, this run {n}")
        se = {k.replace("_acc", "_acc_stderr"): round(math.sqrt(v * (1 - v) / n), 4) for k, v in res.items()
              if k.endswith("_acc")}
        out = {
            **res, **se,
            "experts": args.experts, "top_k": args.top_k, "shared_neurons": args.shared,
            "active_mlp_fraction": round((args.shared + (1536 - args.shared) * args.top_k / args.experts) / 1536, 4),
            "routed_mlp_fraction": round((1536 - args.shared) / 1536, 4),
            "model": f"SmolLM2-135M-Instruct -> {report.get('architecture')} (retrofit moefy)",
            "testbed_dir": str(paths["moe"]), "gates_only_dir": str(paths["gates_only"]),
            # which build was measured (the other MoE results files record their model's fingerprint too): a rebuild
            # on another machine gives other weights (float summation order in the distillation)
            "weights_sha256": {k: fingerprint(m)["weights_sha256"] for k, m in models.items()},
            "moefy": {k: report[k] for k in ("config", "mean", "tokens_captured", "tokens_fit", "seconds")},
            "distill": report.get("distill", prev.get("distill")),
            "kl": f"KL(dense || model) per token on the first {args.kl_seqs} held-out sequences",
            "ppl_data": f"tinyshakespeare chars {SHAKESPEARE_HELDOUT_START}+ (never used for fitting): "
                        f"first {args.seqs} x {args.seq_len} tokens, each sequence scored on its own",
            "ppl_tokens": args.seqs * (args.seq_len - 1),
            "arc_data": f"ARC-Easy test, first {n} questions" + (" (all)" if n == 2376 else ""),
            "arc_n": n,
            "arc_metric": "acc (sum log-likelihood of ' ' + choice after 'Question: ...\\nAnswer:')",
            "gates_only": "the testbed before the expert distillation (gates fitted, experts as split)",
            "random_routing": "on the distilled testbed: gate logits replaced by N(0,1) draws through GateHook "
                              "(seeded), then the router's own softmax -> top-k -> renormalise",
            "paired_acc": paired(),
            "command": command_line(),
            "earlier_part": {k: prev[k] for k in ("command", "date", "seconds") if k in prev} if prev else None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1),
            "timing": timing,
        }
        out["complete"] = done  # False while later models of this run are still to be measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        return out

    correct = {}  # per-question 0/1 of the models scored in this run, for paired differences

    def paired():
        """Accuracy differences on the same questions, with their standard errors (models of this run only)."""
        out = {}
        for a, b in (("moe", "dense"), ("random_routing", "moe"), ("gates_only", "dense"), ("moe", "gates_only")):
            if a in correct and b in correct:
                d = [x - y for x, y in zip(correct[a], correct[b])]
                n = len(d)
                m = sum(d) / n
                se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
                out[f"{a}_minus_{b}"] = {"diff": round(m, 4), "se": round(se, 4), "n": n}
        return out

    for name in [n for n in ("dense", "gates_only", "moe", "random_routing") if n in names]:
        t = time.time()
        model = dense if name == "dense" else models["gates_only" if name == "gates_only" else "moe"]
        rr = RandomRouting(model, args.seed) if name == "random_routing" else None
        try:
            res[f"{name}_ppl"] = round(perplexity(model, seqs), 3)
            if name != "dense":
                res[f"{name}_kl"] = round(heldout_kl(model, dense, seqs[:args.kl_seqs]), 4)
            t1 = time.time()
            acc, preds = arc_accuracy(model, tok, examples, name)
            res[f"{name}_acc"] = round(acc, 4)
            correct[name] = [int(p == ex.gold) for p, ex in zip(preds, examples)]
        finally:
            if rr is not None:
                rr.close()
        timing[name] = {"ppl_s": round(t1 - t, 1), "arc_s": round(time.time() - t1, 1)}
        print(name, res, timing[name], flush=True)
        write(done=name == names[-1])

    print(json.dumps(write(done=True), indent=1))


if __name__ == "__main__":
    main()
