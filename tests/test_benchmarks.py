"""The service benchmarks run end to end on the tiny model and report what they claim to measure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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
    assert 0 < result["summary"]["codebook_share_examined"]["1"] < 1
    assert all(r["exact_select_over_float32_argmax"] > 0 for r in result["inprocess"])
    memory = result["selection_memory"]
    assert memory[-1]["tokens"] >= 128 * memory[0]["tokens"]
    for row in memory:  # a few copies of the input plus fixed-size score chunks, never the tokens x K matrix
        assert row["peak_mib"] <= 4 * row["input_mib"] + 8, row
    assert result["flops"]["gq_select_gflop"] > 0 and result["flops"]["encoder_gflop"] > 0


def test_bd_rate_against_known_curves():
    from benchmarks.rd import bd_rate, hull

    anchor = [(0.1, 25.0), (0.2, 28.0), (0.4, 31.0)]
    assert bd_rate(anchor, anchor)[0] == pytest.approx(0.0, abs=1e-9)
    half = [(r / 2, q) for r, q in anchor]
    value, span = bd_rate(half, anchor)
    assert value == pytest.approx(-50.0) and span == (25.0, 31.0)
    assert bd_rate([(0.05, 20.0), (0.06, 21.0)], anchor) == (None, None)  # no overlap in quality
    assert hull([(0.3, 20.0), (0.1, 22.0), (0.2, 25.0)]) == [(0.1, 22.0), (0.2, 25.0)]  # dominated point dropped


def test_rd_benchmark_runs_every_prior_the_codec_and_the_anchors(tiny_model, tiny_codec_model, tmp_path):
    from benchmarks import rd

    out = tmp_path / "rd.json"
    result = rd.main(["--model", str(tiny_model), "--codec", str(tiny_codec_model), "--quick", "--photos", "1",
                      "--out", str(out)])
    ours = [p for p in result["points"] if p["codec"] == "gqtok"]
    priors = ("uniform", "frequency", "context", "pc")
    assert {(p["prior"], p["scale"]) for p in ours} == {(p, s) for p in priors for s in (1.0, 0.5)}
    at_1 = {p["prior"]: p for p in ours if p["scale"] == 1.0}
    assert at_1["context"]["bpp"] < at_1["frequency"]["bpp"] < at_1["uniform"]["bpp"]
    assert len({p["psnr"] for p in at_1.values()}) == 1  # same tokens, same pixels: only the rate differs
    anchors = ("jpeg", "webp", "avif", "jxl")  # Pillow's AVIF and imagecodecs' JPEG XL come with the dev extra
    assert {p["codec"] for p in result["points"]} == {"gqtok", "dvae", *anchors} and result["skipped"] == {}
    assert {(b["prior"], b["anchor"]) for b in result["bd_rate"] if "prior" in b} == {
        (p, a) for p in priors for a in anchors}
    # the codec: its lowest, middle and highest quality, rate rising, each against every anchor and the tokens
    codec = sorted((p for p in result["points"] if p["codec"] == "dvae"), key=lambda p: p["quality"])
    assert [p["quality"] for p in codec] == [1, 2, 3] and codec[0]["bpp"] < codec[-1]["bpp"]
    from gqtok.core.manifest import Manifest

    assert {p["model"] for p in codec} == {f"tiny-codec@{Manifest.read(tiny_codec_model).model_version}"}
    assert all(0 < p["side_bpp"] < p["bpp"] and 0 < p["coding_decode_ms"] < p["decode_ms"] for p in codec)
    # the side information under a circuit learned on training photos: the same stream but for z's bits
    assert all(p["pc_side_bpp"] > 0 and p["bpp_with_pc_side"] == pytest.approx(p["bpp"] - p["side_bpp"]
                                                                              + p["pc_side_bpp"]) for p in codec)
    assert codec[0]["unrounded_psnr"] > codec[0]["psnr"]  # rounding costs the lowest quality something
    assert {b["anchor"] for b in result["bd_rate"] if b.get("codec") == "dvae"} == {*anchors, "gqtok-context"}
    for codec in anchors:  # every anchor's curve: rate rises with its quality setting
        curve = sorted((p["quality"], p["bpp"]) for p in result["points"] if p["codec"] == codec)
        assert [b for _, b in curve] == sorted(b for _, b in curve) and curve[0][1] > 0, (codec, curve)
    saved = {s["prior"]: s["saved_bits_per_token"] for s in result["prior_savings"]}
    assert saved["context"] > saved["frequency"] > 0
    for p in ours:  # the entropy coding alone is part of the round trip's time
        assert 0 < p["coding_encode_ms"] < p["encode_ms"] and 0 < p["coding_decode_ms"] < p["decode_ms"]
    assert out.with_suffix(".png").stat().st_size > 10_000 and json.loads(out.read_text())["photos"] == 1


def test_generator_benchmark_times_both_ways(tmp_path):
    from benchmarks import generator

    result = generator.main(["--run", str(tmp_path / "none"), "--quick", "--out", str(tmp_path / "g.json")])
    (row,) = result["results"]
    assert row["tokens"] == 64 and row["kv_cache"]["tokens_per_s"] > 0 and row["no_cache"]["tokens_per_s"] > 0
    assert row["speedup_kv_cache"] == pytest.approx(row["kv_cache"]["tokens_per_s"] / row["no_cache"]["tokens_per_s"])
    assert result["source"]["weights"] == "random"


def test_recipe_study_trains_every_arm_for_the_same_steps(small_photos, tmp_path):
    """--quick: the schedule arms get the same calibrated steps, the network arms the steps of the same time, every
    arm's CPU time is measured, both evaluations are there, and a finished arm is reused rather than trained again."""
    from benchmarks import recipe

    args = ["--quick", "--endless", str(small_photos), "--photos", str(small_photos), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "recipe.json"), "--size", "64", "64"]
    result = recipe.main(args)
    names = [a["arm"] for a in result["arms"]]
    assert names == [name for name, _, _ in recipe.arms("e", "p", 10)] and names[-1] == "no-attention"
    # the schedule arms keep the baseline's network and its steps; the network arms get the steps of the same time
    assert all(a["steps"] == result["steps"] for a in result["arms"][:6])
    assert all(a["cpu_minutes"] > 0 and a["steps"] >= 4 for a in result["arms"])
    assert all(set(a["eval"]) == {"debian", "endless-sky"} and a["eval"]["debian"]["psnr"] > 5 for a in result["arms"])
    assert result["arms"][-1]["settings"]["tdc_lam_floor"] == 3e-6 and result["arms"][2]["settings"]["lr"] == 1e-3
    assert (tmp_path / "recipe.md").read_text().count("\n|") >= len(names) + 1
    assert (tmp_path / "recipe.png").stat().st_size > 0
    again = recipe.main(args)
    assert [a["cpu_minutes"] for a in again["arms"]] == [a["cpu_minutes"] for a in result["arms"]]


