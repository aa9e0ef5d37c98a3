"""Router artifacts: a folder with ``retrofit.json`` (method, config, base-model fingerprint) and
``routers.safetensors`` (tensors). Never pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
CONFIG_NAME = "retrofit.json"
TENSORS_NAME = "routers.safetensors"


class ArtifactError(ValueError):
    """A router artifact is missing, corrupt, or made for another model."""


def fingerprint(model: torch.nn.Module) -> dict:
    """What identifies the base model an artifact was made for.

    Architecture class, layer count, hidden size, vocabulary size, and a SHA-256 over the raw bytes of a
    few weights (the first rows of the input embedding, the first and last decoder layer's parameters
    that exist in every family: their first tensor each, and the last MoE gate's weight where there is one).
    """
    from retrofit.arch import get_adapter

    adapter = get_adapter(model)
    cfg = model.config
    layers = adapter.layers(model)
    tensors = [adapter.decoder(model).embed_tokens.weight[:64]]
    for layer in (layers[0], layers[-1]):
        tensors.append(next(layer.parameters()))
    gates = adapter.moe_gates(model)
    if gates:  # MoE models built from the same dense weights (e.g. two `retrofit moefy` builds) differ here
        tensors.append(next(gates[max(gates)].parameters()))
    return fingerprint_of(type(model).__name__, cfg, len(layers), tensors)


def fingerprint_of(architecture: str, cfg, num_layers: int, tensors) -> dict:
    """The fingerprint from the tensors :func:`fingerprint` picks (embedding rows [:64], the first parameter
    of the first and last decoder layer, the last MoE gate's weight), e.g. as a serving engine loads them."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return {
        "architecture": architecture,
        "model_type": cfg.model_type,
        "num_layers": int(num_layers),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "weights_sha256": h.hexdigest()[:32],
    }


def compare_fingerprint(expected: dict, actual: dict, path) -> None:
    diffs = [f"{k}: artifact {expected.get(k)!r} vs model {v!r}" for k, v in actual.items() if expected.get(k) != v]
    if diffs:
        raise ArtifactError(
            f"router artifact {path} was made for another base model ({'; '.join(diffs)}). "
            "Load it onto the model it was trained for, or re-run `retrofit train` for this one."
        )


def check_fingerprint(expected: dict, model: torch.nn.Module, path: Path | str) -> None:
    compare_fingerprint(expected, fingerprint(model), path)


def save_artifact(path: str | Path, method: str, config: dict, tensors: dict[str, torch.Tensor],
                  model: torch.nn.Module, extra: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "config": config,
        "base_model": fingerprint(model),
        "extra": extra or {},
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / TENSORS_NAME),
              metadata={"method": method})
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise ArtifactError(f"{path} is not a retrofit artifact: {CONFIG_NAME} is missing "
                            "(expected a folder written by handle.save() or `retrofit train`).")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{cfg} is not valid JSON ({e}); the artifact is corrupt: save it again.") from e
    for key in ("format_version", "method", "config", "base_model"):
        if key not in meta:
            raise ArtifactError(f"{cfg} lacks the key {key!r}; the artifact is corrupt or from another tool.")
    if meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{cfg} has format_version {meta['format_version']}, newer than this retrofit "
                            f"({FORMAT_VERSION}): upgrade retrofit.")
    return meta


def load_artifact(path: str | Path, model: torch.nn.Module | None = None,
                  method: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an artifact; check it belongs to ``model`` and ``method`` when given."""
    path = Path(path)
    meta = read_meta(path)
    if method is not None and meta["method"] != method:
        raise ArtifactError(f"{path} holds a {meta['method']!r} artifact, not {method!r}: "
                            f"attach it with method={meta['method']!r} or use retrofit.load().")
    if model is not None:
        check_fingerprint(meta["base_model"], model, path)
    tfile = path / TENSORS_NAME
    if not tfile.is_file():
        raise ArtifactError(f"{tfile} is missing; the artifact is incomplete: save it again.")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{tfile} could not be read as safetensors ({e}); the file is corrupt.") from e
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{tfile}: tensor {k!r} holds NaN or inf; the artifact is unusable, retrain it.")
    return meta, tensors
