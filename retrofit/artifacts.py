"""Router artifacts: a folder with ``retrofit.json`` (method, config, base-model fingerprint, tensor manifest) and
``routers.safetensors`` (tensors). Never pickle.

``retrofit.json`` (format_version 2) is one JSON object, checked by :func:`validate_meta` against one schema::

    {"format_version": 2, "method": str, "config": {option: value}, "extra": {...},
     "base_model": <fingerprint(model)>, "tensors": {name: {"shape": [int], "dtype": str}}}
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 2
FINGERPRINT_VERSION = 2
CONFIG_NAME = "retrofit.json"
TENSORS_NAME = "routers.safetensors"
SAMPLE = 1024  # values hashed per tensor (evenly spaced over the flattened tensor; all of a smaller one)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FP_FIELDS = {"architecture": str, "model_type": str, "num_layers": int, "hidden_size": int, "vocab_size": int,
              "weights_sha256": str}


class ArtifactError(ValueError):
    """A router artifact is missing, corrupt, or made for another model."""


# ------------------------------------------------------------------------------------------------ fingerprint
def tensor_digest(t: torch.Tensor) -> str:
    """A dtype-independent digest of one weight tensor: its shape and a fixed sample of its values (``SAMPLE``
    evenly spaced entries of the flattened tensor), each rounded to bfloat16. float32 weights and the same
    weights loaded in bfloat16 give the same digest (rounding a bfloat16 value to bfloat16 changes nothing);
    a float16 load of float32 weights does not (double rounding), nor do quantised weights."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > SAMPLE:
        flat = flat[torch.arange(SAMPLE, device=flat.device) * n // SAMPLE]
    vals = flat.to(torch.float32).to(torch.bfloat16).cpu().contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(vals.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprinted(name: str) -> bool:
    """Whether a checkpoint tensor of this (Hugging Face) name is part of the fingerprint: every parameter;
    not the rotary-embedding buffers some checkpoints carry."""
    return "rotary_emb." not in name and not name.endswith(".inv_freq")


def _group_hash(digests) -> str:
    # a set: tied weights (an LM head saved next to the embedding it shares) count once, names do not matter
    return hashlib.sha256(",".join(sorted(set(digests))).encode()).hexdigest()[:16]


def _fingerprint_dict(architecture: str, cfg, layer_digests: list[list[str]], other: list[str]) -> dict:
    layers = [_group_hash(d) for d in layer_digests]
    rest = _group_hash(other)
    return {
        "architecture": architecture,
        "model_type": cfg.model_type,
        "num_layers": len(layers),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "fingerprint_version": FINGERPRINT_VERSION,
        "weights_sha256": hashlib.sha256((",".join(layers) + "|" + rest).encode()).hexdigest()[:32],
        "layers_sha256": layers,
        "other_sha256": rest,
    }


def fingerprint(model: torch.nn.Module) -> dict:
    """What identifies the base model an artifact was made for.

    Architecture class, model type, layer count, hidden size, vocabulary size, and hashes of every parameter
    (:func:`tensor_digest`: shape + a fixed sample of values rounded to bfloat16, so float32 and bfloat16 loads
    of the same weights agree): one per decoder layer (``layers_sha256``), one for everything else (embedding,
    final norm, LM head: ``other_sha256``) and one over all (``weights_sha256``).
    """
    from retrofit.arch import get_adapter

    adapter = get_adapter(model)
    layers = list(adapter.layers(model))
    owner = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    layer_digests: list[list[str]] = [[] for _ in layers]
    other: list[str] = []
    for name, p in model.named_parameters():
        (layer_digests[owner[id(p)]] if id(p) in owner else other).append(tensor_digest(p))
    return _fingerprint_dict(type(model).__name__, model.config, layer_digests, other)


def fingerprint_of(architecture: str, cfg, num_layers: int, digests: dict[str, str]) -> dict:
    """The fingerprint from ``{checkpoint name: tensor_digest(tensor)}`` of every weight (Hugging Face names,
    e.g. as a serving engine loads them; decoder layers are found by ``layers.<i>.`` in the name), equal to
    :func:`fingerprint` of the same weights loaded by transformers. Raises :class:`ArtifactError` when a
    decoder layer has no weights (the fingerprint cannot be checked)."""
    layer_digests: list[list[str]] = [[] for _ in range(int(num_layers))]
    other: list[str] = []
    for name, d in digests.items():
        if not fingerprinted(name):
            continue
        m = _LAYER_RE.search(name)
        if m is not None and int(m.group(1)) < num_layers:
            layer_digests[int(m.group(1))].append(d)
        else:
            other.append(d)
    missing = [i for i, d in enumerate(layer_digests) if not d]
    if missing or not other:
        raise ArtifactError(f"the loaded weights lack decoder layers {missing}" if missing else
                            "the loaded weights lack the embedding / LM head")
    return _fingerprint_dict(architecture, cfg, layer_digests, other)


def _fingerprint_v1(model: torch.nn.Module) -> dict:
    """The format-1 fingerprint (raw float32 bytes of a few weights), only to upgrade old artifacts."""
    from retrofit.arch import get_adapter

    adapter = get_adapter(model)
    cfg = model.config
    layers = adapter.layers(model)
    tensors = [adapter.decoder(model).embed_tokens.weight[:64]]
    for layer in (layers[0], layers[-1]):
        tensors.append(next(layer.parameters()))
    gates = adapter.moe_gates(model)
    if gates:
        tensors.append(next(gates[max(gates)].parameters()))
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return {"architecture": type(model).__name__, "model_type": cfg.model_type, "num_layers": len(layers),
            "hidden_size": int(cfg.hidden_size), "vocab_size": int(cfg.vocab_size),
            "weights_sha256": h.hexdigest()[:32]}


def _old_fingerprint_error(path) -> ArtifactError:
    return ArtifactError(
        f"router artifact {path} was saved by an older retrofit (fingerprint format 1, which told bfloat16 loads "
        "apart and missed changed middle layers), so it cannot be checked against this model. Re-save it once "
        "on the model it was made for (float32, as then): "
        f"`retrofit.artifacts.upgrade_artifact({str(path)!r}, model)` checks the old fingerprint and rewrites "
        f"{CONFIG_NAME}; or re-run `retrofit train`.")


def compare_fingerprint(expected: dict, actual: dict, path) -> None:
    """Raise :class:`ArtifactError` saying what differs when ``actual`` is not the model ``expected`` names."""
    if expected.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise _old_fingerprint_error(path)
    diffs = [f"{k}: artifact {expected.get(k)!r} vs model {actual[k]!r}"
             for k in ("architecture", "model_type", "num_layers", "hidden_size", "vocab_size")
             if expected.get(k) != actual[k]]
    if not diffs and expected.get("weights_sha256") != actual["weights_sha256"]:
        layers = [i for i, (a, b) in enumerate(zip(expected["layers_sha256"], actual["layers_sha256"])) if a != b]
        where = []
        every_layer = len(layers) == len(actual["layers_sha256"])
        if every_layer:
            where.append("every decoder layer")
        elif layers:
            more = f" and {len(layers) - 8} more" if len(layers) > 8 else ""
            where.append(f"decoder layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers[:8]))}{more}")
        if expected.get("other_sha256") != actual["other_sha256"]:
            where.append("the embedding / final norm / LM head")
        every = every_layer and len(where) == 2
        hint = (" (every tensor differs: another model, or these weights in another precision than float32 / "
                "bfloat16, e.g. float16 or quantised)") if every else ""
        diffs.append(f"weights_sha256: the weights differ in {' and '.join(where)}{hint}")
    if diffs:
        raise ArtifactError(
            f"router artifact {path} was made for another base model ({'; '.join(diffs)}). "
            "Load it onto the model it was trained for, or re-run `retrofit train` for this one."
        )


def check_fingerprint(expected: dict, model: torch.nn.Module, path: Path | str) -> None:
    compare_fingerprint(expected, fingerprint(model), path)


# ------------------------------------------------------------------------------------------------ schema
def _type_name(v) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
                                     int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def validate_meta(meta, where) -> dict:
    """Check a parsed ``retrofit.json`` against the schema (module docstring); raise :class:`ArtifactError`
    saying which key is wrong and how. Format-1 files (no tensor manifest, old fingerprint) pass here; the
    fingerprint check then asks for an upgrade."""
    def bad(msg):
        return ArtifactError(f"{where}: {msg}; the artifact is corrupt or from another tool: save it again.")

    if not isinstance(meta, dict):
        raise bad(f"must be a JSON object, not {_type_name(meta)}")
    for key in ("format_version", "method", "config", "base_model"):
        if key not in meta:
            raise bad(f"lacks the key {key!r}")
    v = meta["format_version"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise bad(f"format_version must be a positive integer, not {v!r}")
    if v > FORMAT_VERSION:
        raise ArtifactError(f"{where} has format_version {v}, newer than this retrofit ({FORMAT_VERSION}): "
                            "upgrade retrofit.")
    if not isinstance(meta["method"], str) or not meta["method"]:
        raise bad(f"method must be a method name such as 'drllm', not {_type_name(meta['method'])} "
                  f"{meta['method']!r}")
    if not isinstance(meta["config"], dict):
        raise bad(f"config must be an object of method options, not {_type_name(meta['config'])}")
    if "extra" in meta and not isinstance(meta["extra"], dict):
        raise bad(f"extra must be an object, not {_type_name(meta['extra'])}")
    fp = meta["base_model"]
    if not isinstance(fp, dict):
        raise bad(f"base_model must be the base model's fingerprint (an object), not {_type_name(fp)}")
    for k, t in _FP_FIELDS.items():
        if not isinstance(fp.get(k), t) or isinstance(fp.get(k), bool):
            raise bad(f"base_model.{k} must be {_type_name(t())}, not {_type_name(fp.get(k))}")
    if v >= 2:
        if fp.get("fingerprint_version") != FINGERPRINT_VERSION:
            raise bad(f"base_model.fingerprint_version must be {FINGERPRINT_VERSION}")
        layers = fp.get("layers_sha256")
        if not (isinstance(layers, list) and len(layers) == fp["num_layers"]
                and all(isinstance(x, str) for x in layers)):
            raise bad(f"base_model.layers_sha256 must be a list of {fp['num_layers']} strings")
        if not isinstance(fp.get("other_sha256"), str):
            raise bad("base_model.other_sha256 must be a string")
        man = meta.get("tensors")
        if not isinstance(man, dict):
            raise bad(f"tensors must be an object {{name: {{shape, dtype}}}}, not {_type_name(man)}")
        for name, spec in man.items():
            if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
                    and isinstance(spec.get("shape"), list)
                    and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in spec["shape"])):
                raise bad(f"tensors[{name!r}] must be {{\"shape\": [int, ...], \"dtype\": str}}, not {spec!r}")
    return meta


def _manifest(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in sorted(tensors.items())}


# ------------------------------------------------------------------------------------------------ read / write
def save_artifact(path: str | Path, method: str, config: dict, tensors: dict[str, torch.Tensor],
                  model: torch.nn.Module, extra: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "config": config,
        "base_model": fingerprint(model),
        "tensors": _manifest(tensors),
        "extra": extra or {},
    }
    save_file(tensors, str(path / TENSORS_NAME), metadata={"method": method})
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg} is not valid JSON ({e}); the artifact is corrupt: save it again.") from e
    return validate_meta(meta, cfg)


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    tfile = path / TENSORS_NAME
    if not tfile.is_file():
        raise ArtifactError(f"{tfile} is missing; the artifact is incomplete: save it again.")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{tfile} could not be read as safetensors ({e}); the file is corrupt.") from e
    if "tensors" in meta:  # format 2: the file must hold exactly what retrofit.json lists
        have, want = _manifest(tensors), meta["tensors"]
        if have != want:
            missing = sorted(set(want) - set(have))
            unexpected = sorted(set(have) - set(want))
            changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
            parts = [f"{label} {names[:5]}" for label, names in
                     (("missing", missing), ("not listed", unexpected), ("with another shape/dtype", changed))
                     if names]
            raise ArtifactError(f"{tfile} does not hold the tensors {CONFIG_NAME} lists ({'; '.join(parts)}); "
                                "the artifact is corrupt: save it again.")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{tfile}: tensor {k!r} holds NaN or inf; the artifact is unusable, retrain it.")
    return tensors


