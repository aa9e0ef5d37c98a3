"""Study storage URLs, shared by every optuna study in retrofit (search's static plans, methods' tuning).

Defined here (not in ``search``) because ``methods`` may not import ``search`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["storage_url"]


def storage_url(storage: str | None, default: str = "sqlite:///runs/optuna.db") -> str:
    """A SQLAlchemy URL; a bare path becomes ``sqlite:///path``; SQLite's folder is created."""
    if storage is None:
        storage = default
    if "://" not in storage:
        storage = f"sqlite:///{storage}"
    if storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
    return storage
