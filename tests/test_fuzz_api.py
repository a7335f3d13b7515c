"""Schemathesis against the app's own OpenAPI document, over real HTTP: over a thousand generated requests, and not
one server error or answer that breaks the document."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import PipelineLake
from tests.serve_lake import api_settings, serving

pytestmark = [pytest.mark.kafka, pytest.mark.spark]
# Seven operations (two more with metrics): 300 cases each keep the run about as long as five of 400 did.
EXAMPLES_PER_OPERATION = 300
MIN_REQUESTS = 1000
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api(pipeline_lake: PipelineLake, tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The API over the lake the pipeline wrote (shared, read only), with a store file of its own."""
    store = tmp_path_factory.mktemp("fuzzed-store")
    with serving(api_settings(pipeline_lake.root, api_refresh_seconds=5.0, api_store_dir=store)) as base:
        yield base


def test_generated_requests_get_no_server_error(api: str, capsys) -> None:  # type: ignore[no-untyped-def]
    # Schemathesis's pytest plugin does not run under this pytest, so each operation's strategy is driven by
    # Hypothesis directly: the same generated cases and checks, without the plugin.
    schema = schemathesis.openapi.from_url(f"{api}/schema/openapi.json")
    sent: Counter[str] = Counter()
    for found in schema.get_all_operations():
        run_operation(found.ok(), api, sent)
    with capsys.disabled():
        print(f"\nschemathesis: {sum(sent.values()):,} requests, 0 server errors; per operation {dict(sent)}")
    assert sum(sent.values()) >= MIN_REQUESTS, dict(sent)


def run_operation(operation, api: str, sent: Counter[str]) -> None:  # type: ignore[no-untyped-def]
    """Hypothesis drives the operation's generated cases; each is sent and its response checked."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy())
    def call(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call(base_url=api)
        sent[operation.label] += 1
        case.validate_response(response, checks=CHECKS)

    call()
