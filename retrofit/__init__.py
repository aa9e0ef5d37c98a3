"""retrofit: routers for frozen pretrained language models, attached at inference time."""

from __future__ import annotations

from pathlib import Path

from retrofit.arch import UnsupportedModelError, get_adapter, supported_families
from retrofit.artifacts import ArtifactError
from retrofit.methods import available_methods, build_config, get_method

__version__ = "0.1.0"
__all__ = ["attach", "load", "available_methods", "supported_families", "ArtifactError", "UnsupportedModelError"]


def attach(model, method: str, routers: str | Path | None = None, **config):
    """Attach ``method`` to ``model`` in place and return its handle.

    ``routers``: a folder written by ``handle.save()`` / ``retrofit train`` (checked against the model's
    fingerprint); ``None`` attaches the method untrained (Dr.LLM then executes every layer). Extra keyword
    arguments override the method's config (validated).
    """
    from retrofit.artifacts import load_artifact

    adapter = get_adapter(model)
    method_cls = get_method(method)
    tensors = meta = None
    base_cfg = None
    if routers is not None:
        meta, tensors = load_artifact(routers, model=model, method=method)
        base_cfg = meta["config"]
        try:  # the saved config alone must be valid: a bad one is a damaged artifact, not a user mistake
            build_config(method_cls.config_cls, {}, base=base_cfg)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{routers}: the saved {method!r} config is invalid ({e}); the artifact is "
                                "corrupt or from another retrofit: save it again.") from None
    cfg = build_config(method_cls.config_cls, config, base=base_cfg)
    handle = method_cls(model, cfg, adapter)
    return handle.attach(tensors, meta)


def load(model, path: str | Path, **config):
    """Attach whatever method the artifact at ``path`` holds."""
    from retrofit.artifacts import read_meta

    meta = read_meta(path)
    try:
        get_method(meta["method"])
    except KeyError:
        raise ArtifactError(f"{path}: method {meta['method']!r} is not a retrofit method (available: "
                            f"{', '.join(available_methods())}); the artifact is corrupt or from another tool."
                            ) from None
    return attach(model, meta["method"], routers=path, **config)
