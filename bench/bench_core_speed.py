"""Wall time of generate() on SmolLM2-135M with a plan skipping k of 30 layers vs all-execute, same process.

ideal saving  = the skipped layers' own measured time in the all-execute run (per-layer timers on every
                decoder call of an instrumented all-execute generate(), summed over the skipped layers);
realised      = (base_s - plan_s) / ideal saving, with base_s / plan_s the median of interleaved,
                uninstrumented generate() runs.
layer_s       = mean time of one decoder-layer call (one token step or the prefill) in the instrumented run.
router_overhead = time spent in the routers (window pooling + MLP for every layer, at prefill) divided by
                the time of one all-execute prefill forward of the same prompt.

    python bench/bench_core_speed.py --skip 5 --new-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.models import load_model

PROMPT = ("Question: Which of these would most likely help a plant grow taller in a dark room? "
          "Options: a lamp, a rock, a bucket of sand, a blanket.\nAnswer:")


def timed_generate(model, ids, n):
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/core_speed.json")
    args = ap.parse_args()

    model, tok = load_model("default")
    L = model.config.num_hidden_layers
    ids = tok(PROMPT, return_tensors="pt").input_ids
    adapter = get_adapter(model)
    h = retrofit.attach(model, "drllm")
    # Skip k layers from the upper-middle of the stack (the search/prune code picks them for accuracy; any k
    # layers cost the same here).
    skipped = list(range(L - 2 - args.skip, L - 2))
    plan = ["skip" if i in skipped else "execute" for i in range(L)]

    # 1. instrumented all-execute run: per-layer time on every call
    layer_time = [0.0] * L
    calls = [0] * L
    starts = {}
    hooks = []
    for i, layer in enumerate(adapter.layers(model)):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter())))

        def post(m, a, o, i=i):
            layer_time[i] += time.perf_counter() - starts[i]
            calls[i] += 1
        hooks.append(layer.register_forward_hook(post))
    h.set_plan(None)
    timed_generate(model, ids, 4)  # warm-up
    layer_time = [0.0] * L
    calls = [0] * L
    timed_generate(model, ids, args.new_tokens)
    for hk in hooks:
        hk.remove()
    steps = calls[0]
    layer_s = sum(layer_time) / sum(calls)
    ideal_saving = sum(layer_time[i] for i in skipped)

    # 2. interleaved uninstrumented runs
    base_t, plan_t = [], []
    for _ in range(args.repeats):
        h.set_plan(None)
        t, out_base = timed_generate(model, ids, args.new_tokens)
        base_t.append(t)
        h.set_plan(plan)
        t, out_plan = timed_generate(model, ids, args.new_tokens)
        plan_t.append(t)
        assert h.stats()["mean_layers_executed"] > 0
    base_s, plan_s = statistics.median(base_t), statistics.median(plan_t)
    realised = (base_s - plan_s) / ideal_saving

    # 3. router overhead: time inside the routers (window pooling + MLP for every layer, at prefill) against one
    # prefill forward of the same prompt with routers deciding. The routers' cost does not grow with the prompt
    # (8 window means per layer) while the forward does, so it is measured at several prompt lengths; it is
    # also given against the whole generate() call, since routers run only at prefill.
    h.set_plan(None)
    h.init_routers(seed=0)
    decide_time = [0.0]
    orig_decide = h._decide

    def timed_decide(i, hidden):
        t = time.perf_counter()
        orig_decide(i, hidden)
        decide_time[0] += time.perf_counter() - t
    h._decide = timed_decide
    long_text = (PROMPT + " ") * 64
    overhead_by_len = {}
    decide_by_len = {}
    for n_tok in (int(ids.shape[1]), 128, 512):
        ids_n = ids if n_tok == ids.shape[1] else tok(long_text, return_tensors="pt").input_ids[:, :n_tok]
        fwd, dec = [], []
        with torch.no_grad():
            model(ids_n, use_cache=False)  # warm-up
            for _ in range(args.repeats):
                decide_time[0] = 0.0
                t = time.perf_counter()
                model(ids_n, use_cache=False)
                fwd.append(time.perf_counter() - t)
                dec.append(decide_time[0])
        overhead_by_len[n_tok] = round(statistics.median(dec) / statistics.median(fwd), 5)
        decide_by_len[n_tok] = round(statistics.median(dec), 6)
    h._decide = orig_decide
    router_overhead = overhead_by_len[int(ids.shape[1])]
    router_overhead_generate = decide_by_len[int(ids.shape[1])] / base_s
    h.detach()

    result = {
        "layers": L,
        "layers_skipped": args.skip,
        "skipped_layers": skipped,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "forward_calls": steps,
        "base_s": round(base_s, 4),
        "plan_s": round(plan_s, 4),
        "base_runs_s": [round(x, 4) for x in base_t],
        "plan_runs_s": [round(x, 4) for x in plan_t],
        "layer_s": layer_s,
        "ideal_saving_s": round(ideal_saving, 4),
        "realised_fraction": round(realised, 4),
        "realised_fraction_definition": "(base_s - plan_s) / sum over skipped layers of their measured time "
                                        "over all forward calls (prefill + each decode step) of an instrumented "
                                        "all-execute generate()",
        "router_overhead": round(router_overhead, 5),
        "router_overhead_definition": "time inside the routers at prefill / one prefill forward of the bench "
                                      "prompt (median of --repeats); by prompt length below",
        "router_overhead_by_prompt_tokens": overhead_by_len,
        "router_seconds_by_prompt_tokens": decide_by_len,
        "router_overhead_vs_generate": round(router_overhead_generate, 5),
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
