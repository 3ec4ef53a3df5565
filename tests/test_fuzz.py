"""Fuzz the live API from its own OpenAPI schema (schemathesis + hypothesis): whatever arrives, no 5xx.

For every operation the schema declares, schemathesis generates requests that
follow the schema (positive) and requests that break it (negative): random
bytes as images, token grids of any shape, odd query values, wrong content
types. Each goes over HTTP to a real server on the tiny model. The checks: every
one of schemathesis's checks that applies to a stateless API without auth (no
5xx, status codes, content types, headers and bodies as the schema declares,
negative data refused, 405 with Allow), and every 4xx carries our JSON error
body. The examples are random: the seed is printed (GQTOK_FUZZ_SEED replays a
run) and GQTOK_FUZZ_EXAMPLES sets the budget per operation and mode.

(The schema comes from the app object itself, so the operations are known when
pytest collects; schemathesis' own pytest plugin does not run under pytest 9.)
"""

from __future__ import annotations

import os
import random

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import ensure_resource_availability, ignored_auth, positive_data_acceptance, use_after_free

from gqtok.service.app import create_app
from gqtok.service.settings import ServiceSettings

pytestmark = pytest.mark.slow  # a live server on a trained model

SCHEMA = schemathesis.openapi.from_dict(create_app(ServiceSettings()).openapi())
SEED = int(os.environ.get("GQTOK_FUZZ_SEED") or random.randrange(2**32))
EXAMPLES = int(os.environ.get("GQTOK_FUZZ_EXAMPLES", "60"))
# stateful checks (resources created, then used or deleted) and auth checks: this API has neither. And
# positive_data_acceptance: a schema cannot say "a decodable image" or "ids below this model's K", so bodies valid
# by the schema are routinely unusable content, rightly answered 413 or 422
NOT_APPLICABLE = [use_after_free, ensure_resource_availability, ignored_auth, positive_data_acceptance]
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]

def breakable(op) -> bool:
    """Negative cases need something to break: a query parameter or a structured body. A free-form path
    segment cannot be broken, nor a raw binary body (any bytes fit its schema; positive cases send those)."""
    return len(op.query) > 0 or any(b.definition.get("schema", {}).get("format") != "binary" for b in op.body)


CASES = [pytest.param(op, mode, id=f"{op.label}-{mode.value}") for op in OPERATIONS for mode in GenerationMode
         if mode == GenerationMode.POSITIVE or breakable(op)]


def test_the_schema_declares_real_media_types_and_our_error_body():
    """/openapi.json tells clients the truth: what each route answers on success, and ErrorBody on errors."""
    spec = create_app(ServiceSettings()).openapi()
    ok = {("post", "/v1/tokenize"): {"application/json", "application/x-npy"},
          ("post", "/v1/detokenize"): {"image/png", "application/json", "application/x-npy"},
          ("post", "/v1/compress"): {"application/x-gqtok"},
          ("post", "/v1/decompress"): {"image/png", "application/x-npy"},
          ("get", "/v1/models/{model_id}/codebook"): {"application/x-npy", "application/octet-stream"}}
    for (method, path), media in ok.items():
        responses = spec["paths"][path][method]["responses"]
        content = responses["200"]["content"]
        assert set(content) == media, (path, set(content))
        assert all("schema" in c for c in content.values())
        statuses = ("400", "404", "503") if method == "get" else ("400", "404", "413", "415", "422", "429", "503")
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorBody", (path, status)
    assert "HTTPValidationError" not in str(spec)
    enums = spec["components"]["schemas"]
    assert enums["Fit"]["enum"] == ["pad", "crop", "exact"] and enums["PriorName"]["enum"] == ["uniform", "frequency", "context", "pc"]
    assert {"TokenizeRequest", "DetokenizeRequest", "TokenizeResponse", "ErrorBody"} <= set(enums)


def test_the_schema_declares_every_route():
    labels = {op.label for op in OPERATIONS}
    assert {"POST /v1/tokenize", "POST /v1/detokenize", "POST /v1/compress", "POST /v1/decompress", "GET /v1/models", "GET /v1/models/{model_id}",
            "GET /v1/models/{model_id}/codebook", "GET /health/ready", "GET /metrics", "GET /info"} <= labels


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_no_request_breaks_the_schema_or_gets_a_server_error(live_server, operation, mode):
    print(f"fuzz seed {SEED} (GQTOK_FUZZ_SEED={SEED} replays it), {EXAMPLES} examples")
    seen = {"4xx": 0, "2xx": 0}

    @given(case=operation.as_strategy(generation_mode=mode))
    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(base_url=live_server, excluded_checks=NOT_APPLICABLE, timeout=30)
        if 400 <= response.status_code < 500:
            body = response.json()
            assert set(body) == {"error", "error_type"} and body["error"], body
            seen["4xx"] += 1
        else:
            seen["2xx"] += 1

    run()
    assert sum(seen.values()) > 0
