"""The task routers' logit scale uses a low quantile of the training windows' logits; torch.quantile refuses
inputs over 16M elements, so the helper falls back to the k-th smallest value there."""

import torch

from retrofit.methods.drllm.train import _low_quantile


def test_low_quantile_small_and_past_the_torch_limit():
    x = torch.arange(1000, dtype=torch.float32)
    assert float(_low_quantile(x, 0.01)) == float(torch.quantile(x, 0.01))
    big = torch.rand((1 << 24) + 5, generator=torch.Generator().manual_seed(0))
    q = float(_low_quantile(big, 0.01))
    assert abs(q - 0.01) < 1e-3  # uniform(0, 1): the 1 % quantile
    k = -(-big.numel() // 100)  # ceil(q n): q is the k-th smallest value (float32 draws have ties)
    assert int((big < q).sum()) < k <= int((big <= q).sum())
