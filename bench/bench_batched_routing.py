"""Routers that save time in batches (issue 16): HF generate() with per-row plans on per-layer sub-batches.

SmolLM2-135M-Instruct, greedy generate() of --new-tokens tokens after ARC-Easy validation questions (left
padded), batches 1, 4 and 16. Every row has its own plan, drawn so that the mean layer fraction is about 0.8:
row r skips k_r layers (k_r uniform in 4..8, mean 6 of 30), chosen without replacement with probabilities
proportional to how often the search labels skip each layer (``label_skip_share`` in
bench/results/drllm_labels.json), so the skips spread over the stack the way trained routers' do.

ideal saving  = for each row, the share of an instrumented all-execute run of the same batch taken by the layers
                it skips (per-layer timers on every decoder-layer call: prefill + each decode step), averaged
                over the rows, times base_s (each layer's time is the whole batch's, so the average row's share);
realised      = (base_s - plan_s) / ideal saving, with base_s (all execute) and plan_s (per-row plans) the
                medians of alternating, uninstrumented generate() runs in the same process. At batch 16 the
                same plans also run on the all-rows path (``handle.sub_batch = False``, the runtime before).
control       = the same batch with one plan for every row (same mean number of skips, the rows' most skipped
                layers): no sub-batches, so it shows what the skipped layers are worth when no row runs them;
                the decode-layer cost by rows shows what a sub-batch of k rows still costs.
clock         = this process's CPU time (--clock cpu, the default: the machine is shared, wall time counts other
                jobs' turns on the core); --clock wall for wall time.
router overhead = time inside the routers at prefill (window pooling + MLP + the routing of the rows, for all
                30 layers; untrained routers biased to execute every layer, so the forward is the base one)
                divided by an all-execute prefill forward of the same prompt without routers, alternating,
                median of --overhead-repeats, at 37 and 128 prompt tokens; with the CPU router kernel
                (retrofit/kernels/router_cpu.c, the default where it builds) and, in the same alternation, with
                the torch decision path (RETROFIT_ROUTER_KERNEL=0): overhead / overhead_torch_path.

    python bench/bench_batched_routing.py --new-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.core.data import load_task
from retrofit.kernels import router_cpu
from retrofit.methods.drllm.runtime import layer_cost_by_rows
from retrofit.models import load_model

PROMPT = ("Question: Which of these would most likely help a plant grow taller in a dark room? "
          "Options: a lamp, a rock, a bucket of sand, a blanket.\nAnswer:")
LABELS = Path(__file__).parent / "results" / "drllm_labels.json"


def draw_plans(n_rows: int, n_layers: int, seed: int) -> list[list[str]]:
    shares = json.loads(LABELS.read_text())["new_path_tree_confident"]["label_skip_share"]
    if len(shares) != n_layers:
        raise ValueError(f"{LABELS} has skip shares for {len(shares)} layers, the model has {n_layers}")
    rng = random.Random(seed)
    plans = []
    for _ in range(n_rows):
        k = rng.randint(4, 8)
        pool = list(range(n_layers))
        w = list(shares)
        skipped = []
        for _ in range(k):  # weighted draw without replacement
            j = rng.choices(range(len(pool)), weights=w)[0]
            skipped.append(pool.pop(j))
            w.pop(j)
        plans.append(["skip" if i in skipped else "execute" for i in range(n_layers)])
    return plans


def batch_inputs(tok, prompts):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


# The clock: this process's CPU time by default. The machine is shared (2 cores, other jobs), so wall time
# also counts the time other processes hold the core; with one torch thread CPU time is our own work.
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def timed_generate(model, ids, mask, n):
    t = clock()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return clock() - t, out


def layer_times(model, ids, mask, n):
    """Per-layer wall time summed over every decoder-layer call of an all-execute generate()."""
    layers = get_adapter(model).layers(model)
    spent = [0.0] * len(layers)
    starts = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, clock())))

        def post(m, a, o, i=i):
            spent[i] += clock() - starts[i]
        hooks.append(layer.register_forward_hook(post))
    try:
        total, _ = timed_generate(model, ids, mask, n)
    finally:
        for hk in hooks:
            hk.remove()
    return spent, total


def uniform_plans(plans):
    """One plan for every row with the same number of skips as the rows' mean, on the most skipped layers."""
    n_layers = len(plans[0])
    k = round(statistics.mean(p.count("skip") for p in plans))
    votes = sorted(range(n_layers), key=lambda i: (-sum(p[i] == "skip" for p in plans), i))[:k]
    return [["skip" if i in votes else "execute" for i in range(n_layers)]] * len(plans)


