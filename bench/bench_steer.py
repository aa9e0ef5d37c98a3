"""Multilingual routing steering (``steer``) on the MoE testbed: routing alignment and XCOPA accuracy, base vs
steered, middle layers vs early / late layers, same examples, same run.

    OMP_NUM_THREADS=1 python bench/bench_steer.py --langs it,id,sw,tr --limit 80 --out bench/results/steer.json

Model: ``retrofit.moe.moefy.load_testbed()`` (run ``retrofit moefy`` first) or ``--tiny`` (a random tiny Mixtral with
SmolLM2's tokenizer: checks the script only, its numbers mean nothing).

Fit (English only): task texts = XCOPA English renderings (``xcopa/data-gmt/<--fit-lang>/test``: premise + correct
choice; disjoint from the validation items evaluated below) or ``--task mgsm`` (MGSM English questions);
general texts = FLORES English (``flores_sib200/eng_Latn/train``). ``--tau auto``: the largest of 0.3, 0.2, 0.1,
0.05, 0.02 that gives at least one task expert in at least half of the steered layers (an 8-expert top-2
testbed has far smaller Delta than the paper's 64-expert models).

Measured on XCOPA validation (the first ``--limit`` items per language in ``--langs``):
* ``base_alignment`` / ``steered_alignment``: cosine between an item's expert-use vector in the non-English
  language (a[e] per middle MoE layer, concatenated) and the same item's English rendering (data-gmt) under the
  *unsteered* model, averaged over items and languages; also per layer for the base model (all layers).
* ``base_acc`` / ``steered_acc``: log-likelihood accuracy (lm-eval's xcopa prompt: premise without its final
  period + connector, choices with a lower-cased first letter), steering on every token; English (data-gmt)
  accuracy as a control (base and middle-layer variants).
* early / late contrast: the same with experts fitted and steered in the first or last third of the layers.
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

# lm-eval's xcopa connectors (cause, effect)
CONNECTORS = {
    "en": ("because", "therefore"), "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"),
    "it": ("perché", "quindi"), "id": ("karena", "maka"), "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"), "zh": ("因为", "所以"), "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"), "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy"),
}


def load(tiny: bool):
    from retrofit.moe.moefy import load_bench_model

    return load_bench_model(tiny)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def xcopa_mc(item: dict, lang: str) -> tuple[str, list[str]]:
    cause, effect = CONNECTORS[lang]
    conn = cause if item["question"] == "cause" else effect
    prompt = item["premise"].strip()
    if prompt and prompt[-1] in ".。!?":
        prompt = prompt[:-1]
    prompt = prompt + " " + conn

    def low(c):
        c = c.strip()
        return c[:1].lower() + c[1:]

    return prompt, [low(item["choice1"]), low(item["choice2"])]


def score_rows(model, tok, pairs: list[tuple[str, str]], batch: int = 16) -> list[float]:
    """Summed log-likelihood of each continuation " " + c after its prompt (steering acts per token, so
    batching changes nothing)."""
    from retrofit.core.data import score_continuations

    return score_continuations(model, tok, [(p, " " + c) for p, c in pairs], batch)


def accuracy(model, tok, items: list[dict], lang: str) -> float:
    pairs = []
    for it in items:
        p, ch = xcopa_mc(it, lang)
        pairs += [(p, ch[0]), (p, ch[1])]
    s = score_rows(model, tok, pairs)
    ok = sum(int((s[2 * i + 1] > s[2 * i]) == (int(it["label"]) == 1)) for i, it in enumerate(items))
    return ok / len(items)


def text_of(item: dict) -> str:
    return item["premise"] + " " + (item["choice1"] if int(item["label"]) == 0 else item["choice2"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--langs", default="it,id,sw,tr")
    ap.add_argument("--task", choices=["xcopa", "mgsm"], default="xcopa")
    ap.add_argument("--fit-lang", default="it", help="data-gmt language whose English test renderings fit the experts")
    ap.add_argument("--general-limit", type=int, default=200)
    ap.add_argument("--task-limit", type=int, default=250)
    ap.add_argument("--tau", default="auto")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--limit", type=int, default=80, help="XCOPA validation items per language")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "steer.json"))
    args = ap.parse_args()

    import retrofit
    from retrofit.artifacts import fingerprint
    from retrofit.methods.steer import (SteeringFit, attach_fit, load_texts, middle_layers, routing_usage,
                                        steering_masks)
    from retrofit.core.data import data_dir

    from runlog import RunLog, command_line

    log = RunLog()
    t_start, log_lines = log.t0, log.lines

    D = data_dir()
    langs = [l for l in args.langs.split(",") if l]
    model, tok = load(args.tiny)
    adapter = retrofit.arch.get_adapter(model)
    L = adapter.num_layers(model)
    moe = sorted(adapter.moe_gates(model))

    # ---- fit (English only)
    if args.task == "xcopa":
        task_texts = [text_of(r) for r in read_jsonl(D / "xcopa" / "data-gmt" / args.fit_lang /
                                                    f"test.{args.fit_lang}.jsonl")][:args.task_limit]
        task_src = f"xcopa/data-gmt/{args.fit_lang}/test (English renderings, premise + correct choice)"
    else:
        task_texts = load_texts(D / "mgsm" / "mgsm_en.tsv", args.task_limit)
        task_src = "mgsm/mgsm_en.tsv"
    general = load_texts(D / "flores_sib200" / "eng_Latn" / "train.tsv", args.general_limit)
    t0 = time.time()
    task_use = routing_usage(model, tok, task_texts)
    gen_use = routing_usage(model, tok, general)
    log(f"usage: {len(task_texts)} task texts ({task_src}), {len(general)} FLORES texts, {time.time() - t0:.0f} s")

    ranges = {"middle": (1 / 3, 2 / 3), "early": (0.0, 1 / 3), "late": (2 / 3, 1.0)}
    deltas_all = {l: (task_use[l].mean(0) - gen_use[l].mean(0)) for l in moe}
    mid = middle_layers(moe, L, ranges["middle"])
    if args.tau == "auto":
        tau = 0.02
        for cand in (0.3, 0.2, 0.1, 0.05, 0.02):
            if sum(bool((deltas_all[l] > cand).any()) for l in mid) >= max(1, len(mid) / 2):
                tau = cand
                break
    else:
        tau = float(args.tau)
    log(f"tau {tau}; max Delta per layer: " + ", ".join(f"{l}:{float(deltas_all[l].max()):.3f}" for l in moe))

    fits = {}  # the usages above serve every layer range (no second pass over the fit data)
    for name, rng in ranges.items():
        lays = middle_layers(moe, L, rng)
        masks, deltas = steering_masks(task_use, gen_use, tau, lays)
        fits[name] = SteeringFit(experts={l: torch.nonzero(m).flatten().tolist() for l, m in masks.items()},
                                 masks=masks, deltas=deltas, task_usage=task_use, general_usage=gen_use, tau=tau,
                                 layers=lays, layer_range=list(rng))
        log(f"{name} layers {lays}: task experts {fits[name].experts}")

    # ---- evaluation data
    val = {}
    for lang in langs:
        xs = read_jsonl(D / "xcopa" / "data" / lang / f"val.{lang}.jsonl")[:args.limit]
        en = {r["idx"]: r for r in read_jsonl(D / "xcopa" / "data-gmt" / lang / f"val.{lang}.jsonl")}
        val[lang] = [(x, en[x["idx"]]) for x in xs if x["idx"] in en]

    # English reference usage (unsteered) per language
    en_ref = {}
    for lang in langs:
        en_ref[lang] = routing_usage(model, tok, [text_of(e) for _, e in val[lang]])

    def alignment(layers) -> tuple[float, dict, dict]:
        """mean cosine(non-English use, English unsteered use) over the given layers; per language; per layer."""
        per_lang, per_layer_sum, n = {}, {l: 0.0 for l in moe}, 0
        for lang in langs:
            u = routing_usage(model, tok, [text_of(x) for x, _ in val[lang]])
            a = torch.cat([u[l] for l in layers], 1)
            b = torch.cat([en_ref[lang][l] for l in layers], 1)
            per_lang[lang] = float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())
            for l in moe:
                per_layer_sum[l] += float(torch.nn.functional.cosine_similarity(u[l], en_ref[lang][l], dim=1).sum())
            n += a.shape[0]
        return (sum(per_lang.values()) / len(per_lang), per_lang, {l: s / n for l, s in per_layer_sum.items()})

    def accuracies(english: bool = True) -> dict:
        acc = {lang: accuracy(model, tok, [x for x, _ in val[lang]], lang) for lang in langs}
        acc_en = (sum(accuracy(model, tok, [e for _, e in val[lang]], "en") for lang in langs) / len(langs)
                  if english else None)
        return {"per_lang": acc, "mean": sum(acc.values()) / len(acc), "english_control": acc_en}

    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    t0 = time.time()
    base_align, base_align_lang, base_align_layer = alignment(mid)
    base = accuracies()
    t_base = time.time() - t0
    log(f"base: middle-layer alignment {base_align:.4f}, XCOPA acc {base['mean']:.4f} (English control "
        f"{base['english_control']:.4f}), {t_base:.0f} s")
    variants = {"middle_soft": ("middle", "soft"), "middle_hard": ("middle", "hard"),
                "early_soft": ("early", "soft"), "late_soft": ("late", "soft")}
    res = {}
    for name, (rng, mode) in variants.items():
        fit = fits[rng]
        if not any(fit.experts.values()):
            res[name] = {"skipped": f"no task experts at tau {tau} in the {rng} layers"}
            log(f"{name}: skipped (no experts)")
            continue
        h = attach_fit(model, fit, mode=mode, lam=args.lam, eps=args.eps)
        try:
            al, al_lang, al_layer = alignment(mid)
            al_own = alignment(fit.layers)[0] if rng != "middle" else al
            acc = accuracies(english=rng == "middle")
        finally:
            h.detach()
        res[name] = {"alignment_middle": al, "alignment_per_lang": al_lang, "alignment_steered_layers": al_own,
                     "alignment_per_layer": al_layer, "acc": acc, "experts": fit.experts}
        log(f"{name}: middle alignment {al:.4f} (base {base_align:.4f}), acc {acc['mean']:.4f} "
            f"(base {base['mean']:.4f}); English control {acc['english_control']}")
    assert all(torch.equal(p, params0[n]) for n, p in model.named_parameters()), "base parameters changed"
    main_v = "middle_soft"
    ok = "acc" in res.get(main_v, {})
    out = {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "tiny random Mixtral (script check only)" if args.tiny else "MoE testbed (SmolLM2-135M, moefy)",
        "fingerprint": fingerprint(model),
        "fit": {"task": task_src, "general": f"flores_sib200/eng_Latn/train (first {len(general)})", "tau": tau,
                "tau_rule": "auto" if args.tau == "auto" else "given", "lam": args.lam, "eps": args.eps,
                "max_delta_per_layer": {l: float(deltas_all[l].max()) for l in moe}},
        "eval": {"xcopa_val_items_per_lang": args.limit, "langs": langs},
        "middle_layers": mid,
        "base_alignment": base_align, "base_alignment_per_lang": base_align_lang,
        "base_alignment_per_layer": base_align_layer,
        "steered_alignment": res[main_v]["alignment_middle"] if ok else None,
        "base_acc": base["mean"], "base_acc_per_lang": base["per_lang"], "base_acc_english": base["english_control"],
        "steered_acc": res[main_v]["acc"]["mean"] if ok else None,
        "main_variant": main_v,
        "early_late_contrast": {k: {"acc": v.get("acc", {}).get("mean"), "alignment_middle": v.get("alignment_middle"),
                                    "alignment_steered_layers": v.get("alignment_steered_layers")}
                                for k, v in res.items()},
        "variants": res,
        "seconds": time.time() - t_start,
        "log": log_lines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
