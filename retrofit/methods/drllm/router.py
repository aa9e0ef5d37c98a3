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
        """Actions [B] from window means [B, W, d] (one router alone; the runtimes use :func:`decision_codes`).

        ``window_weights`` [B, 1, W] are the valid windows' averaging weights (:func:`window_weights`) and
        ``bias`` [3] the budget biases. Equals ``(self(means, valid) + bias).argmax(-1)``; raises
        FloatingPointError when a row's means are not finite (a NaN would otherwise read as "skip").
        """
        tables = decision_tables([self], bias, means.shape[-2], means.device)
        codes = decision_codes(tables, 0, means, window_weights, uniform=False)
        bad = (codes == NONFINITE).nonzero().flatten().tolist()
        if bad:
            raise nonfinite_error(None, bad)
        return codes - 1


NONFINITE = 0  # the decision code of a row whose router input is not finite; codes 1-3 are 1 + the action


def decision_tables(routers, bias: torch.Tensor, num_windows: int, device) -> tuple:
    """What :func:`decision_codes` needs, as per-router lists: (fc1 weight, fc1 bias, fc2 tiled over the windows
    and divided by W [W * b, 4], fc2 transposed [b, 4], biases [4]). Column 0 is the finiteness check (zero
    weights, bias -inf), columns 1-3 fc2's skip / execute / repeat; the biases are fc2's plus ``bias`` [3] (the
    budget knob, -inf where an action is masked). Built once per set of routers and knob, not per prefill."""
    W = num_windows
    with torch.no_grad():
        w1 = [r.fc1.weight.detach().to(device) for r in routers]
        b1 = [r.fc1.bias.detach().to(device) for r in routers]
        w2 = torch.stack([r.fc2.weight.detach() for r in routers]).to(device).float()  # [L, 3, b]
        L, _, b = w2.shape
        fc2t = torch.cat([w2.new_zeros(L, 1, b), w2], 1).transpose(1, 2).contiguous()  # [L, b, 4]
        tiled = (fc2t / W).repeat(1, W, 1).contiguous()  # [L, W * b, 4]: row w * b + j: unit j, window w
        b2 = torch.stack([r.fc2.bias.detach() for r in routers]).to(device).float()
        b4 = torch.cat([b2.new_full((L, 1), float("-inf")), b2 + bias.to(device).float()], 1)
    return w1, b1, list(tiled), list(fc2t), list(b4)


def decision_codes(tables: tuple, i: int, means: torch.Tensor, weights: torch.Tensor, uniform: bool) -> torch.Tensor:
    """Codes [B] of router ``i`` of ``tables`` (:func:`decision_tables`) from window means [B, W, d]: 1 + the
    action, or :data:`NONFINITE` (0) where the input is not finite.

    fc1 + GELU on every window, then fc2 on the valid windows' average (``weights`` [B, 1, W]) with the budget
    bias folded into its bias: fc2 is linear, so averaging the hidden units before it equals averaging the
    logits. With ``uniform`` (every row's windows all hold tokens) the average and fc2 are one product with
    fc2 tiled over the windows. The check logit is -inf for a finite input and NaN (0 x inf, 0 x NaN), which
    argmax takes, for one that is not, so the decision needs no separate check. Inside a forward each op runs
    with cold caches (the decoder layer before it has flushed them) and costs tens of microseconds whatever
    its size, so the path is as few calls as it can be: five ops, no indexing, transposes or module lookups."""
    w1, b1, tiled, fc2t, bias = tables
    hid = nn.functional.gelu(nn.functional.linear(means, w1[i], b1[i]), approximate="tanh")  # [B, W, b]
    if uniform:
        return torch.addmm(bias[i], hid.flatten(1), tiled[i]).argmax(-1)
    return torch.addmm(bias[i], torch.bmm(weights, hid).squeeze(1), fc2t[i]).argmax(-1)


def nonfinite_error(layer: int | None, rows: list[int]) -> FloatingPointError:
    """The error for router input that holds NaN / inf (``rows`` of the batch, entering decoder ``layer``)."""
    where = f"entering decoder layer {layer} " if layer is not None else ""
    return FloatingPointError(
        f"Dr.LLM: the hidden states {where}hold NaN or inf (batch rows {rows}), so its router cannot decide; "
        "the base model overflowed or its weights / inputs are corrupt (float16 overflows easily: load the "
        "model in bfloat16 or float32)")


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
