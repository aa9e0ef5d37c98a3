"""The CPU router kernel (retrofit/kernels/router_cpu.c): the same decisions and logits as the torch decision path,
counts that match its codes, NaN input caught, and the runtime's routed forward unchanged whether it is on or off.

Skips (with the reason) where no C compiler can build it; the runtime then uses the torch path, which the rest of
the suite covers.
"""

import pytest
import torch
from torch import nn

import retrofit
from retrofit.kernels import router_cpu
from retrofit.methods.drllm.router import Router, decision_codes, decision_tables, window_matrix, window_weights
from retrofit.testing import tiny_model

FN = router_cpu.load()
pytestmark = pytest.mark.skipif(FN is None, reason="the CPU router kernel could not be built here (no C compiler)")


def _routers(d, b, n, seed):
    torch.manual_seed(seed)
    rs = [Router(d, b) for _ in range(n)]
    for r in rs:
        nn.init.normal_(r.fc1.bias, std=0.5)
        nn.init.normal_(r.fc2.bias)
    return rs


def _reference_logits(r, means, weights, bias):
    F = nn.functional
    hid = F.gelu(F.linear(means, r.fc1.weight, r.fc1.bias), approximate="tanh")
    return F.linear(torch.bmm(weights, hid).squeeze(1), r.fc2.weight, r.fc2.bias) + bias


@pytest.mark.parametrize("d,b,W,B,T", [(576, 128, 8, 3, 37), (64, 40, 3, 2, 5), (48, 16, 10, 4, 7),
                                       (100, 33, 1, 1, 1), (32, 70, 17, 3, 40)])
def test_kernel_equals_the_torch_decision_path(d, b, W, B, T):
    """Bottlenecks that are and are not multiples of 32, more windows than a block of 8, windows left empty by a
    short left-padded row: the logits agree to float rounding, the codes exactly, the counts are the codes'."""
    rs = _routers(d, b, 3, seed=d + b)
    bias = torch.tensor([0.3, 0.0, -0.2])
    kernel = router_cpu.RouterKernel(FN, rs, bias)
    tables = decision_tables(rs, bias, W, "cpu")
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : max(T - 4, 0)] = 0  # row 0 keeps 4 tokens: with W > 4 some of its windows are empty
    A, valid = window_matrix(mask, W)
    weights = window_weights(valid)
    hidden = torch.randn(B, T, d) * 2
    kp = kernel.prefill(A, weights, d)
    for i, r in enumerate(rs):
        logits = torch.zeros(B, 3)
        packed = kp.run(i, hidden, logits)
        means = torch.bmm(A, hidden)
        with torch.no_grad():
            ref = decision_codes(tables, i, means, weights, uniform=False)
            ref_logits = _reference_logits(r, means, weights, bias)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(kp.codes[i], ref)
        assert router_cpu.unpack_counts(packed) == (0, *(int((ref == c).sum()) for c in (1, 2, 3)))


def test_kernel_masks_an_action_and_flags_rows_that_are_not_finite():
    rs = _routers(24, 32, 1, seed=1)
    kernel = router_cpu.RouterKernel(FN, rs, torch.tensor([0.0, 0.0, float("-inf")]))  # repeat masked
    A, valid = window_matrix(torch.ones(3, 6, dtype=torch.long), 2)
    hidden = torch.randn(3, 6, 24) * 50
    hidden[1, 4, 7] = float("nan")
    kp = kernel.prefill(A, window_weights(valid), 24)
    bad, n_skip, n_exec, n_rep = router_cpu.unpack_counts(kp.run(0, hidden))
    assert (bad, n_rep) == (1, 0) and n_skip + n_exec == 2
    assert kp.codes[0, 1].item() == 0 and set(kp.codes[0, [0, 2]].tolist()) <= {1, 2}


def test_kernel_reads_a_strided_hidden_state_and_a_shared_pooling():
    """A batch-strided input (a slice of a larger batch) and a pooling matrix expanded over the batch (stride 0,
    as the runtime's cached pooling is) give the codes of the contiguous copies."""
    rs = _routers(40, 32, 2, seed=2)
    kernel = router_cpu.RouterKernel(FN, rs, torch.zeros(3))
    A1, valid1 = window_matrix(torch.ones(1, 9, dtype=torch.long), 4)
    A, w = A1.expand(3, -1, -1), window_weights(valid1).expand(3, -1, -1)
    big = torch.randn(6, 9, 40)
    strided = big[::2]
    kp = kernel.prefill(A, w, 40)
    kp2 = kernel.prefill(A.contiguous(), w.contiguous(), 40)
    for i in range(2):
        kp.run(i, strided)
        kp2.run(i, strided.contiguous())
    assert torch.equal(kp.codes, kp2.codes)
    with pytest.raises(ValueError, match="9 tokens"):
        kp.run(0, torch.randn(3, 8, 40))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_runtime_plans_and_logits_equal_with_and_without_the_kernel(family, monkeypatch):
    """The routed forward of a tiny model (left-padded batch, routers biased so the rows differ) gives the same
    plans and logits on the kernel and on the torch path (RETROFIT_ROUTER_KERNEL=0)."""
    model = tiny_model(family, seed=0)
    h = retrofit.attach(model, "drllm", bottleneck=8)  # padded to 32 units inside the kernel
    h.init_routers(seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # strong random routers: the rows of one batch get different plans
        for r in h.routers.router:
            r.fc1.weight.normal_(0, 3.0, generator=g)
            r.fc2.weight.normal_(0, 3.0, generator=g)
            r.fc2.bias.normal_(0, 1.0, generator=g)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 11))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    out = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(router_cpu.ENV_SWITCH, switch)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, use_cache=False).logits
        out[switch] = (h.last_plans, logits)
    assert h._tables(torch.device("cpu"))[1] is None  # the switch off really takes the torch path
    assert out["1"][0] == out["0"][0]
    assert len({tuple(p) for p in out["1"][0]}) > 1  # the rows' plans differ: sub-batches were routed
    torch.testing.assert_close(out["1"][1], out["0"][1])
    h.detach()
