"""Study storage URLs, shared by every optuna study in retrofit (search's static plans, methods' tuning).

Defined here (not in ``search``) because ``methods`` may not import ``search`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["open_storage", "storage_url"]


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


def open_storage(url: str, *, attempts: int = 6, wait_s: float = 0.5, **kwargs):
    """``optuna.storages.RDBStorage(url, **kwargs)``, retried when another process is creating the same new
    database at that moment: two studies started side by side on one fresh SQLite file race on writing its
    schema version (``IntegrityError: UNIQUE constraint failed: alembic_version``) or find it locked; the second
    opener succeeds once the first has finished. Waits ``wait_s``, doubling, for up to ``attempts`` tries, then
    raises a RuntimeError that names the storage."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be a positive integer, got {attempts!r}")
    for i in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, OperationalError) as e:
            msg = str(e).lower()
            if isinstance(e, OperationalError) and "locked" not in msg and "already exists" not in msg:
                raise  # not the race (a wrong path, a broken file): no waiting
            if i == attempts - 1:
                raise RuntimeError(f"could not open the study storage {url} after {attempts} tries (another "
                                   f"process kept it busy): {type(e).__name__}: {str(e).splitlines()[0]}") from e
            time.sleep(wait_s * 2 ** i)
