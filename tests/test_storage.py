"""Study storage: URLs, and opening one fresh SQLite file from processes started side by side."""

import pytest

from retrofit.core.storage import open_storage, storage_url


def test_storage_url_makes_sqlite_folders(tmp_path):
    url = storage_url(str(tmp_path / "a" / "b.db"))
    assert url == f"sqlite:///{tmp_path / 'a' / 'b.db'}" and (tmp_path / "a").is_dir()
    assert storage_url(None, "sqlite:///:memory:") == "sqlite:///:memory:"


def test_open_storage_retries_the_schema_race_and_then_names_the_storage(monkeypatch, tmp_path):
    import optuna
    from sqlalchemy.exc import IntegrityError

    calls = []
    real = optuna.storages.RDBStorage

    def racing(fail_times):
        def make(url, **kw):
            calls.append((url, kw))
            if len(calls) <= fail_times:  # what the second of two fresh openers gets from SQLite
                raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
            return real(url, **kw)
        return make

    url = storage_url(str(tmp_path / "s.db"))
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing(2))
    st = open_storage(url, wait_s=0, heartbeat_interval=60, grace_period=180)
    assert isinstance(st, real) and len(calls) == 3
    assert all(kw == {"heartbeat_interval": 60, "grace_period": 180} for _, kw in calls)
    monkeypatch.setattr(optuna.storages, "RDBStorage", real)  # optuna checks storages against its own class
    study = optuna.create_study(study_name="x", storage=st, load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="x", storage=url).trials) == 1  # a working storage

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing(99))
    with pytest.raises(RuntimeError, match="could not open the study storage .*s.db after 3 tries"):
        open_storage(url, attempts=3, wait_s=0)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="attempts"):
        open_storage(url, attempts=0)
    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", real)
    from sqlalchemy.exc import OperationalError
    with pytest.raises(OperationalError, match="unable to open database file"):  # not the race: raised at once
        open_storage(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}", wait_s=100)
