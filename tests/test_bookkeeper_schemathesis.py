"""Property-based API test: schemathesis generates requests from the bookkeeper's own OpenAPI
schema (valid ones, and ones that break it) and sends them with the token; none may get a 5xx.

The number of examples per operation is bounded so that a backend takes well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok

from tests.pg import AUTH, BACKENDS, Bookkeeper, running_bookkeeper

EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}
"""Examples per operation and mode."""


@pytest.fixture(scope="module", params=BACKENDS)
def bookkeeper(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bookkeeper]:
    with running_bookkeeper(request.param, tmp_path_factory.mktemp("bookkeeper"), "fuzz") as bk:
        yield bk


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(EXAMPLES))
def test_no_generated_request_gets_a_server_error(
    bookkeeper: Bookkeeper, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{bookkeeper.url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert {op.label for op in operations} >= {
        "POST /v1/events",
        "GET /v1/series",
        "GET /v1/series/{series_uid}",
        "GET /v1/tasks/{task_id}",
        "GET /v1/tasks/{task_id}/logs",
        "GET /v1/tasks/{task_id}/results",
        "GET /v1/errors",
        "GET /v1/stats",
        "GET /health",
    }
    failures: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Case) -> None:
            response = case.call(base_url=bookkeeper.url, headers=AUTH, timeout=30)
            if response.status_code >= 500:
                command = case.as_curl_command(headers=AUTH, base_url=bookkeeper.url)
                failures.append(f"{response.status_code} {response.text[:300]}\n  {command}")

        try:
            call()
        except Unsatisfiable:  # nothing to break: an operation without parameters or body
            assert mode is GenerationMode.NEGATIVE, operation.label

    assert not failures, "\n".join(failures[:10])
    assert bookkeeper.process.poll() is None