def measure_batch(model, h, ids, mask, plans, n, repeats, all_rows=False):
    h.set_plan(None)  # no routers attached: every layer executes
    timed_generate(model, ids, mask, 4)  # warm-up
    spent, total = layer_times(model, ids, mask, n)
    # each row's skipped layers' share of the instrumented run, averaged over rows, times the base median
    # (a repeated layer costs its time once more: a negative saving)
    share = statistics.mean(sum(t if a == "skip" else -t if a == "repeat" else 0.0 for t, a in zip(spent, p))
                            for p in plans) / total
    runs = {"base": [], "plan": []}
    if all_rows:
        runs["all_rows"] = []
    outs = {}
    for _ in range(repeats):
        for kind in runs:
            h.set_plan(None if kind == "base" else plans)
            h.sub_batch = kind != "all_rows"
            t, out = timed_generate(model, ids, mask, n)
            runs[kind].append(t)
            outs[kind] = out
    h.sub_batch = True
    h.set_plan(None)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ideal = share * med["base"]
    res = {
        "rows": int(ids.shape[0]),
        "prompt_tokens_padded": int(ids.shape[1]),
        "mean_layer_fraction": round(statistics.mean(p.count("execute") + 2 * p.count("repeat") for p in plans)
                                     / len(plans[0]), 4),
        "instrumented_s": round(total, 4),
        "layer_s_total": round(sum(spent), 4),
        "ideal_share": round(share, 4),
        "ideal_saving_s": round(ideal, 4),
        "base_s": round(med["base"], 4),
        "plan_s": round(med["plan"], 4),
        "realised_fraction": round((med["base"] - med["plan"]) / ideal, 4),
        "runs_s": {k: [round(x, 4) for x in v] for k, v in runs.items()},
    }
    if all_rows:
        res["all_rows_s"] = round(med["all_rows"], 4)
        res["all_rows_realised_fraction"] = round((med["base"] - med["all_rows"]) / ideal, 4)
        res["all_rows_outputs_equal"] = bool(torch.equal(outs["all_rows"], outs["plan"]))
    return res


def decode_layer_cost_by_rows(model, rows=(1, 2, 4, 8, 12, 16), context=64, calls=30):
    """One decode-step call of the middle decoder layer for k rows (the runtime's layer_cost_by_rows, wall time,
    median of ``calls``) relative to all rows: how much of a block a sub-batch of k rows still costs here."""
    out = layer_cost_by_rows(model, rows, context=context, calls=calls)
    full = out[max(rows)]
    return {str(k): round(v / full, 4) for k, v in out.items()}, round(full, 6)