def test_flood_refuses_fast_answers_right_and_stays_live(tiny_model, tmp_path):
    """64 tokenize requests at once against a queue of 8, and an 8 MiB JSON token body: every status is 200 or 429,
    every 200 carries the image's own tokens, the JSON body is refused unparsed, /health/live never fails.
    (Its latencies are the benchmark's to report, not a test's to time.)"""
    from benchmarks import flood
    from gqtok.core.manifest import Manifest
    from gqtok.service.requests import json_tokens_limit
    from gqtok.service.settings import ServiceSettings

    class Served:  # what json_tokens_limit reads of a served model
        manifest = Manifest.read(tiny_model)

    # the premise of the 413: the quick JSON body is past what the flood server's limits can need
    assert json_tokens_limit([Served], ServiceSettings().max_image_pixels, flood.MAX_GRIDS) < 8 * 2**20
    result = flood.main(["--model", str(tiny_model), "--quick", "--out", str(tmp_path / "flood.json")])
    assert set(result["statuses"]) <= {"200", "429"} and result["statuses"].get("429", 0) > 0, result["statuses"]
    assert result["answered_wrong"] == 0 and result["answered_right"] == result["statuses"].get("200", 0) > 0
    # refused either way before it is parsed: 413 (past what the limits need) or 429 (past the requests in flight)
    assert set(result["json_bodies"]["statuses"]) <= {413, 429}, result["json_bodies"]
    assert result["health_live"]["failures"] == {} and result["health_live"]["probes"] > 0
    assert result["server_exit_code"] == 0
    lb = result["via_haproxy"]  # the same flood through HAProxy refusing in C, where haproxy is installed
    if "skipped" not in lb:
        assert set(lb["statuses"]) <= {"200", "429"} and lb["answered_wrong"] == 0, lb["statuses"]
        assert lb["health_live"]["failures"] == {}


