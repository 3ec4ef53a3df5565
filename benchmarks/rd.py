"""Rate-distortion: gqtok as an image codec (tokens entropy-coded with each prior) against JPEG, WebP, AVIF, JPEG XL.

    python benchmarks/rd.py [--model DIR ...] [--codec DIR ...] [--scales 1 0.75 0.5] [--photos 24] [--quick]

One run, side by side, on the held-out photos (768x512 centre crops, data/endless-sky; --size 256 256 for
256x256 crops, written to rd_256x256.json):
  gqtok     every model given (default: models/default) x every prior it has (uniform, frequency,
            context); the first model at every scale, the others at scale 1 (their own rate: d = 8 or 4
            at f = 8 give 2 or 4 tokens per position). Scale is rate control by resolution: the photo is resized by
            `scale` (Pillow, bicubic), compressed, decompressed and resized back. bpp comes from the
            actual bytes of the bitstream, header included, over the 768x512 pixels.
  dvae      every codec model given (default: models/codec, the discretized-VAE codec) at each of its qualities:
            the rate knob itself, at full size. Also the side information's share of the bits (z's information
            content under its tables), the time of the networks and of the entropy coding apart, and the
            network's ceiling: the decoder on the encoder's unrounded means (unrounded_psnr, unrounded_ms_ssim)
            and the side information under a probabilistic circuit in place of its factorized prior (pc_side_bpp,
            bpp_with_pc_side: an HCLT over z's channels at a position, learned per quality on --pc-side-photos
            training photos; the ideal lengths of the circuit's coder, not a written stream)
  jpeg      Pillow's JPEG (4:2:0, optimized Huffman tables) over a range of quality settings
  webp      Pillow's WebP (method 6) over a range of quality settings
  avif      Pillow's AVIF (libavif/aom, its default speed 6, 4:2:0) over a range of quality settings
  jxl       JPEG XL by imagecodecs (libjxl, effort 7) over a range of quality levels; left out, and said
            so in the JSON's "skipped", where imagecodecs is not installed (it is in the dev extra)
Every anchor's bpp counts every byte of its file, container included.
Metrics: PSNR and MS-SSIM (training/evaluate.py). Per codec point: mean bpp, mean metrics, median
encode and decode time per image (gqtok: tokenize + entropy coding, entropy decoding + detokenize;
one image at a time on the CPU provider), and for gqtok the entropy coding alone (coding_encode_ms,
coding_decode_ms).
BD-rate (Bjontegaard delta rate): the mean difference in log rate between two RD curves over the
PSNR (or MS-SSIM in dB, -10 log10(1 - MS-SSIM)) range both cover, with log rate interpolated
piecewise-linearly between measured points (each curve its lower convex hull in rate). Negative:
gqtok needs fewer bits at equal quality. Null where the curves do not overlap.
BD-rates are reported for each gqtok prior's curve (its scales) and each dvae codec's curve (its qualities)
against every anchor, and for the dvae codec against the gqtok context-prior curve.
Writes benchmarks/results/rd.json and rd.png (--quick: rd_quick.*).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
ANCHORS = {  # codec -> the quality settings of its curve
    "jpeg": (1, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 75, 90),
    "webp": (0, 2, 5, 10, 20, 30, 40, 50, 60, 75, 90),
    "avif": (0, 2, 5, 10, 20, 30, 45, 60, 75, 90),
    "jxl": (1, 5, 10, 20, 30, 45, 60, 75, 90),
}
QUICK_ANCHORS = {"jpeg": (1, 5, 10, 30, 75), "webp": (0, 5, 20, 50), "avif": (2, 20, 50), "jxl": (5, 30, 60)}


def heldout_photos(n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The first n held-out photos' centre crops of size (H, W) (default 512x768)."""
    from gqtok.photos import HELDOUT, HELDOUT_SIZE, center_crop, load_rgb
    from gqtok.training.data import DEFAULT_DATA_DIR

    paths = [REPO / DEFAULT_DATA_DIR / f"{stem}.jpg" for stem in HELDOUT[:n]]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"held-out photos missing ({', '.join(missing[:3])}...): run `gqtok data fetch`")
    return [center_crop(load_rgb(p), tuple(size or HELDOUT_SIZE)) for p in paths]


