"""MoE tooling: the MoE testbed built from SmolLM2's own weights (``retrofit moefy``, see docs/moe.md).

Names are imported lazily so that ``retrofit.moe.cli`` (loaded by every ``retrofit`` command) does not import
torch.
"""

__all__ = ["MoefyConfig", "build_testbed", "load_testbed", "moefy_model", "testbed_dir"]


def __getattr__(name):
    if name in __all__:
        from retrofit.moe import moefy

        return getattr(moefy, name)
    raise AttributeError(f"module 'retrofit.moe' has no attribute {name!r}")