def load_artifact(path: str | Path, model: torch.nn.Module | None = None,
                  method: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an artifact; check it belongs to ``model`` and ``method`` when given."""
    path = Path(path)
    meta = read_meta(path)
    if meta["format_version"] < FORMAT_VERSION:  # its fingerprint cannot be checked (also not by a server later)
        raise _old_fingerprint_error(path)
    if method is not None and meta["method"] != method:
        raise ArtifactError(f"{path} holds a {meta['method']!r} artifact, not {method!r}: "
                            f"attach it with method={meta['method']!r} or use retrofit.load().")
    if model is not None:
        check_fingerprint(meta["base_model"], model, path)
    return meta, _read_tensors(path, meta)


def upgrade_artifact(path: str | Path, model: torch.nn.Module) -> Path:
    """Rewrite an older artifact's ``retrofit.json`` in the current format, after checking its old fingerprint
    against ``model`` (the model it was made for, loaded as it was then, in float32). Routers are not touched."""
    path = Path(path)
    meta = read_meta(path)
    if meta["format_version"] >= FORMAT_VERSION:
        return path
    old = _fingerprint_v1(model)
    diffs = [k for k, v in old.items() if meta["base_model"].get(k) != v]
    if diffs:
        raise ArtifactError(f"{path} was made for another base model (format-1 fingerprint differs in {diffs}); "
                            "upgrade it on the model it was trained for, loaded in float32.")
    tensors = _read_tensors(path, meta)
    meta.update(format_version=FORMAT_VERSION, base_model=fingerprint(model), tensors=_manifest(tensors))
    meta.setdefault("extra", {})
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path
