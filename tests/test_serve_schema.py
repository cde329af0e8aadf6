"""Fuzz the server's OpenAPI schema with schemathesis: whatever the request, never a 5xx.

Schemathesis reads /openapi.json from a live server and, for every operation, has
Hypothesis generate requests that conform to the schema (and, in its negative phase, some
that do not). A tiny model keeps each generation short; a few dozen examples per operation
keep the run bounded.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

# tests/ is on sys.path (conftest); the API tests' model fixtures are shared by importing them.
from test_serve_api import MODEL, LiveServer, _engine, loaded, model_dir  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def live_app(loaded):  # noqa: F811 (the fixture imported above)
    from genforge.serve.api import create_app

    app = create_app(_engine(loaded), tokenizers={MODEL: loaded[1]}, request_timeout=20.0)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(live_app):
    return schemathesis.openapi.from_url(live_app.url + "/openapi.json")


def test_no_request_gets_a_server_error(api_schema):
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models"} <= set(
        labels
    ), labels
    seen: dict[str, list[int]] = {}
    # Requests that fit the schema, then requests that break it (they must be 4xx, never 5xx).
    for operation, mode in [(op, mode) for op in operations for mode in GenerationMode]:

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call_and_validate(checks=[not_a_server_error])
            # Called at once, below, in the same iteration: `operation` is the current one.
            seen.setdefault(operation.label, []).append(response.status_code)  # noqa: B023

        try:
            fuzz()
        except Unsatisfiable:
            # An operation with nothing to get wrong (GET /health) has no negative cases.
            assert mode is GenerationMode.NEGATIVE, operation.label
    # The generation routes were reached with requests good enough to generate, not only refused.
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert 200 in seen[label], (label, sorted(set(seen[label])))
    print({label: sorted(set(codes)) for label, codes in seen.items()})
