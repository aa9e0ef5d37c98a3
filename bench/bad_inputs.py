"""Issue 14's probes: every bad input against the real CLI (and, with ``--server``, a real vLLM server started by
`retrofit serve`), one line each: the input, the exit code or HTTP status, the first line of the message, whether
a traceback appeared, and whether earlier results are intact. A bad input must be refused (exit 2 / HTTP 400)
with a message and no traceback; control probes (marked ``ok``) must succeed.

Tiny random models (a Llama with SmolLM2's tokenizer, an OLMoE, a GPT-2) are built in a temporary folder; the
server probes serve SmolLM2-135M with a router artifact and a static-plan artifact.

Usage (writes bench/results/bad_inputs.json; the table goes to BENCHMARKS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bad_inputs.py [--server]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLI = [sys.executable, "-m", "retrofit.cli"]
RESULTS: list[dict] = []


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.read_bytes() if p.is_file() else b"<absent>")
    return h.hexdigest()


def _message(text: str) -> str:
    """The first line of the error: rich's error box flattened, else the last non-empty line."""
    box = [ln.strip().strip("│").strip() for ln in text.splitlines() if ln.strip().startswith("│")]
    msg = " ".join(b for b in box if b) if box else next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
    msg = re.sub(r"\s+", " ", msg).strip()
    return msg[:160] + ("…" if len(msg) > 160 else "")


def record(name: str, shown: str, outcome, message: str, traceback: bool, intact, expect: str):
    ok = (outcome in (0, 200)) if expect == "ok" else (outcome in (2, 400) and not traceback and bool(message))
    RESULTS.append({"probe": name, "input": shown, "outcome": outcome, "message": message, "traceback": traceback,
                    "intact": intact, "expect": expect, "pass": bool(ok and intact is not False)})
    print(f"{'PASS' if RESULTS[-1]['pass'] else 'FAIL'} | {name} | {shown} | {outcome} | {message} | "
          f"traceback={traceback} | intact={intact}", flush=True)


def cli(name, args, expect="refused", watch=(), env=None, shown=None, cwd=None):
    before = _digest(watch) if watch else None
    e = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200", **(env or {}))
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=e, timeout=900, cwd=cwd)
    out = p.stdout + p.stderr
    intact = (_digest(watch) == before) if watch else None
    record(name, shown or "retrofit " + " ".join(map(str, args)), p.returncode,
           _message(p.stderr if p.returncode else p.stdout), "Traceback" in out, intact, expect)
    return p