def router_overhead(model, tok, repeats):
    """Time inside the routers at prefill / an all-execute prefill forward without routers (alternating)."""
    ids37 = tok(PROMPT, return_tensors="pt").input_ids
    long_ids = tok((PROMPT + " ") * 8, return_tensors="pt").input_ids
    h = retrofit.attach(model, "drllm", skip_bias=-1e4, repeat_bias=-1e4)  # routers run, every layer executes
    h.init_routers(seed=0)
    spent = [0.0]
    decide = h._decide

    def timed_decide(i, hidden):
        t = clock()
        decide(i, hidden)
        spent[0] += clock() - t
    h._decide = timed_decide
    switch_before = os.environ.get(router_cpu.ENV_SWITCH, "1")
    out = {}
    try:
        for n_tok in (int(ids37.shape[1]), 128):
            x = ids37 if n_tok == ids37.shape[1] else long_ids[:, :n_tok]
            base, routed, rt, rt_torch = [], [], [], []
            with torch.no_grad():
                for _ in range(2):  # warm-up
                    model(x, use_cache=False)
                for _ in range(repeats):
                    routers, h.routers = h.routers, None  # no routers: the plain all-execute forward
                    t = clock()
                    model(x, use_cache=False)
                    base.append(clock() - t)
                    h.routers = routers
                    for switch, spent_list in (("1", rt), ("0", rt_torch)):  # the C kernel, then the torch path
                        os.environ[router_cpu.ENV_SWITCH] = switch
                        spent[0] = 0.0
                        t = clock()
                        model(x, use_cache=False)
                        if switch == "1":
                            routed.append(clock() - t)
                        spent_list.append(spent[0])
                        if h.last_plans[0] != ["execute"] * len(h.last_plans[0]):
                            raise RuntimeError("the biased routers should execute every layer")
                    os.environ[router_cpu.ENV_SWITCH] = switch_before
            out[str(n_tok)] = {
                "prompt_tokens": int(x.shape[1]),
                "router_s": round(statistics.median(rt), 6),
                "base_forward_s": round(statistics.median(base), 5),
                "routed_forward_s": round(statistics.median(routed), 5),
                "overhead": round(statistics.median(rt) / statistics.median(base), 5),
                "router_s_torch_path": round(statistics.median(rt_torch), 6),
                "overhead_torch_path": round(statistics.median(rt_torch) / statistics.median(base), 5),
                "overhead_by_forward_delta": round(
                    (statistics.median(routed) - statistics.median(base)) / statistics.median(base), 5),
            }
    finally:
        os.environ[router_cpu.ENV_SWITCH] = switch_before
        h._decide = decide
        h.detach()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--overhead-repeats", type=int, default=15)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--extra-batches", default="64",
                    help="larger batches measured after the rest (fewer repeats), where a decode step's matrix "
                         "products are compute-bound and a sub-batch costs its rows ('' to skip)")
    ap.add_argument("--extra-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu",
                    help="cpu: this process's CPU time (default; the machine is shared); wall: wall time")
    ap.add_argument("--routers", default="bench/results/routers_drllm_arc_easy",
                    help="trained routers whose own plans for the batch's prompts are measured too ('' to skip)")
    ap.add_argument("--out", default="bench/results/batched_routing.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCK[args.clock]
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]  # other jobs on the machine (the clock is this process's CPU time)

    model, tok = load_model("default")
    model.generation_config.eos_token_id = None  # every row generates --new-tokens tokens
    L = model.config.num_hidden_layers
    batches = [int(b) for b in args.batches.split(",")]
    B = max(batches)
    extra = [int(b) for b in args.extra_batches.split(",") if b.strip()]
    n_prompts = max([B, *extra])
    prompts = [ex.prompt for ex in load_task("arc_easy", split="validation", limit=n_prompts)]
    if len(prompts) < n_prompts:
        raise SystemExit(f"ARC-Easy validation has {len(prompts)} questions; --batches / --extra-batches ask for "
                         f"{n_prompts}")
    plans = draw_plans(n_prompts, L, args.seed)  # row r's plan does not depend on how many rows are drawn

    overhead = router_overhead(model, tok, args.overhead_repeats)

    h = retrofit.attach(model, "drllm")
    by_batch = {}
    for b in batches:
        ids, mask = batch_inputs(tok, prompts[:b])
        by_batch[str(b)] = measure_batch(model, h, ids, mask, plans[:b], args.new_tokens, args.repeats,
                                         all_rows=b == B and b > 1)
        print(b, json.dumps(by_batch[str(b)]), flush=True)
    for b in extra:  # a row's plan is the same as at the smaller batches (draw_plans is sequential)
        ids, mask = batch_inputs(tok, prompts[:b])
        by_batch[str(b)] = measure_batch(model, h, ids, mask, plans[:b], args.new_tokens, args.extra_repeats)
        print(b, json.dumps(by_batch[str(b)]), flush=True)
    plans = plans[:B]
    ids, mask = batch_inputs(tok, prompts[:B])
    # the same mixed plans with sub-batches padded to the sizes this machine runs cheapest (calibrate_sub_batches)
    calibration = h.calibrate_sub_batches(B)
    calibrated = measure_batch(model, h, ids, mask, plans[:B], args.new_tokens, args.repeats)
    calibrated["sizes"] = list(calibration["sizes"])
    calibrated["cost_by_rows_s"] = {str(k): round(v, 6) for k, v in calibration["cost_by_rows"].items()}
    h.sub_batch_sizes = None
    print("calibrated", json.dumps(calibrated), flush=True)
    uniform = measure_batch(model, h, ids, mask, uniform_plans(plans), args.new_tokens, args.repeats)
    print("uniform", json.dumps(uniform), flush=True)
    h.detach()
    routed = None
    if args.routers:  # the trained routers' own plans for these prompts (a prefill through the routers)
        hr = retrofit.load(model, args.routers)
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=False)
        router_plans = hr.last_plans
        hr.detach()
        h = retrofit.attach(model, "drllm")
        routed = measure_batch(model, h, ids, mask, router_plans, args.new_tokens, args.repeats)
        routed["plans"] = ["".join(a[0] for a in p) for p in router_plans]
        routed["distinct_plans"] = len(set(routed["plans"]))
        h.detach()
        print("routers", json.dumps(routed), flush=True)
    cost_by_rows, full_call_s = decode_layer_cost_by_rows(model, rows=tuple(range(1, B + 1)))
    # what this machine allows at decode: each layer's saving if a sub-batch cost exactly the measured layer cost
    # of its (padded) size and nothing else, against the ideal (B - n) / B of the layer
    multiple = 2  # the runtime's default sub_batch_multiple
    saving = ideal = 0.0
    for i in range(L):
        n = sum(p[i] != "skip" for p in plans)
        size = n if n in (0, B) else min(B, -(-n // multiple) * multiple)
        saving += 1.0 - (cost_by_rows[str(size)] if size else 0.0)
        ideal += (B - n) / B
    decode_bound = round(saving / ideal, 4)

    big = by_batch[str(B)]
    result = {
        "hf_batch": B,
        "hf_mixed_realised_fraction": big["realised_fraction"],
        "hf_by_batch": {k: v["realised_fraction"] for k, v in by_batch.items()},
        "hf_extra_batches": extra,
        "hf_extra_batches_definition": "batches above hf_batch (in hf_by_batch too), median of --extra-repeats: "
                                       "the same drawn plans where a decode step's matrix products are "
                                       "compute-bound, so a sub-batch's cost follows its rows",
        "hf_all_rows_realised_fraction": big.get("all_rows_realised_fraction"),
        "hf_details": by_batch,
        "hf_calibrated_realised_fraction": calibrated["realised_fraction"],
        "hf_calibrated_details": calibrated,
        "hf_calibrated_definition": "the batch's mixed plans with handle.calibrate_sub_batches(hf_batch) first: "
                                    "each pass padded to the cheapest measured size at or above its rows",
        "hf_uniform_plan_realised_fraction": uniform["realised_fraction"],
        "hf_uniform_plan_details": uniform,
        "hf_uniform_plan_definition": "control at the same batch: every row gets one plan with the rows' mean "
                                      "number of skips on their most skipped layers (no sub-batches: a skipped "
                                      "layer runs for no row)",
        "hf_router_plans_realised_fraction": routed["realised_fraction"] if routed else None,
        "hf_router_plans_details": routed,
        "hf_router_plans_definition": f"the same batch, each row under the plan the trained routers ({args.routers}) "
                                      "choose from its prompt (per-layer sub-batches where the rows' plans differ)",
        "decode_layer_cost_by_rows": cost_by_rows,
        "decode_layer_call_s_all_rows": full_call_s,
        "decode_bound_fraction": decode_bound,
        "decode_bound_definition": "sum over layers of (1 - cost of the layer's padded sub-batch / cost for all "
                                   "rows) over sum of (rows skipping it / rows): the realised fraction a decode "
                                   "step would reach at batch hf_batch if a sub-batch cost only its measured size",
        "decode_layer_cost_definition": "one decode-step call of layer 15 for k rows (64 cached tokens), median of "
                                        "30 (wall time), relative to the call for all rows",
        "plans": ["".join(a[0] for a in p) for p in plans],
        "plans_definition": "row r skips k_r ~ U{4..8} layers drawn without replacement with probability "
                            "proportional to the search labels' per-layer skip share (drllm_labels.json)",
        "realised_fraction_definition": "(base_s - plan_s) / ideal, ideal = base_s x mean over rows of the skipped "
                                        "layers' share of an instrumented all-execute generate() of the same batch",
        "vllm_router_speedup": None,
        "vllm_ideal_speedup": None,
        "vllm_outputs_match_hf": None,
        "router_overhead_37": overhead[next(iter(overhead))]["overhead"],
        "router_overhead_128": overhead["128"]["overhead"],
        "router_overhead_details": overhead,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "clock": "process CPU time" if args.clock == "cpu" else "wall time",
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
                   f"{os.cpu_count()} cores, load average {load_before:.2f} at the start",
        "router_kernel": router_cpu.load() is not None,
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
    }
    out = Path(args.out)
    if out.is_file():  # bench_vllm.py --out-batched writes the vllm_* keys into the same file: keep them
        old = json.loads(out.read_text())
        result.update({k: v for k, v in old.items() if k.startswith("vllm_")})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("hf_details", "router_overhead_details")},
                     indent=2))


if __name__ == "__main__":
    main()