def test_bulk_benchmark_compares_the_local_engine_with_the_ceiling(tiny_model, small_photos, tmp_path):
    from benchmarks import bulk

    out = tmp_path / "bulk.json"
    result = bulk.main(["--model", str(tiny_model), "--photos", str(small_photos), "--quick", "--no-ray",
                        "--out", str(out)])
    assert result["photos"] == 15 and result["ceiling_images_per_s"] > 0
    local = result["local"]
    assert local["over_ceiling"] == pytest.approx(local["images_per_s"] / result["ceiling_images_per_s"], abs=2e-3)
    steady = local["images_per_s_after_first_shard"]  # the rate after start-up (the first shard)
    assert 0 < local["first_shard_s"] and local["over_ceiling_after_first_shard"] == pytest.approx(
        steady / result["ceiling_images_per_s"], abs=2e-3)
    assert local["hours_per_million"] == pytest.approx((local["first_shard_s"] + 1e6 / steady) / 3600, abs=0.06)
    assert json.loads(out.read_text())["local"] == local


def test_hostile_clients_stay_within_the_memory_budget(tmp_path):
    """The hostile shapes (--quick) at the default model under compose's 1740 MiB budget and a refused flood at
    800: peak memory under each budget, no 5xx, probes never fail, well-formed requests right or refused.
    (The probes' latencies are the benchmark's to report, not a test's to time.)"""
    from benchmarks import hostile

    result = hostile.main(["--quick", "--out", str(tmp_path / "hostile.json")])
    for name in ("hostile", "refused_flood"):
        r = result[name]
        assert r["peak_resident_mib"] < r["budget_mb"] and r["server_errors"] == 0, (name, r)
        assert r["probe_failures"] == {} and r["probe_rounds"] > 0
        assert set(r["well_formed"]["statuses"]) <= {"200", "429"} and r["well_formed"]["wrong_tokens"] == 0
    waves = result["hostile"]["waves"]
    assert waves["slow"]["statuses"] == {"408": 12}
    assert any(w["statuses"].get("429") for w in waves.values())  # the budget did refuse something


def test_pc_benchmark_codes_digits_and_tokens(tiny_model, small_photos, tmp_path):
    """--quick: the circuit beats the per-pixel frequency model and PNG on the held-out digits (its own round trip
    is asserted inside), and the token priors are measured side by side on the same grids."""
    from benchmarks import pc

    result = pc.main(["--model", str(tiny_model), "--data", str(small_photos), "--quick",
                      "--out", str(tmp_path / "pc.json")])
    bpp = result["digits"]["bits_per_pixel"]
    assert bpp["pc"] < bpp["frequency"] < bpp["png"] and abs(bpp["pc"] - bpp["pc_ideal"]) < 0.01
    rows = {r["prior"]: r for r in result["tokens"]["priors"]}
    assert set(rows) == {"frequency", "context", "pc"} and rows["pc"]["window"] == [1, 1]
    assert all(0 < r["bits_per_token"] < 8 for r in rows.values())  # the tiny model has K = 256
    assert json.loads((tmp_path / "pc.json").read_text()) == result