# -------------------------------------------------------------------------------------------------- fixtures
def build(tmp: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    import retrofit
    from retrofit.artifacts import TENSORS_NAME
    from retrofit.models import default_model_dir
    from retrofit.testing import tiny_model

    tok_files = [f for f in default_model_dir().iterdir()
                 if f.name.startswith("tok") or f.name == "chat_template.jinja"]
    f = {}

    def folder(model, name):
        d = tmp / name
        model.save_pretrained(d)
        for t in tok_files:
            shutil.copy(t, d)
        return d

    llama = tiny_model("llama", vocab_size=49152)
    f["model"] = folder(llama, "tiny-llama")
    other = tiny_model("llama", seed=1, vocab_size=49152)
    for name, m, kw in (("routers", llama, {}), ("foreign", other, {})):
        h = retrofit.attach(m, "drllm", bottleneck=8, **kw)
        h.init_routers(seed=0)
        h.save(tmp / name)
        h.detach()
        f[name] = tmp / name
    f["nan"] = tmp / "nan"
    shutil.copytree(f["routers"], f["nan"])
    t = load_file(str(f["nan"] / TENSORS_NAME))
    t[sorted(t)[0]][0] = float("nan")
    save_file(t, str(f["nan"] / TENSORS_NAME))
    f["missing"] = tmp / "missing"
    shutil.copytree(f["routers"], f["missing"])
    (f["missing"] / TENSORS_NAME).unlink()
    olmoe = tiny_model("olmoe")
    f["olmoe"] = folder(olmoe, "tiny-olmoe")
    h = retrofit.attach(olmoe, "reroute", steps=1)
    h.save(tmp / "reroute")
    h.detach()
    f["reroute"] = tmp / "reroute"
    f["gpt2"] = folder(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=49152)), "tiny-gpt2")
    (tmp / "empty").mkdir()
    f["empty"] = tmp / "empty"
    # a task file for searches (question / choices / answer)
    task = tmp / "toy.jsonl"
    task.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} plus {i}?",
                                        "choices": [str(2 * i), str(2 * i + 1), "7"], "answer": 0}) + "\n"
                            for i in range(3)))
    f["task"] = task
    # data with a malformed split file
    bad = tmp / "baddata" / "arc_easy"
    bad.mkdir(parents=True)
    good = {"id": "q1", "question": "x?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    for split in ("train", "validation", "test"):
        (bad / f"{split}.jsonl").write_text(json.dumps(good) + "\n" + '{"id": "q2", "question": "x"\n')
    f["baddata"] = tmp / "baddata"
    torch.manual_seed(0)
    return f


def cli_probes(f: dict, tmp: Path, data: Path | None):
    m = f["model"]
    serve = ["serve", "--dry-run", "--model"]
    cli("serve: plan of the wrong length", serve + [m, "--plan", "eee"])
    cli("serve: repeat plan", serve + [m, "--plan", "eree"])
    cli("serve: --plan with --artifact", serve + [m, "--plan", "eses", "--artifact", f"r={f['routers']}"])
    cli("serve: --plan with --request-plans", serve + [m, "--plan", "eses", "--request-plans"])
    cli("serve: NaN router tensors", serve + [m, "--artifact", f"n={f['nan']}"])
    cli("serve: missing tensor file", serve + [m, "--artifact", f"m={f['missing']}"])
    cli("serve: another model's artifact", serve + [m, "--artifact", f"o={f['foreign']}"])
    cli("serve: reroute artifact", serve + [f["olmoe"], "--artifact", f"x={f['reroute']}"])
    cli("serve: unserved architecture", serve + [f["gpt2"], "--plan", "ee"])
    cli("serve: model folder missing", serve + [tmp / "nowhere"])
    cli("serve: good artifact (control)", serve + [m, "--artifact", f"r={f['routers']}", "--request-plans"],
        expect="ok")

    out = tmp / "s.jsonl"
    search = ["search", "--task", f["task"], "--model", m, "--simulations", "4", "--heldout", "0",
              "--no-progress", "--out", out]
    cli("search: --budget abc", search + ["--budget", "abc"])
    cli("search: --simulations 0", search[:5] + ["--simulations", "0", "--out", out])
    cli("search: --model missing", search[:3] + ["--model", tmp / "nowhere", "--out", out])
    cli("search: --model without config.json", search[:3] + ["--model", f["empty"], "--out", out])
    cli("search: unsupported family", search[:3] + ["--model", f["gpt2"], "--out", out])
    cli("search: first run (control)", search, expect="ok")
    cli("search: resume with other settings", search[:5] + ["--simulations", "5"] + search[7:], watch=[out])
    from retrofit.search.run import output_lock

    with output_lock(out):
        cli("search: second search on the same --out", search, watch=[out])
    lines = out.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:50] + "\n"
    out.write_text("".join(lines))
    cli("search: resume over a corrupt middle line", search, watch=[out])
    cli("train: search file with a corrupt line", ["train", "--searches", out, "--out", tmp / "r", "--model", m],
        watch=[out])
    good = [ln for i, ln in enumerate(lines) if i != 1]
    p = cli("search --repair (control)", search + ["--repair"], expect="ok")
    kept = out.read_text().startswith("".join(good)) and len(out.read_text().splitlines()) == 3
    RESULTS[-1]["intact"] = kept and (tmp / "s.jsonl.dropped").read_text() == lines[1]
    RESULTS[-1]["pass"] = RESULTS[-1]["pass"] and RESULTS[-1]["intact"]
    del p

    ev = ["eval", "--tasks", "arc_easy", "--model", m, "--no-plot", "--out", tmp / "ev"]
    cli("eval: --set num_windows=true", ev + ["--method", "drllm", "--set", "num_windows=true"])
    cli("eval: unknown method", ev + ["--method", "foo"])
    cli("eval: malformed split file", ev + ["--data", f["baddata"]])
    cli("eval: missing data folder", ev + ["--data", tmp / "nodata"])
    cli("eval: --model without config.json", ev[:3] + ["--model", f["empty"], "--no-plot", "--out", tmp / "ev"]
        + (["--data", data] if data else []))
    if data is not None:
        res = tmp / "ev" / "mine.json"
        res.parent.mkdir(exist_ok=True)
        res.write_text(json.dumps({"run": "mine", "model": "default", "method": "drllm", "routers": "routers/a",
                                   "config": {}, "limit": 20, "tasks": {"retrofit_arc_easy_val": {"acc": 0.5}}}))
        cli("eval: other settings into an earlier result", ["eval", "--tasks", "arc_easy_val", "--method", "drllm",
            "--routers", "routers/a", "--limit", "40", "--name", "mine", "--out", tmp / "ev", "--data", data,
            "--no-plot"], watch=[res])
    cli("lm-eval: --device cuda without CUDA", ["lm-eval", "run", "--model", "retrofit", "--tasks",
                                                "retrofit_arc_easy", "--device", "cuda"])
    cli("misa distill: RETROFIT_DATA without the corpus", ["misa", "distill", "--steps", "1"],
        env={"RETROFIT_DATA": str(tmp / "mydata")}, cwd=tmp)


