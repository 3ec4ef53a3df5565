"""training/evaluate.py's any-tokenizer report and `gqtok eval` on a user's own folder: an exported model, a run
and a live server on the same photos, against JPEG and WebP at the same bpp."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from gqtok.cli import collect_photos, main
from gqtok.training.evaluate import classic_at_bpp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_photos(photos_dir, tmp_path_factory):
    """A user's folder: five photos under their own names (none of them in any held-out list), one too small."""
    out = tmp_path_factory.mktemp("my-photos")
    for i, p in enumerate(sorted(photos_dir.glob("*.jpg"))[:4]):
        shutil.copyfile(p, out / f"holiday-{i}.jpg")
    Image.open(next(photos_dir.glob("*.jpg"))).resize((40, 30)).save(out / "thumb.png")
    return out


def run_eval(capsys, *argv) -> dict:
    main(["eval", *argv, "--quiet"])
    return json.loads(capsys.readouterr().out)


def test_own_folder_with_an_exported_model(tiny_model, own_photos, tmp_path, capsys):
    out = tmp_path / "eval.json"
    summary = run_eval(capsys, str(tiny_model), "--photos", str(own_photos), "--split", "all",
                       "--size", "64", "96", "--size", "128", "128", "--json", str(out), "--png", str(tmp_path / "grid.png"))
    full = json.loads(out.read_text())
    assert set(summary) == set(full) == {"64x96", "128x128"}
    r = full["64x96"]
    assert r["images"] == 4 and len(r["skipped_smaller_than_crop"]) == 1  # the 40x30 thumbnail is not upscaled
    assert r["bpp"] == pytest.approx(2 * 8 / 64)  # tiny: 2 tokens of 8 bits per 8x8 patch
    assert 10 < r["tokens"]["psnr"] < 40
    assert r["tokens"]["colour_shift"] >= 0 and r["tokens"]["delta_e76"] > 0 and r["jpeg"]["grey_images"] >= 0
    for row in r["per_image"]:  # matched rate, unless even quality 1 is above it (headers of tiny crops)
        assert all(row[k]["bpp"] <= row["bpp"] or row[k]["quality"] == 1 for k in ("jpeg", "webp"))
    assert r["psnr_gap_to_jpeg"] == pytest.approx(r["tokens"]["psnr"] - r["jpeg"]["psnr"])
    assert list(r["per_source"]) == [own_photos.name] and r["per_source"][own_photos.name]["images"] == 4
    with Image.open(tmp_path / "grid.64x96.jpg") as grid:  # one source: one row of original | tokens | JPEG
        assert grid.size == (3 * 96, 64)


def test_run_server_and_export_agree(tiny_run, tiny_model, live_server, own_photos, capsys):
    args = ["--photos", str(own_photos), "--split", "all", "--size", "64", "96", "--no-classic"]
    exported = run_eval(capsys, str(tiny_model), *args)["64x96"]
    served = run_eval(capsys, live_server, *args)["64x96"]
    trained = run_eval(capsys, str(tiny_run), *args)["64x96"]
    assert served["tokens"]["psnr"] == pytest.approx(exported["tokens"]["psnr"], abs=1e-9)  # the same runtime
    assert trained["tokens"]["psnr"] == pytest.approx(exported["tokens"]["psnr"], abs=0.5)  # torch vs onnxruntime
    assert "jpeg" not in exported


def test_heldout_split_of_a_folder_with_none_says_what_to_do(own_photos, photos_dir):
    with pytest.raises(ValueError, match="--split all"):
        collect_photos([str(own_photos)], "heldout")
    held = collect_photos([str(photos_dir)], "heldout")
    assert len(held) == 24
    listing = own_photos / "list.txt"
    listing.write_text("\n".join(str(p) for p in held[:2]) + "\n")
    assert collect_photos([str(listing)], "all") == held[:2]


def test_classic_codecs_stay_under_the_target_rate(photos_dir):
    img = np.asarray(Image.open(next(photos_dir.glob("*.jpg"))).convert("RGB"))[:256, :256]
    for fmt in ("JPEG", "WEBP"):
        decoded, bpp, quality = classic_at_bpp(img, fmt, 0.5)
        assert bpp <= 0.5 and decoded.shape == img.shape and 1 <= quality <= 95
        _, higher, q2 = classic_at_bpp(img, fmt, 2.0)
        assert higher > bpp and q2 > quality