def test_kl_size_benchmark_reports_rate_and_gq_cost_per_size(tiny_model, tmp_path):
    from benchmarks import kl_size

    result = kl_size.main(["--model", str(tiny_model), "--model", "default", "--quick",
                           "--out", str(tmp_path / "kl.json")])
    assert list(result["models"]) == [str(tiny_model), "default"]  # side by side, in the order given
    for spec, bits in ((str(tiny_model), 8.0), ("default", 16.0)):
        sizes = result["models"][spec]["sizes"]
        assert list(sizes) == ["128x128", "256x256"]
        for row in sizes.values():
            p5, p50, p95 = row["kl_p5_p50_p95"]
            assert row["photos"] == 3 and p5 <= p50 <= p95 and row["target_bits"] == bits
            assert row["gq_cost_db"] == pytest.approx(row["psnr_continuous"] - row["psnr_tokens"])
            assert len(row["signed_error_rgb"]) == 3 and np.isfinite(row["signed_error_rgb"]).all()


def test_quality_classic_reference(small_photos, tmp_path):
    """The plot's anchors: JPEG and WebP on the same crops at each rate, under it, better at the higher rate;
    kept and reused while photos, sizes and rates are the same."""
    from benchmarks import quality
    from gqtok.photos import list_images

    paths = list_images(small_photos)[:2]
    reference = quality.classic_reference(paths, [(256, 256)], [0.5, 1.0], tmp_path)["256x256"]
    for fmt in ("jpeg", "webp"):
        low, high = reference[f"{fmt}@0.5"], reference[f"{fmt}@1"]
        assert low["bpp"] <= 0.5 and low["bpp"] < high["bpp"] <= 1.0
        assert 15 < low["psnr"] < high["psnr"] and 0 < high["ms_ssim"] <= 1
    stored = json.loads((tmp_path / "classic.json").read_text())
    stored["reference"]["256x256"]["jpeg@1"]["psnr"] = 99.0
    (tmp_path / "classic.json").write_text(json.dumps(stored))
    assert quality.classic_reference(paths, [(256, 256)], [0.5, 1.0], tmp_path)["256x256"]["jpeg@1"]["psnr"] == 99
    assert quality.classic_reference(paths, [(256, 256)], [1.0], tmp_path)["256x256"]["jpeg@1"]["psnr"] < 99