# -------------------------------------------------------------------------------------------------- server
def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def server_probes(tmp: Path):
    import retrofit
    from retrofit.models import load_model
    from retrofit.serve.launch import free_port

    model, _ = load_model("default")
    h = retrofit.attach(model, "drllm", allow_repeat=False, skip_bias=-0.5)
    h.init_routers(seed=0)
    h.save(tmp / "routed")
    h.detach()
    h = retrofit.attach(model, "drllm", plan=["skip" if i in (6, 11, 16, 21, 25) else "execute" for i in range(30)])
    h.save(tmp / "skip5")
    h.detach()
    del model
    port = free_port()
    log = open(tmp / "server.log", "w")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(CLI + ["serve", "--artifact", f"routed={tmp / 'routed'}", "--artifact",
                                   f"skip5={tmp / 'skip5'}", "--request-plans", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while time.time() - t0 < 900:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        name = "smollm2-135m-instruct"
        prompt = "Question: Which gas do animals breathe out?\nAnswer:"
        for label, xargs, expect in [
                ("server: unknown artifact name", {"retrofit": "arcc"}, "refused"),
                ("server: plan of the wrong length", {"retrofit_plan": "ee"}, "refused"),
                ("server: empty plan", {"retrofit_plan": ""}, "refused"),
                ("server: malformed plan", {"retrofit_plan": "exq"}, "refused"),
                ("server: repeat in a plan", {"retrofit_plan": "r" + "e" * 29}, "refused"),
                ("server: look-alike key retrofitt", {"retrofitt": "routed"}, "refused"),
                ("server: look-alike key retrofit_plans", {"retrofit_plans": "e" * 30}, "refused"),
                ("server: README prompt, base model (control)", {"retrofit": "none"}, "ok"),
                ("server: README prompt, router artifact (control)", {"retrofit": "routed"}, "ok")]:
            status, body = _post(base + "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 16,
                                                             "temperature": 0, "vllm_xargs": xargs})
            if status == 200:
                text = body["choices"][0]["text"]
                msg = f"text {text!r}, finish_reason {body['choices'][0]['finish_reason']}"
                if expect == "ok" and not text.strip():
                    status = "200 (empty)"
            else:
                msg = _message(str(body.get("error", {}).get("message", body)))
            record(label, f"vllm_xargs={json.dumps(xargs)}", status, msg, "Traceback" in msg, None, expect)
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            text = r.read().decode()
        counts = dict(re.findall(r"^(retrofit_\w+_total)(?:\{[^}]*\})? (\S+)$", text, re.M))
        record("server: /metrics layer passes saved (control)", "GET /metrics",
               200 if float(counts.get("retrofit_layer_passes_saved_total", 0)) > 0 else "no counter",
               ", ".join(f"{k} {float(v):g}" for k, v in sorted(counts.items())), False, None, "ok")
        logged = re.findall(r"retrofit: request left the batch: (\d+/\d+) decoder layers", (tmp / "server.log")
                            .read_text())
        record("server: layers executed per request in the log (control)", "server.log", 200 if logged else "none",
               f"{len(logged)} requests logged, e.g. {logged[:3]}", False, None, "ok")
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", action="store_true", help="also start a vLLM server and probe it")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bad_inputs.json"))
    a = ap.parse_args()
    from retrofit.core.data import data_dir

    data = data_dir() if (data_dir() / "arc_easy").is_dir() else None
    tmp = Path(tempfile.mkdtemp(prefix="retrofit-bad-inputs-"))
    t0 = time.time()
    try:
        f = build(tmp)
        cli_probes(f, tmp, data)
        if a.server:
            server_probes(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [r for r in RESULTS if not r["pass"]]
    summary = {"probes": len(RESULTS), "failed": len(bad), "tracebacks": sum(r["traceback"] for r in RESULTS),
               "silent_successes": sum(r["expect"] == "refused" and r["outcome"] in (0, 200) for r in RESULTS),
               "seconds": round(time.time() - t0),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"summary": summary, "probes": RESULTS}, indent=1, ensure_ascii=False)
    Path(a.out).write_text(text.replace(str(tmp), "T") + "\n")  # T: the temporary folder
    print(json.dumps(summary))
    print("\n| probe | input | outcome | first line of the message | traceback | earlier results |")
    print("|---|---|---|---|---|---|")
    for r in RESULTS:
        shown = r["input"].replace(str(tmp), "T").replace("|", "\\|")
        msg = r["message"].replace(str(tmp), "T").replace("|", "\\|")
        intact = {None: "", True: "intact", False: "CHANGED"}[r["intact"]]
        print(f"| {r['probe']} | `{shown[:90]}` | {r['outcome']} | {msg} | {'yes' if r['traceback'] else 'no'} | "
              f"{intact} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
