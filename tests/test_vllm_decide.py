"""The vLLM plugin's routers decide as the HF runtime does, and refuse a non-finite stream (no engine: the
controller's per-layer step on a hand-made prefill of two requests, one shorter than the window count)."""

import pytest
import torch

import retrofit
from retrofit.core.plans import EXECUTE
from retrofit.methods.drllm import window_means
from retrofit.testing import tiny_model


def _controller(tmp_path, skip_bias=0.0):
    from retrofit.serve.check import ServedArtifact
    from retrofit.serve.vllm_model import RetrofitController

    model = tiny_model("llama", num_hidden_layers=4)
    h = retrofit.attach(model, "drllm", allow_repeat=False, skip_bias=skip_bias)
    h.init_routers(seed=3)
    h.save(tmp_path / "routed")
    h.detach()
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    served = ServedArtifact("routed", str(tmp_path / "routed"), {}, L, d)
    c = RetrofitController.__new__(RetrofitController)  # the per-step state only: no vLLM config needed
    c.layers_run, c.sub_batch, c.tokens_mlp_skipped = 0, False, 0
    return c, served, L, d


def _step(served, L, qsl):
    from retrofit.serve.vllm_model import _Step

    rows = len(qsl) - 1
    return _Step(torch.full((rows, L), EXECUTE, dtype=torch.long), qsl, [(r, served) for r in range(rows)],
                 [None] * rows)


def test_plugin_decisions_equal_the_router_forward_on_short_and_long_prompts(tmp_path):
    pytest.importorskip("vllm")
    c, served, L, d = _controller(tmp_path, skip_bias=0.3)
    W = served.config.num_windows
    qsl = [0, 5, 5 + 3 * W]  # 5 tokens (< W windows: the weighted path) and 3 W tokens (the tiled path)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(6):
        c.step = _step(served, L, qsl)
        for i in range(L):
            hidden = torch.randn(qsl[-1], d, generator=gen) * 3
            residual = torch.randn(qsl[-1], d, generator=gen)
            c.run_layer(i, lambda p, x, r: (x, r), None, hidden, residual)
            for r in range(2):
                s, e = qsl[r], qsl[r + 1]
                means, valid = window_means((hidden[s:e] + residual[s:e]).unsqueeze(0), None, W)
                want = (served.routers[i](means, valid) + served.bias).argmax(-1).item()
                assert c.step.acts[r, i].item() == want, (trial, i, r)
                seen.add(want)
    assert seen == {0, 1}  # both skip and execute occur (repeat is masked when served), so the check can fail


def test_plugin_refuses_a_non_finite_stream_instead_of_skipping(tmp_path):
    pytest.importorskip("vllm")
    c, served, L, d = _controller(tmp_path)
    qsl = [0, 5, 30]
    c.step = _step(served, L, qsl)
    hidden = torch.randn(qsl[-1], d)
    hidden[12, 3] = float("nan")  # inside the second request
    with pytest.raises(FloatingPointError, match=r"decoder layer 0 hold NaN or inf \(batch rows \[1\]\)"):
        c.run_layer(0, lambda p, x, r: (x, r), None, hidden, torch.zeros_like(hidden))
