"""Router training uses what it claims: class-balanced weights and focal gamma (issue 15, mutations 1 and 2).

The helper tests in test_drllm_train.py check ``class_weights`` and ``focal_loss`` by hand; these check that
``train_routers`` actually trains with them, by behaviour on a fixed synthetic set of cached features
(no model forward: the routers train on features [N, L, W, d] directly).
"""

import torch

import retrofit
from retrofit.methods.drllm.train import TrainConfig, train_routers
from retrofit.testing import tiny_model


def _imbalanced(N=160, L=4, W=2, d=64, seed=0, shift=1.5, frac=0.1):
    """~10 % 'skip' labels among 'execute'; one informative feature, overlapping classes (x ~ N(0, 1) for
    execute, N(1.5, 1) for skip), so the rare class cannot be memorised and only a lower decision threshold,
    which class weights bring, predicts it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.ones(N, L, dtype=torch.long)
    rare = torch.rand(N, L, generator=g) < frac
    labels[rare] = 0
    feats = torch.zeros(N, L, W, d)
    feats[..., 0] = torch.randn(N, L, 1, generator=g) + shift * rare.float().unsqueeze(-1)
    return feats, torch.ones(N, L, W, dtype=torch.bool), labels


def _train(feats, valid, labels, **cfg):
    h = retrofit.attach(tiny_model("llama"), "drllm", num_windows=feats.shape[2], bottleneck=16)
    try:
        cfg = TrainConfig(**{**dict(epochs=15, lr=1e-2, patience=100, val_fraction=0.0, warmup_steps=1,
                                    batch_size=32), **cfg})
        train_routers(h, feats, valid, labels, cfg, progress=False)
        with torch.no_grad():
            return torch.softmax(h.routers(feats, valid), -1)
    finally:
        h.detach()


def test_class_weights_make_training_predict_the_rare_class():
    feats, valid, labels = _imbalanced()
    rare = labels == 0
    assert 40 <= int(rare.sum()) <= 90
    weighted = _train(feats, valid, labels).argmax(-1)  # default beta 0.999: class-balanced weights
    unweighted = _train(feats, valid, labels, beta=0.0).argmax(-1)  # beta 0: every present class weighs 1
    recall_w = (weighted[rare] == 0).float().mean().item()
    recall_u = (unweighted[rare] == 0).float().mean().item()
    # measured (seeds 0-3): weighted 0.69-0.77, unweighted 0.20-0.24
    assert recall_w > 0.5, f"class-weighted training found only {recall_w:.2f} of the rare class"
    assert recall_u < 0.35 and recall_w > recall_u + 0.3


def test_focal_gamma_makes_trained_routers_less_confident():
    """Focal loss (gamma 2) down-weights examples the routers already get right, so training stops pushing
    their probabilities towards 1; cross-entropy (gamma 0) keeps pushing. Same data, seed and schedule."""
    feats, valid, labels = _imbalanced(seed=1)
    focal = _train(feats, valid, labels).max(-1).values.mean().item()  # default gamma 2
    ce = _train(feats, valid, labels, gamma=0.0).max(-1).values.mean().item()
    # measured (seeds 0-3): gamma 2 0.62-0.64, gamma 0 0.71-0.74
    assert focal < ce - 0.05, f"gamma 2 confidence {focal:.3f} vs gamma 0 {ce:.3f}"
