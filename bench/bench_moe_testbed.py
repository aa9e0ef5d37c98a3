"""The MoE testbed (issue 5) against the dense original and against random routing.

    OMP_NUM_THREADS=1 python bench/bench_moe_testbed.py --experts 8 --top-k 2 [--limit 500]

Builds (or reuses) ``retrofit moefy``'s SmolLM2 MoE, then measures on held-out data that the gate fit never
read:
* perplexity on tinyshakespeare characters 1,000,000+ (``--seqs`` x ``--seq-len`` tokens, each sequence
  scored on its own), and
* ARC-Easy test accuracy (lm-eval's ``acc``: summed log-likelihood of " " + choice after
  "Question: ...\\nAnswer:"), scored with retrofit's PlanEvaluator (all layers executed),

for the dense model, the MoE with its fitted gates, and the MoE with random routing (every gate's logits
replaced by fresh N(0, 1) draws through GateHook, so each token gets k uniformly random experts with random
softmax-renormalised weights). Writes ``bench/results/moe_testbed.json``.
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
from retrofit.models import load_model  # noqa: E402
from retrofit.moe.moefy import (SHAKESPEARE_HELDOUT_START, MoefyConfig, build_testbed, heldout_text,  # noqa: E402
                                read_report)
from retrofit.search.evaluator import PlanEvaluator, naive_scores  # noqa: E402
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
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--shared", type=int, default=768, help="shared-expert neurons (0 with --arch mixtral)")
    ap.add_argument("--arch", default="qwen2_moe", choices=["qwen2_moe", "mixtral"])
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--limit", type=int, default=500, help="first N ARC-Easy test questions (0 = all 2376)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "moe_testbed.json"))
    ap.add_argument("--skip-dense", action="store_true", help="(debugging) skip the dense model")
    args = ap.parse_args()
    t0 = time.time()

    dense, tok = load_model("default")
    path = build_testbed(MoefyConfig(experts=args.experts, top_k=args.top_k, shared=args.shared, arch=args.arch))
    moe, _ = load_model(str(path))
    report = read_report(path)

    ids = tok(heldout_text(), add_special_tokens=False)["input_ids"]
    need = args.seqs * args.seq_len
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids)} tokens < {need}")
    seqs = torch.tensor(ids[:need]).view(args.seqs, args.seq_len)

    examples = load_task("arc_easy", split="test", limit=args.limit or None)
    # the packed scorer agrees with a plain padded forward on the MoE (routing is per token)
    for ex in examples[:3]:
        ev = PlanEvaluator(moe, tok, prefix_cache=False)
        ev.set_example(ex)
        a = ev.evaluate([("execute",) * ev.L])[0].scores
        b = naive_scores(moe, tok, ex, ("execute",) * ev.L)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2, (a, b)

    res = {}
    timing = {}
    for name in (["dense"] if not args.skip_dense else []) + ["moe", "random_routing"]:
        t = time.time()
        model = dense if name == "dense" else moe
        rr = RandomRouting(moe, args.seed) if name == "random_routing" else None
        try:
            res[f"{name}_ppl"] = round(perplexity(model, seqs), 3)
            t1 = time.time()
            acc, _ = arc_accuracy(model, tok, examples, name)
            res[f"{name}_acc"] = round(acc, 4)
        finally:
            if rr is not None:
                rr.close()
        timing[name] = {"ppl_s": round(t1 - t, 1), "arc_s": round(time.time() - t1, 1)}
        print(name, res, timing[name], flush=True)

    n = len(examples)
    se = {k.replace("_acc", "_acc_stderr"): round(math.sqrt(v * (1 - v) / n), 4) for k, v in res.items()
          if k.endswith("_acc")}
    out = {
        **res, **se,
        "experts": args.experts, "top_k": args.top_k, "shared_neurons": args.shared,
        "active_mlp_fraction": round((args.shared + (1536 - args.shared) * args.top_k / args.experts) / 1536, 4),
        "routed_mlp_fraction": round((1536 - args.shared) / 1536, 4),
        "model": f"SmolLM2-135M-Instruct -> {report.get('architecture')} (retrofit moefy)",
        "testbed_dir": str(path),
        "moefy": {k: report[k] for k in ("config", "mean", "tokens_captured", "tokens_fit", "seconds")},
        "ppl_data": f"tinyshakespeare chars {SHAKESPEARE_HELDOUT_START}+ (never used for fitting): "
                    f"first {args.seqs} x {args.seq_len} tokens, each sequence scored on its own",
        "ppl_tokens": args.seqs * (args.seq_len - 1),
        "arc_data": f"ARC-Easy test, first {n} questions" + (" (all)" if n == 2376 else ""),
        "arc_n": n,
        "arc_metric": "acc (sum log-likelihood of ' ' + choice after 'Question: ...\\nAnswer:')",
        "random_routing": "gate logits replaced by N(0,1) draws through GateHook (seeded), then the router's own "
                          "softmax -> top-k -> renormalise",
        "command": "OMP_NUM_THREADS=1 python bench/bench_moe_testbed.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - t0, 1),
        "timing": timing,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