def test_quality_evaluates_finished_runs_with_frozen_norms(small_photos, tmp_path):
    """--quick: three tiny runs (GQ + TDC, FSQ, plain KL) trained by the harness, measured with frozen norms; a
    run short of its steps is listed as unfinished, not measured; the KL per token only for the Gaussian VAEs;
    the plain-KL run also through TokenBridge; the plot written."""
    from benchmarks import quality
    from gqtok.training.train import train

    runs = tmp_path / "runs"
    train(runs / "vq_s0", small_photos, "tiny", {"steps": 20, "stop_at": 5, "image_every": 0},
          progress=False)
    result = quality.main(["--quick", "--runs", str(runs), "--photos", str(small_photos), "--data",
                           str(small_photos), "--out", str(tmp_path / "q.json")])
    assert result["unfinished"] == {"vq_s0": "step 5 of 20"}
    assert sorted(r["method"] for r in result["rows"]) == ["fsq", "gq_tdc", "plain_kl", "plain_kl+tokenbridge"]
    assert (tmp_path / "q.png").stat().st_size > 10_000
    assert (tmp_path / "q_rate_control.png").stat().st_size > 10_000  # the Gaussian VAEs' KL and lam over steps
    tb = result["by_method"]["plain_kl+tokenbridge"]
    assert tb["bpp"] == pytest.approx(8 / 64)  # tiny: 8 channels, one bit each per 8x8 patch
    assert result["by_method"]["plain_kl"]["bpp"] == pytest.approx(16 / 64)  # GQ: two 8-bit tokens
    assert (runs / "_frozen" / "gq_tdc_s0" / "config.json").exists()
    frozen = json.loads((runs / "_frozen" / "gq_tdc_s0" / "config.json").read_text())["model"]
    assert frozen["norm"] == "fixed"
    gq, fsq = result["by_method"]["gq_tdc"]["64x64"], result["by_method"]["fsq"]["64x64"]
    assert gq["kl_bits_per_token"]["mean"] > 0 and "kl_bits_per_token" not in fsq
    # the cost of quantizing for every method: GQ's posterior mean, FSQ's value before rounding, decoded
    assert "quantization_cost_db" in gq and "quantization_cost_db" in fsq
    fsq_row = next(r for r in result["rows"] if r["method"] == "fsq")["sizes"]["64x64"]
    assert fsq_row["psnr_continuous"] != fsq_row["psnr"]
    gq_row = next(r for r in result["rows"] if r["method"] == "gq_tdc")["sizes"]["64x64"]
    assert gq_row["kl_p5"] <= gq_row["kl_bits_per_token"] <= gq_row["kl_p95"] and 0 <= gq_row["kl_within_half_bit"] <= 1
    assert gq_row["quantization_cost_db"] == pytest.approx(gq_row["psnr_continuous"] - gq_row["psnr"])
    control = next(r for r in result["rows"] if r["method"] == "gq_tdc")["at_training_crop"]
    assert control["size"] == "64x64" and control["as_trained"]["psnr"] != control["frozen_norms"]["psnr"]
    for stats in (gq, fsq):
        assert 0 < stats["codebook_usage"]["mean"] <= 1 and stats["psnr"]["mean"] > 5
        assert stats["psnr"]["spread"] == 0  # one seed each
    assert "| gq_tdc | 1 | 10 |" in (tmp_path / "q.md").read_text()  # the table: seeds, steps
    # JPEG and WebP on the same crops at each learned rate (0.125: TokenBridge; 0.25: the others): at 64x64 their
    # headers alone are over both rates (test_quality_classic_reference measures them where they fit)
    assert sorted(result["classic"]["64x64"]) == ["jpeg@0.125", "jpeg@0.25", "webp@0.125", "webp@0.25"]
    assert "| webp@0.25 (Pillow) |" in (tmp_path / "q.md").read_text()

    # a second evaluation reuses each row while its run's step is the same (the marker below comes back), and
    # measures a run again once it has trained further
    row_file = runs / "_frozen" / "gq_tdc_s0.row.json"
    cached = json.loads(row_file.read_text())
    cached["row"]["sizes"]["64x64"]["psnr"] = 99.0
    row_file.write_text(json.dumps(cached))
    again = quality.main(["--quick", "--runs", str(runs), "--photos", str(small_photos), "--data", str(small_photos),
                          "--out", str(tmp_path / "q2.json")])
    assert again["by_method"]["gq_tdc"]["64x64"]["psnr"]["mean"] == 99.0
    assert again["by_method"]["fsq"] == result["by_method"]["fsq"]

    # runs/ is not kept between sessions: a run gone from RUNS keeps its row and its training curves from the
    # result written before (here a second FSQ seed and a TDC run of an earlier session), the runs here are measured
    earlier = json.loads((tmp_path / "q.json").read_text())
    gone = {**next(r for r in earlier["rows"] if r["run"] == "fsq_s0"), "run": "fsq_s1", "seed": 1}
    gone["sizes"]["64x64"]["psnr"] += 1.0
    earlier["rows"].append(gone)
    earlier["rate_curves"]["gq_tdc_s1"] = {**earlier["rate_curves"]["gq_tdc_s0"], "kl_mean": [3.0]}
    (tmp_path / "q.json").write_text(json.dumps(earlier))
    third = quality.main(["--quick", "--runs", str(runs), "--photos", str(small_photos), "--data", str(small_photos),
                          "--out", str(tmp_path / "q.json")])
    assert third["carried_over"] == ["fsq_s1"] and result["carried_over"] == []
    assert sorted(r["run"] for r in third["rows"]) == ["fsq_s0", "fsq_s1", "gq_tdc_s0", "plain_kl_s0", "plain_kl_s0"]
    fsq_psnr = third["by_method"]["fsq"]["64x64"]["psnr"]
    assert third["by_method"]["fsq"]["seeds"] == [0, 1] and fsq_psnr["spread"] == pytest.approx(1.0)
    assert third["rate_curves"]["gq_tdc_s1"]["kl_mean"] == [3.0]  # the gone run's curve, kept for the plot
    assert third["rate_curves"]["gq_tdc_s0"] == result["rate_curves"]["gq_tdc_s0"]  # the run here: its log
    assert "| fsq | 2 |" in (tmp_path / "q.md").read_text()


