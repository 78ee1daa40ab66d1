"""The bookkeeper process: what it refuses to start with, migrations, restarts, clean stop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from bookkeeper.db import create_db_engine, current_revision, head_revision, migrate
from bookkeeper.migrations.versions.v0001_initial_schema import TRIGRAM_INDEX
from bookkeeper.models import Base
from common.config import BOOKKEEPER_TOKEN_PLACEHOLDER
from common.exitcodes import EX_CONFIG, EX_OK, EX_UNAVAILABLE
from tests.helpers import free_port
from tests.pg import (
    BACKENDS,
    bookkeeper_env,
    database_for,
    fresh_database,
    post,
    run_bookkeeper,
    series_received,
    sqlite_file,
    start_bookkeeper,
    unique_uid,
    write_config,
)

# ---------------------------------------------------------------------------- refusing to start


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), bookkeeper_api_key=None)

    done = run_bookkeeper(config, bookkeeper_env(None))

    assert done.returncode == EX_CONFIG, done.stderr
    assert "bookkeeper_api_key" in done.stderr
    assert "needs a token" in done.stderr


@pytest.mark.parametrize("where", ["file", "environment"])
def test_refuses_to_start_with_the_placeholder_token(tmp_path: Path, where: str) -> None:
    if where == "file":
        config = write_config(
            tmp_path, free_port(), bookkeeper_api_key=BOOKKEEPER_TOKEN_PLACEHOLDER
        )
        env = bookkeeper_env(None)
    else:
        config = write_config(tmp_path, free_port())
        env = bookkeeper_env(None, CADUCEUS_BOOKKEEPER_API_KEY=BOOKKEEPER_TOKEN_PLACEHOLDER)

    done = run_bookkeeper(config, env)

    assert done.returncode == EX_CONFIG, done.stderr
    assert "placeholder" in done.stderr


def test_refuses_to_start_with_a_short_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), bookkeeper_api_key="short-secret")

    done = run_bookkeeper(config, bookkeeper_env(None))

    assert done.returncode == EX_CONFIG, done.stderr
    assert "at least 16 characters" in done.stderr
    assert "short-secret" not in done.stderr


def test_refuses_to_start_with_a_malformed_listen_address(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), bookkeeper="localhost-without-port")

    done = run_bookkeeper(config, bookkeeper_env(None))

    assert done.returncode == EX_CONFIG, done.stderr
    assert "host:port" in done.stderr


def test_an_unreachable_database_exits_unavailable_so_the_supervisor_retries(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, free_port())
    nowhere = f"postgresql://caduceus:secret-password@127.0.0.1:{free_port()}/caduceus"

    done = run_bookkeeper(config, bookkeeper_env(nowhere))

    assert done.returncode == EX_UNAVAILABLE, done.stderr
    assert "cannot reach or migrate the database" in done.stderr
    assert "secret-password" not in done.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_database_from_a_newer_caduceus_is_refused(tmp_path: Path, backend: str) -> None:
    with database_for(backend, tmp_path, "newer") as database_url:
        url = database_url or f"sqlite:///{sqlite_file(tmp_path / 'data')}"
        engine = create_db_engine(url)
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
        engine.dispose()
        config = write_config(tmp_path, free_port())

        done = run_bookkeeper(config, bookkeeper_env(database_url))

    assert done.returncode == EX_CONFIG, done.stderr
    assert "f00d" in done.stderr


# ---------------------------------------------------------------------------- migrations


@pytest.mark.parametrize("backend", BACKENDS)
def test_starts_on_an_empty_database_and_restarts_on_its_own_data(
    tmp_path: Path, backend: str
) -> None:
    with database_for(backend, tmp_path, "restart") as database_url:
        first = start_bookkeeper(tmp_path, database_url)
        health = first.client({}).get("/health").json()
        assert health == {
            "status": "ok",
            "database": "reachable",
            "revision": head_revision(),
            "expected_revision": head_revision(),
        }
        uid = unique_uid()
        assert post(first.client(), [series_received(uid, count=3)])["stored"] == 1
        assert first.terminate() == EX_OK
        assert "migrated from empty" in first.log()
        assert sqlite_file(first.data_root).is_file() == (backend == "sqlite")

        second = start_bookkeeper(tmp_path, database_url, port=first.port)
        try:
            series = second.client().get(f"/v1/series/{uid}")
            assert series.status_code == 200
            assert series.json()["instance_count"] == 3
            assert "migrated" not in second.log()
        finally:
            assert second.terminate() == EX_OK
    assert "stopped" in second.log()


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_create_exactly_the_schema_of_the_models(tmp_path: Path, backend: str) -> None:
    with database_for(backend, tmp_path, "schema") as database_url:
        engine = create_db_engine(database_url or f"sqlite:///{tmp_path / 'schema.sqlite3'}")
        try:
            assert current_revision(engine) is None
            assert migrate(engine) == head_revision()
            assert migrate(engine) == head_revision()  # idempotent
            with engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True})
                differences = compare_metadata(context, Base.metadata)
        finally:
            engine.dispose()

    # The trigram index (PostgreSQL only) is deliberately not in the models.
    unexpected = [
        d for d in differences if not (d[0] == "remove_index" and d[1].name == TRIGRAM_INDEX)
    ]
    assert unexpected == []


def test_two_bookkeepers_migrating_one_postgresql_database_at_once_both_succeed() -> None:
    with fresh_database("race") as url:
        engines = [create_db_engine(url) for _ in range(2)]
        results: list[str] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(engines))

        def run(engine_index: int) -> None:
            barrier.wait()
            try:
                results.append(migrate(engines[engine_index]))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(engines))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for engine in engines:
            engine.dispose()

    assert errors == []
    assert results == [head_revision()] * 2