def training_photos(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """The first n training photos (never the held-out ones) as centre crops of size (H, W)."""
    from gqtok.photos import center_crop, list_images, load_rgb, split_heldout
    from gqtok.training.data import DEFAULT_DATA_DIR

    train, _ = split_heldout(list_images(REPO / DEFAULT_DATA_DIR))
    return [center_crop(load_rgb(p), tuple(size)) for p in train[:n]]


# The pc side prior: z's values as circuit variables, |z| <= PC_SIDE_RADIUS as themselves, beyond it an escape
# followed by 16 raw bits (as the codec's own tables escape)
PC_SIDE_RADIUS = 15


def pc_side_symbols(z: np.ndarray) -> tuple[np.ndarray, int]:
    """z [Cz, h, w] -> (one sample per position over the Cz channels, int [h * w, Cz]; escaped values)."""
    flat = np.asarray(z, np.int64).reshape(z.shape[0], -1).T
    escaped = np.abs(flat) > PC_SIDE_RADIUS
    return np.where(escaped, 2 * PC_SIDE_RADIUS + 1, flat + PC_SIDE_RADIUS), int(escaped.sum())


def pc_side_bits(codec, quality: int, train: list[np.ndarray], held_z: list[np.ndarray]) -> tuple[list[float], dict]:
    """Learn an HCLT over the side information's channels at one position (gqtok/core/circuit.py; 16 hidden
    states, 20 EM steps) on the training photos' z at this quality -> (bits of each held-out z under it, as the
    coder's frequencies give them, escapes included; the fit's figures)."""
    from gqtok.training.circuit import CircuitConfig, learn_hclt

    x = np.concatenate([pc_side_symbols(codec.encode(img, quality)[1])[0] for img in train])
    circuit, fit = learn_hclt(x, 2 * PC_SIDE_RADIUS + 2, CircuitConfig(hidden=16, em_steps=20), progress=False)
    bits = []
    for z in held_z:
        symbols, escaped = pc_side_symbols(z)
        bits.append(float(circuit.code_lengths(symbols).sum()) + 16.0 * escaped)
    return bits, {"train_positions": len(x), "learn_cpu_s": fit["learn_cpu_s"]}


def source_photos(folders: list[str], size: tuple[int, int]) -> list[np.ndarray]:
    """Every photo under these folders at least `size` (H, W) large, centre-cropped to it (smaller ones are left
    out, as gqtok eval does), in name order."""
    from gqtok.photos import center_crop, list_images, load_rgb

    crops = []
    for folder in folders:
        for path in list_images(Path(folder)):
            img = load_rgb(path)
            if img.shape[0] >= size[0] and img.shape[1] >= size[1]:
                crops.append(center_crop(img, tuple(size)))
    if not crops:
        raise SystemExit(f"no photo of at least {size[1]}x{size[0]} under {', '.join(folders)}")
    return crops


def resize(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(size_hw):
        return img
    return np.asarray(Image.fromarray(img).resize((size_hw[1], size_hw[0]), Image.BICUBIC))


def classic_round_trip(img: np.ndarray, codec: str, quality: int) -> tuple[bytes, np.ndarray, float, float]:
    """Encode and decode with an anchor codec: (file bytes, decoded RGB, encode s, decode s)."""
    t0 = time.perf_counter()
    if codec == "jxl":
        import imagecodecs

        data = imagecodecs.jpegxl_encode(img, level=quality, effort=7)
        t1 = time.perf_counter()
        return data, imagecodecs.jpegxl_decode(data)[..., :3], t1 - t0, time.perf_counter() - t1
    buf = io.BytesIO()
    options = {"jpeg": dict(format="JPEG", optimize=True, subsampling="4:2:0"), "webp": dict(format="WEBP", method=6),
               "avif": dict(format="AVIF")}[codec]
    Image.fromarray(img).save(buf, quality=quality, **options)
    t1 = time.perf_counter()
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        out = np.asarray(im.convert("RGB"))
    return buf.getvalue(), out, t1 - t0, time.perf_counter() - t1


def available_anchors(anchors: dict) -> tuple[dict, dict]:
    """The anchors this machine can run, and why the others cannot."""
    skipped = {}
    try:
        import imagecodecs

        if not imagecodecs.JPEGXL.available:
            skipped["jxl"] = "imagecodecs was built without JPEG XL"
    except ImportError:
        skipped["jxl"] = "imagecodecs is not installed (pip install imagecodecs)"
    from PIL import features

    if not features.check("avif"):
        skipped["avif"] = "this Pillow has no AVIF support"
    return {c: q for c, q in anchors.items() if c not in skipped}, skipped


def summarize(rows: list[dict], **keys) -> dict:
    """Per-photo rows of one codec setting -> one RD point (means of rate and quality, medians of time)."""
    return keys | {
        "bpp": float(np.mean([r["bpp"] for r in rows])),
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ms_ssim": float(np.mean([r["ms_ssim"] for r in rows])),
        "encode_ms": 1e3 * float(np.median([r["encode_s"] for r in rows])),
        "decode_ms": 1e3 * float(np.median([r["decode_s"] for r in rows])),
        "photos": len(rows),
    } | {f"{k[:-2]}_ms": 1e3 * float(np.median([r[k] for r in rows]))  # gqtok's entropy coding alone
         for k in ("coding_encode_s", "coding_decode_s") if k in rows[0]}


def ms_ssim_db(v: float) -> float:
    return -10 * math.log10(max(1 - v, 1e-12))


def hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(rate, quality) points -> those on the upper-left frontier, sorted by rate, quality strictly rising."""
    out = []
    for rate, q in sorted(points):
        if not out or q > out[-1][1]:
            out.append((rate, q))
    return out


def bd_rate(test: list[tuple[float, float]], anchor: list[tuple[float, float]],
            samples: int = 1000) -> tuple[float | None, tuple[float, float] | None]:
    """Bjontegaard delta rate (%) of test against anchor, and the quality range it averages over;
    (rate, quality) points; (None, None) without overlap."""
    t, a = hull(test), hull(anchor)
    if len(t) < 2 or len(a) < 2:
        return None, None
    lo, hi = max(t[0][1], a[0][1]), min(t[-1][1], a[-1][1])
    if hi <= lo:
        return None, None
    q = np.linspace(lo, hi, samples)

    def log_rate(curve):
        return np.interp(q, [p[1] for p in curve], [math.log(p[0]) for p in curve])

    return 100 * (math.exp(float(np.mean(log_rate(t) - log_rate(a)))) - 1), (lo, hi)


def anchor_rate_at(quality: float, anchor: list[tuple[float, float]]) -> float | None:
    """The rate the anchor needs for `quality` (interpolated in log rate); None outside its measured range."""
    a = hull(anchor)
    if not a[0][1] <= quality <= a[-1][1]:
        return None
    return math.exp(float(np.interp(quality, [p[1] for p in a], [math.log(p[0]) for p in a])))


def anchor_quality_at(rate: float, anchor: list[tuple[float, float]]) -> float | None:
    """The quality the anchor reaches at `rate` (interpolated in log rate); None outside its measured range."""
    a = hull(anchor)
    if not a[0][0] <= rate <= a[-1][0]:
        return None
    return float(np.interp(math.log(rate), [math.log(p[0]) for p in a], [p[1] for p in a]))


def shown(path) -> str:
    """A model path as the results file records it: relative to the repository when inside it, else its folder's
    name (a results file never holds a path of this machine)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


def run(args) -> dict:
    from gqtok.core.artifact import load_artifact
    from gqtok.service.compressor import ImageCompressor
    from gqtok.core.layout import fit_to_grid
    from gqtok.training.evaluate import image_metrics

    photos = source_photos(args.sources, args.size) if args.sources else heldout_photos(args.photos, args.size)
    h, w = photos[0].shape[:2]
    points, t_start = [], time.perf_counter()
    for index, model_dir in enumerate(args.model):
        compressor = ImageCompressor(load_artifact(model_dir), device="cpu", threads=args.threads)
        m = compressor.runtime.manifest
        priors = [p for p in compressor.priors if not args.priors or p in args.priors]
        for scale in args.scales if index == 0 else [1.0]:
            size = (round(h * scale), round(w * scale))
            rows = {p: [] for p in priors}
            for i, img in enumerate(photos):
                small = resize(img, size)
                t0 = time.perf_counter()  # tokenize once per photo: only the entropy coding differs by prior
                ids = compressor.runtime.tokenize(fit_to_grid(small, m.downsample, "pad")[None])[0]
                tokenize_s = time.perf_counter() - t0
                for prior in priors:
                    t0 = time.perf_counter()
                    data = compressor.tokens.compress(ids, small.shape[:2], prior)
                    code_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    decoded, _ = compressor.tokens.decompress(data)
                    uncode_s = time.perf_counter() - t0
                    out = compressor.runtime.detokenize(decoded[None])[0, : small.shape[0], : small.shape[1]]
                    dec_s = time.perf_counter() - t0
                    out = resize(out, (h, w))
                    rows[prior].append({"bpp": 8 * len(data) / (h * w), "encode_s": tokenize_s + code_s,
                                        "decode_s": dec_s, "coding_encode_s": code_s, "coding_decode_s": uncode_s}
                                       | image_metrics(img, out))
                print(f"  {m.model_id} scale {scale:g}: photo {i + 1}/{len(photos)}", end="\r", file=sys.stderr)
            for prior in priors:
                pt = summarize(rows[prior], codec="gqtok", model=m.model_id, prior=prior, scale=scale,
                               token_dim=m.token_dim, bits_per_token=None)
                tokens = m.tokens_per_position * math.ceil(size[0] / m.downsample) * math.ceil(size[1] / m.downsample)
                pt["bits_per_token"] = pt["bpp"] * h * w / tokens
                points.append(pt)
                print(f"{m.model_id} scale {scale:g} {prior:9s} {pt['bpp']:.4f} bpp  {pt['psnr']:.2f} dB  "
                      f"MS-SSIM {pt['ms_ssim']:.4f}  {pt['bits_per_token']:.2f} bits/token  "
                      f"enc {pt['encode_ms']:.0f} ms  dec {pt['decode_ms']:.0f} ms", file=sys.stderr)
    for model_dir in args.codec:
        points += codec_points(model_dir, photos, args)
    anchors, skipped = available_anchors(args.anchors)
    for codec, qualities in anchors.items():
        for q in qualities:
            rows = []
            for img in photos:
                data, out, enc_s, dec_s = classic_round_trip(img, codec, q)
                rows.append({"bpp": 8 * len(data) / (h * w), "encode_s": enc_s, "decode_s": dec_s}
                            | image_metrics(img, out))
            points.append(summarize(rows, codec=codec, quality=q))
        print(f"{codec}: {len(qualities)} settings done", file=sys.stderr)

    bd, savings = score(points)
    return {
        "benchmark": "rd", "quick": args.quick, "photos": len(photos),
        "sources": args.sources or ["endless-sky held-out"], "size_hw": [h, w], "scales": args.scales,
        "models": [shown(d) for d in args.model], "codecs": [shown(d) for d in args.codec],
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "seconds": round(time.perf_counter() - t_start, 1),
        "points": points, "bd_rate": bd, "prior_savings": savings,
        "skipped": skipped,
    }


def codec_points(model_dir, photos: list[np.ndarray], args) -> list[dict]:
    """One RD point per quality of a codec model (the discretized-VAE codec), at full size."""
    from gqtok.core.artifact import load_artifact
    from gqtok.service.compressor import CodecCompressor
    from gqtok.training.evaluate import image_metrics

    codec = CodecCompressor(load_artifact(model_dir), device="cpu", threads=args.threads)
    m = codec.manifest
    h, w = photos[0].shape[:2]
    # the network's own ceiling: the decoder on the encoder's unrounded means (what infinite rate would give)
    ceiling = []
    for img in photos:
        y, _ = codec.encode(img, 1)
        mu = (y * codec.latents.inv_gain[0][:, None, None]).astype(np.float32)
        ceiling.append(image_metrics(img, codec.decode(mu)[:h, :w]))
    unrounded = {k: float(np.mean([c[k] for c in ceiling])) for k in ("psnr", "ms_ssim")}
    points = []
    n = m.codec.qualities
    wanted = [q for q in args.qualities if q <= n] if args.qualities else None
    train = training_photos(args.pc_side_photos, (h, w)) if args.pc_side_photos else []
    for quality in wanted or ([1, (n + 1) // 2, n] if args.quick else range(1, n + 1)):
        rows, held_z = [], []
        for i, img in enumerate(photos):
            t0 = time.perf_counter()
            y, z = codec.encode(img, quality)
            t1 = time.perf_counter()
            data = codec.latents.compress(y, z, img.shape[:2], quality)
            t2 = time.perf_counter()
            latent, _ = codec.latents.decompress(data)
            t3 = time.perf_counter()
            out = codec.decode(latent)[:h, :w]
            t4 = time.perf_counter()
            held_z.append(z)
            rows.append({"bpp": 8 * len(data) / (h * w), "side_bpp": codec.latents.coder.side_bits(z) / (h * w),
                         "encode_s": t2 - t0, "decode_s": t4 - t2, "coding_encode_s": t2 - t1,
                         "coding_decode_s": t3 - t2} | image_metrics(img, out))
            print(f"  {m.model_id} quality {quality}: photo {i + 1}/{len(photos)}", end="\r", file=sys.stderr)
        # id@version: two exports of one codec (a retrained gqtok-codec beside the shipped one) are two curves
        pt = summarize(rows, codec="dvae", model=f"{m.model_id}@{m.model_version}", quality=quality,
                       rate_lambda=m.codec.rate_lambdas[quality - 1])
        pt["side_bpp"] = float(np.mean([r["side_bpp"] for r in rows]))
        pt["side_share"] = pt["side_bpp"] / pt["bpp"]
        pt["unrounded_psnr"], pt["unrounded_ms_ssim"] = unrounded["psnr"], unrounded["ms_ssim"]
        if train:  # the same stream with a circuit in place of z's factorized prior (ideal lengths of its coder)
            bits, fit = pc_side_bits(codec, quality, train, held_z)
            pt["pc_side_bpp"] = float(np.mean(bits)) / (h * w)
            pt["bpp_with_pc_side"] = pt["bpp"] - pt["side_bpp"] + pt["pc_side_bpp"]
            pt["pc_side_fit"] = fit
        points.append(pt)
        print(f"{m.model_id} quality {quality} {pt['bpp']:.4f} bpp ({100 * pt['side_share']:.0f}% side)  "
              f"{pt['psnr']:.2f} dB  MS-SSIM {pt['ms_ssim']:.4f}  enc {pt['encode_ms']:.0f} ms  "
              f"dec {pt['decode_ms']:.0f} ms", file=sys.stderr)
    return points


def score(points: list[dict]) -> tuple[list[dict], list[dict]]:
    """BD-rates of each prior's curve and each codec model's curve against each anchor (and the codec's against
    the context prior's), per-point comparisons (added to the points), and the bits each prior saves over uniform
    coding."""
    def curve(rows, metric):
        return [(r["bpp"], r["psnr"] if metric == "psnr" else ms_ssim_db(r["ms_ssim"])) for r in rows]

    anchors = {c: [p for p in points if p["codec"] == c] for c in ANCHORS if any(p["codec"] == c for p in points)}
    ours = [p for p in points if p["codec"] == "gqtok"]
    codecs = [p for p in points if p["codec"] == "dvae"]
    tested = [({"prior": prior}, [p for p in ours if p["prior"] == prior]) for prior in sorted({p["prior"] for p in ours})]
    tested += [({"codec": "dvae", "model": model}, [p for p in codecs if p["model"] == model])
               for model in sorted({p["model"] for p in codecs})]
    if any(p["prior"] == "context" for p in ours):
        anchors_of_codecs = {"gqtok-context": [p for p in ours if p["prior"] == "context"]}
    else:
        anchors_of_codecs = {}
    bd = []
    for label, rows in tested:
        for anchor_name, anchor in {**anchors, **(anchors_of_codecs if "codec" in label else {})}.items():
            entry = label | {"anchor": anchor_name, "points": len(rows)}
            for metric in ("psnr", "ms_ssim"):
                value, span = bd_rate(curve(rows, metric), curve(anchor, metric))
                entry[f"bd_rate_{metric}_percent"] = value
                entry[f"{metric}_range" + ("_db" if metric == "ms_ssim" else "")] = span
            bd.append(entry)
    # Per gqtok and dvae point (defined even for one point): the rate the anchor needs for the same PSNR, and the
    # PSNR the anchor reaches at the same rate.
    for p in ours + codecs:
        for anchor_name, anchor in anchors.items():
            need = anchor_rate_at(p["psnr"], curve(anchor, "psnr"))
            p[f"{anchor_name}_bpp_at_same_psnr"] = need
            p[f"rate_ratio_vs_{anchor_name}"] = None if need is None else p["bpp"] / need
            p[f"{anchor_name}_psnr_at_same_bpp"] = anchor_quality_at(p["bpp"], curve(anchor, "psnr"))
    # Bits each prior saves over log2 K, per model at scale 1.
    savings = []
    for p in ours:
        if p["scale"] == 1.0 and p["prior"] != "uniform":
            uni = next((u for u in ours if u["model"] == p["model"] and u["scale"] == 1.0 and u["prior"] == "uniform"),
                       None)
            if uni is None:  # --priors without uniform: nothing to compare with
                continue
            savings.append({"model": p["model"], "prior": p["prior"], "bits_per_token": p["bits_per_token"],
                            "uniform_bits_per_token": uni["bits_per_token"],
                            "saved_bits_per_token": uni["bits_per_token"] - p["bits_per_token"],
                            "saved_percent": 100 * (1 - p["bpp"] / uni["bpp"])})
    return bd, savings


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ms_ssim", "MS-SSIM (dB)")):
        value = (lambda p: p["psnr"]) if metric == "psnr" else (lambda p: ms_ssim_db(p["ms_ssim"]))
        for codec, style in (("jpeg", "o-"), ("webp", "s-"), ("avif", "d-"), ("jxl", "v-")):
            pts = sorted((p["bpp"], value(p)) for p in result["points"] if p["codec"] == codec)
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label={"jxl": "JPEG XL"}.get(codec, codec.upper()))
        ours = [p for p in result["points"] if p["codec"] == "gqtok"]
        models = list(dict.fromkeys(p["model"] for p in ours))
        colors = {"uniform": "tab:green", "frequency": "tab:red", "context": "tab:purple"}
        for prior, marker in (("uniform", "x"), ("frequency", "^"), ("context", "*")):
            for i, model in enumerate(models):  # the first model's scales as a line, other models as points
                pts = sorted((p["bpp"], value(p)) for p in ours if p["prior"] == prior and p["model"] == model)
                if pts:
                    ax.plot(*zip(*pts), (marker + "--") if i == 0 else ["o", "s", "D"][i % 3], color=colors[prior],
                            ms=8 if i == 0 else 6, mfc=None if i == 0 else "none",
                            label=f"{model}, {prior} prior" + (" (scales)" if i == 0 and len(pts) > 1 else ""))
        for model in dict.fromkeys(p["model"] for p in result["points"] if p["codec"] == "dvae"):
            pts = sorted((p["bpp"], value(p)) for p in result["points"] if p["codec"] == "dvae" and p["model"] == model)
            ax.plot(*zip(*pts), "P-", color="tab:brown", ms=7, label=f"{model} (dvae codec, qualities)")
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel (actual bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    h, w = result["size_hw"]
    where = "held-out endless-sky photos" if result.get("sources", ["endless-sky held-out"]) == [
        "endless-sky held-out"] else "photos of sources held out whole"
    fig.suptitle(f"{where}, {result['photos']} at {w}x{h} (not Kodak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", help="model directory (repeat; default models/default)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.75, 0.5],
                   help="resize factors (rate control) for the first model; the others run at 1")
    p.add_argument("--priors", nargs="+", help="only these priors (default: every prior each model has)")
    p.add_argument("--codec", action="append", help="codec model directory (repeat; default models/codec if present)")
    p.add_argument("--qualities", type=int, nargs="+",
                   help="only these codec qualities (default: all; a codec with fewer runs its own)")
    p.add_argument("--no-anchors", action="store_true", help="leave out JPEG, WebP, AVIF and JPEG XL")
    p.add_argument("--photos", type=int, default=24, help="held-out photos (default all 24)")
    p.add_argument("--sources", nargs="+", metavar="DIR",
                   help="instead of the held-out endless-sky photos: every photo under these folders at least --size "
                        "large (e.g. the four sources held out whole, data/photos/kphotoalbum ...)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 768], metavar=("H", "W"),
                   help="centre crop of each photo (default 512 768)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    p.add_argument("--pc-side-photos", type=int, default=40,
                   help="training photos to learn the codec's pc side prior from, per quality (0: leave it out)")
    p.add_argument("--quick", action="store_true", help="3 photos, scales 1 and 0.5, the codec's lowest, middle and "
                                                         "highest quality, fewer anchor settings (< 60 s)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/rd.json, --quick: rd_quick.json)")
    p.add_argument("--rescore", action="store_true",
                   help="measure nothing: recompute BD-rates, comparisons and the plot from the points in --out")
    args = p.parse_args(argv)
    args.model = args.model or [str(REPO / "models" / "default")]
    args.codec = args.codec or [str(d) for d in [REPO / "models" / "codec"] if (d / "manifest.json").exists()]
    args.anchors = ANCHORS
    if args.quick:
        args.photos, args.scales = min(args.photos, 3), [1.0, 0.5]
        args.pc_side_photos = min(args.pc_side_photos, 3)
        args.anchors = QUICK_ANCHORS
    if args.no_anchors:
        args.anchors = {}
    stem = "rd" if args.size == [512, 768] else f"rd_{args.size[1]}x{args.size[0]}"
    out = Path(args.out or RESULTS / (f"{stem}_quick.json" if args.quick else f"{stem}.json"))
    if args.rescore:
        result = json.loads(out.read_text())
        result["bd_rate"], result["prior_savings"] = score(result["points"])
    else:
        result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"bd_rate": result["bd_rate"], "prior_savings": result["prior_savings"],
                      "seconds": result["seconds"], "json": str(out)}, indent=1))
    return result


if __name__ == "__main__":
    main()