def test_quality_remembering_tokenizes_each_crop_once():
    """The study's tokenizer memo: the same crop (by content and shape) is encoded once, another crop again."""
    import numpy as np

    from benchmarks import quality

    calls = []
    tokenize = quality.remembering(lambda x: calls.append(1) or x[..., 0] // 2)
    a = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(1, 2, 4, 3)
    first = tokenize(a)
    assert np.array_equal(tokenize(a.copy()), first) and len(calls) == 1
    tokenize(a + 1), tokenize(a.reshape(1, 4, 2, 3))
    assert len(calls) == 3


def test_quality_plot_labels_at_one_rate_stay_apart():
    """The study's plot labels: close points at one rate get labels at least the gap apart, centred on them, in
    the points' order; a point with room, or at another rate, keeps its own height."""
    from benchmarks import quality

    points = [(0.25, 30.2, "a"), (0.249, 29.9, "b"), (0.25, 27.8, "c"), (0.25, 27.78, "d"), (0.25, 17.5, "e"),
              (0.5, 31.3, "f"), (0.5, 30.4, "g")]
    h = quality.spread_labels(points, gap=0.5)
    assert h[1] < h[0] and h[0] - h[1] >= 0.5 - 1e-9 and h[2] - h[3] >= 0.5 - 1e-9  # the order of the points
    assert abs((h[0] + h[1]) / 2 - (30.2 + 29.9) / 2) < 1e-9 and abs((h[2] + h[3]) / 2 - 27.79) < 1e-9
    assert h[4] == 17.5 and h[5:] == [31.3, 30.4]  # room enough: their own heights


def test_quality_plain_kl_calibration_picks_the_weight_nearest_tdc(small_photos, tmp_path):
    """The plain-KL weight's calibration: short real runs at two weights against a TDC run, compared by the
    training KL per token over a window of logged steps; the weight whose KL is nearest TDC's is chosen, and a
    window with no logged step is refused by name."""
    from benchmarks import quality
    from gqtok.training.train import train

    for name, settings in (("w0.1", {"kl_mode": "fixed", "kl_weight": 0.1}),
                           ("w1e-06", {"kl_mode": "fixed", "kl_weight": 1e-6})):
        train(tmp_path / "calib" / name, small_photos, "tiny", {"steps": 20, "image_every": 0, **settings},
              progress=False)
    train(tmp_path / "gq_tdc_s0", small_photos, "tiny", {"steps": 20, "image_every": 0}, progress=False)
    result = quality.plain_kl_calibration(tmp_path / "calib", tmp_path / "gq_tdc_s0", window=(10, 20))
    kl = {w: v["kl_mean"] for w, v in result["weights"].items()}
    assert sorted(kl) == ["0.1", "1e-06"] and kl["0.1"] < kl["1e-06"]  # the heavier weight, the fewer bits
    target = result["reference"]["kl_mean"]
    assert result["chosen"] == min(kl, key=lambda w: abs(kl[w] - target))
    assert f"| {result['chosen']} (chosen) |" in quality.calibration_table(result)
    assert result["unfinished"] == []
    train(tmp_path / "calib" / "w1", small_photos, "tiny", {"steps": 20, "stop_at": 10, "image_every": 0,
                                                             "kl_mode": "fixed", "kl_weight": 1.0}, progress=False)
    again = quality.plain_kl_calibration(tmp_path / "calib", tmp_path / "gq_tdc_s0", window=(10, 20))
    assert again["unfinished"] == ["w1"] and again["weights"] == result["weights"]  # short of step 20: not compared
    with pytest.raises(ValueError, match="no logged step in 500-800"):  # the reference must reach the window
        quality.plain_kl_calibration(tmp_path / "calib", tmp_path / "gq_tdc_s0", window=(500, 800))
