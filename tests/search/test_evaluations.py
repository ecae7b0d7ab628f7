"""The evaluation cache in the store and its schema version."""

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from search.errors import SearchError
from search.evaluations import SCHEMA_VERSION, EvalCache, evaluations, schema, stored_schema_version
from search.model.removal import Removal
from search.sampler import removal_set
from search.store import open_storage
from search.study import run
from tests.search.test_study import tiny_config


def test_eval_cache_round_trip_and_first_writer_wins(tmp_path):
    engine = open_storage(f"sqlite:///{tmp_path / 'e.db'}").engine
    cache = EvalCache(engine, "model-a", "data-a", "float32@cpu/b4")
    assert cache.get(Removal.of([3, 1])) is None
    cache.put(Removal.of([3, 1]), 12.5, seconds=0.1)
    cache.put(Removal.of([1, 3]), 99.0)  # same set, other order: the first figure stays
    assert cache.get(Removal.of([1, 3])) == 12.5 and cache.count() == 1
    assert EvalCache(engine, "model-a", "data-a", "bfloat16@cpu/b4").get(Removal.of([1, 3])) is None  # other numerics
    assert EvalCache(engine, "model-b", "data-a", "float32@cpu/b4").get(Removal.of([1, 3])) is None  # other weights
    assert EvalCache(engine, "model-a", "data-b", "float32@cpu/b4").get(Removal.of([1, 3])) is None  # other windows


def test_eval_cache_on_postgresql(postgres_url):
    cache = EvalCache(open_storage(postgres_url).engine, "m", "d", "float32@cpu/b4")
    cache.put(Removal(), 7.0)
    cache.put(Removal(), 8.0)
    assert cache.get(Removal()) == 7.0


def test_a_second_study_on_the_same_model_and_data_reuses_every_evaluation(tmp_path, tiny_model_dir, corpus):
    first = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=8, study="one"))
    second = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=8, study="two", budget=0.4, seed=5))
    by_set = {removal_set(t): t.values for t in first.get_trials(states=(TrialState.COMPLETE,))}
    reused = [t for t in second.get_trials(states=(TrialState.COMPLETE,)) if removal_set(t) in by_set]
    assert reused  # the greedy path is the same, at least
    for trial in reused:
        assert trial.user_attrs["ppl_from"] == "store"
        assert trial.values[0] == pytest.approx(by_set[removal_set(trial)][0], rel=1e-12)
    fresh = [t for t in second.get_trials(states=(TrialState.COMPLETE,)) if removal_set(t) not in by_set]
    assert all(t.user_attrs["ppl_from"] == "computed" for t in fresh)


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def schema_rows(url: str) -> list[tuple[str, int]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.select(schema.c.name, schema.c.version))]
    finally:
        engine.dispose()


def set_schema_version(url: str, version: int) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(schema.update().where(schema.c.name == "search_evaluations").values(version=version))
    engine.dispose()


def test_a_new_store_records_schema_version_1(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    storage = open_storage(url)
    assert SCHEMA_VERSION == 1 and stored_schema_version(storage.engine) == 1
    open_storage(url)  # opened again: still one row
    assert schema_rows(url) == [("search_evaluations", 1)]


def test_a_store_from_before_the_version_reads_as_1_and_gets_the_row(tmp_path):
    db = tmp_path / "old.db"
    shutil.copyfile(FIXTURES / "store_493c72b.db", db)  # written by commit 493c72b: no search_schema table
    url = f"sqlite:///{db}"
    assert "search_schema" not in sa.inspect(sa.create_engine(url)).get_table_names()
    before = db.read_bytes()
    db.chmod(0o444)  # a reader (`front`, `show`, `export`) needs no write access to an old store
    open_storage(url, create=False)
    assert db.read_bytes() == before and stored_schema_version(sa.create_engine(url)) is None
    db.chmod(0o644)
    storage = open_storage(url)  # a writer (`run`) records the version
    assert schema_rows(url) == [("search_evaluations", 1)]
    with storage.engine.connect() as conn:  # its cached evaluations are all still there
        assert conn.execute(sa.select(sa.func.count()).select_from(evaluations)).scalar() == 98


def test_a_store_from_a_newer_version_is_refused_in_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    open_storage(url)
    set_schema_version(url, 2)
    with pytest.raises(SearchError, match=r"written by a newer version of search \(schema 2") as caught:
        open_storage(url)
    assert len(str(caught.value).splitlines()) == 1 and "upgrade" in str(caught.value)
    assert schema_rows(url) == [("search_evaluations", 2)]  # left as it was


def test_the_cli_refuses_a_newer_store_in_one_line(tmp_path):
    from tests.test_cli import assert_one_line_error, cli

    store = tmp_path / "newer.db"
    url = f"sqlite:///{store}"
    open_storage(url)
    set_schema_version(url, 2)
    result = cli("run", "--budget", "8%", "--trials", "1", "--study", "x", "--storage", url, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, str(store), "newer version of search (schema 2", "upgrade")
    assert_one_line_error(cli("front", "--storage", url, cwd=tmp_path), "newer version of search")


def test_schema_version_on_postgresql(postgres_url):
    storage = open_storage(postgres_url)
    assert stored_schema_version(storage.engine) == 1
    assert ("search_evaluations", 1) in schema_rows(postgres_url)
    set_schema_version(postgres_url, 2)
    try:
        with pytest.raises(SearchError, match=r"newer version of search \(schema 2") as caught:
            open_storage(postgres_url)
        assert "search@127.0.0.1" in str(caught.value)
    finally:
        set_schema_version(postgres_url, 1)  # the server is shared by the session's other tests
    # A store from before the version: the row is missing, reads as 1 and is written back.
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(schema.delete())
    engine.dispose()
    open_storage(postgres_url)
    assert ("search_evaluations", 1) in schema_rows(postgres_url)
