"""The service benchmarks run end to end on the tiny model and report what they claim to measure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow


def test_soak_mixed_requests_all_answered_correctly(tiny_model, tmp_path):
    """600 mixed requests (good, bad, metadata) at concurrency 8: every answer has the status its request
    calls for, tokens and pixels equal the ones computed before the soak, and the server exits cleanly."""
    from benchmarks import soak

    out = tmp_path / "soak.json"
    result = soak.main(["--model", str(tiny_model), "--requests", "600", "--out", str(out)])
    assert result["requests"] == 600 and result["failed"] == 0, result["failures"]
    assert all(result["by_kind"][k] > 0 for k in ("tokenize_png", "detokenize_npy", "bad_truncated_png"))
    assert result["server_exit_code"] == 0
    assert json.loads(out.read_text())["requests"] == 600


def test_service_benchmark_compares_server_with_its_ceiling(tiny_model, tmp_path):
    from benchmarks import service

    out = tmp_path / "service.json"
    result = service.main(["--model", str(tiny_model), "--concurrency", "1", "4", "--seconds", "1", "--out", str(out)])
    for route in ("tokenize", "detokenize"):
        s = result["summary"][route]
        assert s["server_saturation_images_per_s"] > 0 and s["inprocess_ceiling_images_per_s"] > 0
        assert s["server_over_ceiling"] == pytest.approx(
            s["server_saturation_images_per_s"] / s["inprocess_ceiling_images_per_s"], abs=1e-3)
    assert all(r["errors"] == 0 for r in result["server"] + result["server_nobatch"])
    assert [r["batch_size"] for r in result["inprocess"]] == [1, 4]
    assert 0 < result["summary"]["gq_share_of_tokenize"]["1"] < 1
    memory = result["selection_memory"]
    assert memory[-1]["tokens"] >= 128 * memory[0]["tokens"]
    for row in memory:  # a few copies of the input plus fixed-size score chunks, never the tokens x K matrix
        assert row["peak_mib"] <= 4 * row["input_mib"] + 8, row
    assert result["flops"]["gq_select_gflop"] > 0 and result["flops"]["encoder_gflop"] > 0
