"""Dr.LLM router pieces against by-hand references: window pooling (both ways it is computed) and the fused
inference decision (the vLLM plugin's path) against the training forward."""

import pytest
import torch

from retrofit.methods.drllm.router import Router, window_matrix, window_means, window_weights


def _reference_means(hidden, mask, W):
    """Per row: the real tokens in order, token of rank r into window floor(r * W / n)."""
    B, T, d = hidden.shape
    means = torch.zeros(B, W, d)
    valid = torch.zeros(B, W, dtype=torch.bool)
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        n = len(real)
        for w in range(W):
            toks = [t for r, t in enumerate(real) if min(r * W // max(n, 1), W - 1) == w]
            if toks:
                means[b, w] = hidden[b, toks].mean(0)
                valid[b, w] = True
    return means, valid


def _masks(B, T, gen):
    rows = []
    for b in range(B):
        n = int(torch.randint(1, T + 1, (1,), generator=gen))
        side = b % 3  # left padding, right padding, and real tokens scattered (a mask of any shape)
        if side == 0:
            m = [0] * (T - n) + [1] * n
        elif side == 1:
            m = [1] * n + [0] * (T - n)
        else:
            m = (torch.randperm(T, generator=gen) < n).long().tolist()
        rows.append(m)
    return torch.tensor(rows)


def test_window_means_and_window_matrix_equal_the_by_hand_partition():
    gen = torch.Generator().manual_seed(0)
    for W in (1, 3, 8):
        hidden = torch.randn(9, 13, 5, generator=gen)
        mask = _masks(9, 13, gen)
        ref, ref_valid = _reference_means(hidden, mask, W)
        means, valid = window_means(hidden, mask, W)
        assert torch.equal(valid, ref_valid)
        torch.testing.assert_close(means, ref)
        # padding values never leak in: change every pad position, nothing moves
        noisy = torch.where(mask.bool().unsqueeze(-1), hidden, torch.full_like(hidden, 1e4))
        torch.testing.assert_close(window_means(noisy, mask, W)[0], ref)
        A, valid2 = window_matrix(mask, W)
        assert torch.equal(valid2, ref_valid)
        torch.testing.assert_close(A @ noisy, ref)
        assert A.shape == (9, W, 13)
    # no mask = every token real; a bfloat16 input is averaged in float32
    h = torch.randn(2, 7, 3, generator=gen).to(torch.bfloat16)
    means, valid = window_means(h, None, 3)
    assert means.dtype == torch.float32 and valid.all()
    torch.testing.assert_close(means, _reference_means(h.float(), torch.ones(2, 7), 3)[0])


def test_fused_decision_equals_the_argmax_of_the_training_forward():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    r = Router(6, bottleneck=4)
    with torch.no_grad():
        r.fc2.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    n_diff = 0
    for trial in range(20):
        means = torch.randn(16, 5, 6, generator=gen) * 2
        valid = torch.rand(16, 5, generator=gen) > 0.3
        valid[:, 0] = True
        bias = torch.randn(3, generator=gen)
        want = (r(means, valid) + bias).argmax(-1)
        got = r.decide(means, window_weights(valid), bias)
        assert torch.equal(got, want), trial
        n_diff += int((got != (r(means, valid)).argmax(-1)).sum())
        # invalid windows do not count: filling them with anything leaves the decision
        junk = torch.where(valid.unsqueeze(-1), means, torch.full_like(means, 50.0))
        assert torch.equal(r.decide(junk, window_weights(valid), bias), want)
    assert n_diff > 0  # the biases mattered somewhere, so the test sees a decision that ignored them
    # all three actions occur, so a decision stuck on one class fails
    means = torch.randn(400, 5, 6, generator=gen) * 3
    valid = torch.ones(400, 5, dtype=torch.bool)
    assert set(r.decide(means, window_weights(valid), torch.zeros(3)).tolist()) == {0, 1, 2}


def test_window_weights_average_over_valid_windows_only():
    valid = torch.tensor([[True, False, True, True], [False, False, False, False]])
    w = window_weights(valid)
    assert w.shape == (2, 1, 4)
    torch.testing.assert_close(w[0, 0], torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))
    assert torch.equal(w[1], torch.zeros(1, 4))  # no valid window: zeros, not NaN


def test_decide_refuses_non_finite_means_naming_the_rows():
    r = Router(6, bottleneck=4)
    means = torch.randn(3, 5, 6)
    means[2, 1, 0] = float("inf")
    valid = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(FloatingPointError, match=r"batch rows \[2\]"):
        r.decide(means, window_weights(valid), torch.zeros(3))
    means[2, 1, 0] = 0.0
    assert r.decide(means, window_weights(valid), torch.zeros(3)).shape == (3,)