def test_an_unreadable_photo_is_listed_and_the_others_are_measured(tiny_model, own_photos, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(own_photos, folder)
    (folder / "broken.jpg").write_bytes((folder / "holiday-0.jpg").read_bytes()[:300])
    out = tmp_path / "eval.json"
    summary = run_eval(capsys, str(tiny_model), "--photos", str(folder), "--split", "all", "--size", "64", "96",
                       "--json", str(out))
    r = json.loads(out.read_text())["64x96"]
    assert r["images"] == 4 and [f["image"] for f in r["failed"]] == [str(folder / "broken.jpg")]
    assert "OSError" in r["failed"][0]["error"] and summary["64x96"]["failed"] == r["failed"]


def test_colour_metrics_see_a_cast_and_a_tinted_grey():
    from gqtok.training.evaluate import colour_metrics, srgb_to_lab

    # CIELAB of sRGB white, black and red (the standard D65 values)
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    assert np.allclose(lab, [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20]], atol=0.02)
    grey = np.tile(np.linspace(20, 230, 64, dtype=np.uint8)[:, None, None], (1, 48, 3))
    blue = grey.copy()
    blue[..., 2] = np.minimum(255, blue[..., 2].astype(int) + 8)
    cast = colour_metrics(grey, blue)
    assert cast["grey_chroma"] > 2 and cast["colour_shift"] > 2 and cast["delta_e76"] >= cast["colour_shift"] - 1e-9
    same = colour_metrics(grey, grey)
    assert same["colour_shift"] == 0 and same["delta_e76"] == 0 and same["grey_chroma"] < 1e-3
    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert colour_metrics(colour, colour)["grey_chroma"] is None  # a colour photo has no grey figure


def test_every_photo_made_grey_measures_a_tint(own_photos):
    """greyed_chroma: each crop made grey goes through the tokenizer too; a tokenizer that gives back what it got
    scores 0, one that adds blue does not. The same for the Frechet distance (fd=True)."""
    from gqtok import photos
    from gqtok.training.evaluate import evaluate_tokenizer

    def blue(ids):
        out = ids.astype(int)
        out[..., 2] += 8
        return np.minimum(out, 255).astype(np.uint8)

    paths = photos.list_images(own_photos)
    same = evaluate_tokenizer(lambda x: x, lambda ids: ids, paths, (64, 96), 8.0, classic=False, progress=False,
                              fd=True)
    tinted = evaluate_tokenizer(lambda x: x, blue, paths, (64, 96), 8.0, classic=False, progress=False, fd=True)
    assert same["tokens"]["greyed_chroma"] < 1e-3 and tinted["tokens"]["greyed_chroma"] > 2
    # --fd in this report too: the same pictures are at distance 0, tinted ones are not
    assert abs(same["fd_effnet_lite0"]["tokens"]) < 1e-3 < tinted["fd_effnet_lite0"]["tokens"]
    assert all(row["tokens"]["greyed_chroma"] > 2 for row in tinted["per_image"])


def test_greyed_false_tokenizes_each_photo_once(own_photos):
    """greyed=False (the studies that never read greyed_chroma): one tokenize per photo, the figure left out, the
    other figures the same as with it."""
    from gqtok import photos
    from gqtok.training.evaluate import evaluate_tokenizer

    calls = []

    def tokenize(x):
        calls.append(x.shape)
        return x

    def coarse(ids):  # a finite PSNR to compare
        return ids // 4 * 4

    paths = photos.list_images(own_photos)
    lean = evaluate_tokenizer(tokenize, coarse, paths, (64, 96), 8.0, classic=False, progress=False, greyed=False)
    assert len(calls) == lean["images"] > 0 and "greyed_chroma" not in lean["tokens"]
    full = evaluate_tokenizer(tokenize, coarse, paths, (64, 96), 8.0, classic=False, progress=False)
    assert len(calls) == 3 * lean["images"] and 20 < full["tokens"]["psnr"] == lean["tokens"]["psnr"] < 60
