"""Dr.LLM router: windowed mean pooling of a layer's input over the prompt and a bottleneck MLP."""

from __future__ import annotations

import torch
from torch import nn


def window_matrix(mask: torch.Tensor, num_windows: int, dtype=torch.float32):
    """Averaging weights A [B, W, T] with A @ hidden = window means (see :func:`window_means`), and validity [B, W].

    The same for every layer of one prefill, so the runtime builds it once per request batch.
    """
    mask = mask.long()
    B, T = mask.shape
    n = mask.sum(1, keepdim=True).clamp(min=1)
    rank = mask.cumsum(1) - 1
    wid = torch.div(rank.clamp(min=0) * num_windows, n, rounding_mode="floor").clamp(max=num_windows - 1)
    onehot = torch.nn.functional.one_hot(wid, num_windows).to(dtype) * mask.unsqueeze(-1).to(dtype)  # [B, T, W]
    counts = onehot.sum(1)  # [B, W]
    A = (onehot / counts.clamp(min=1).unsqueeze(1)).transpose(1, 2).contiguous()
    return A, counts > 0


def window_weights(valid: torch.Tensor) -> torch.Tensor:
    """[B, W] validity -> [B, 1, W] weights that average a router's per-window outputs over the valid windows."""
    v = valid.to(torch.float32)
    return (v / v.sum(-1, keepdim=True).clamp(min=1)).unsqueeze(1)


def window_means(hidden: torch.Tensor, mask: torch.Tensor | None, num_windows: int):
    """Split each row's real tokens into ``num_windows`` nearly equal windows and average each.

    hidden [B, T, d]; mask [B, T] (1 = real token, any padding side) or None. Window w of a row with n real
    tokens holds the tokens of rank r with floor(r * W / n) == w, so the T mod W remainder is spread over the
    windows (the released Dr.LLM code drops it). Returns (means [B, W, d] float32, valid [B, W] bool); a
    window is invalid when the row has fewer than W tokens and it got none.
    """
    B, T, d = hidden.shape
    if mask is None:
        mask = torch.ones(B, T, device=hidden.device, dtype=torch.long)
    mask = mask.to(hidden.device).long()
    n = mask.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    rank = mask.cumsum(1) - 1
    wid = torch.div(rank.clamp(min=0) * num_windows, n, rounding_mode="floor").clamp(max=num_windows - 1)
    wid = torch.where(mask.bool(), wid, torch.zeros_like(wid))
    m = mask.to(torch.float32)
    h = hidden.to(torch.float32) * m.unsqueeze(-1)
    sums = torch.zeros(B, num_windows, d, dtype=torch.float32, device=hidden.device)
    sums.scatter_add_(1, wid.unsqueeze(-1).expand(B, T, d), h)
    counts = torch.zeros(B, num_windows, dtype=torch.float32, device=hidden.device).scatter_add_(1, wid, m)
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return means, counts > 0


class Router(nn.Module):
    """Linear(d, b) -> GELU(tanh) -> Linear(b, 3); Xavier-uniform weights, zero biases (as in Dr.LLM)."""

    def __init__(self, hidden_size: int, bottleneck: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, bottleneck)
        self.fc2 = nn.Linear(bottleneck, 3)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, means: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Window means [..., W, d] + validity [..., W] -> logits [..., 3] averaged over valid windows."""
        F = nn.functional
        logits = F.linear(F.gelu(F.linear(means, self.fc1.weight, self.fc1.bias), approximate="tanh"),
                          self.fc2.weight, self.fc2.bias)
        v = valid.to(logits.dtype).unsqueeze(-1)
        return (logits * v).sum(-2) / v.sum(-2).clamp(min=1)

    def decide(self, means: torch.Tensor, window_weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Inference fast path: actions [B] from window means [B, W, d].

        ``window_weights`` [B, 1, W] are the valid windows' averaging weights (:func:`window_weights`) and
        ``bias`` [3] the budget biases. fc2 is linear, so averaging the hidden units over the windows before it
        equals averaging the logits after it (:meth:`forward`), in fewer ops: this runs once per layer at
        every prefill and must cost next to nothing against the layer itself.
        """
        F = nn.functional
        hid = F.gelu(F.linear(means, self.fc1.weight, self.fc1.bias), approximate="tanh")
        return torch.addmm(self.fc2.bias + bias, torch.bmm(window_weights, hid).squeeze(1),
                           self.fc2.weight.t()).argmax(-1)


class RouterBank(nn.Module):
    """One router per decoder layer (state-dict keys ``router.{i}.fc1.weight`` etc. in artifacts)."""

    def __init__(self, num_layers: int, hidden_size: int, bottleneck: int = 128):
        super().__init__()
        self.router = nn.ModuleList(Router(hidden_size, bottleneck) for _ in range(num_layers))

    def __len__(self):
        return len(self.router)

    def __getitem__(self, i) -> Router:
        return self.router[i]

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """features [N, L, W, d], valid [N, L, W] -> logits [N, L, 3] (for training on cached features)."""
        return torch.stack([r(features[:, i], valid[:, i]) for i, r in enumerate(self.router)], dim=1)
