"""Probabilistic circuits as lossless coders (issue 30): the paper's own setting, then GQ tokens.

    python benchmarks/pc.py [--windows 1x1 2x2 ...] [--hidden 16] [--em-steps 30] [--train-photos 120] [--quick]

digits   scikit-learn's load_digits (1,797 8x8 digits, 17 grey levels), a fixed 80/20 split. On the held-out
         digits: bits per pixel of the HCLT coder (the bytes constriction wrote), of a per-pixel frequency model
         (counts + 1/2, its ideal code length), and of PNG (Pillow, optimize), WebP lossless (Pillow, method 6)
         and JPEG XL lossless (imagecodecs, effort 9) on the held-out digits tiled into one grey image (values
         0..16 as 8-bit pixels) so that no file header decides. Encode and decode time of the held-out set.
tokens   the default model's tokens of 768x512 centre crops of data/endless-sky: the HCLT learned (gqtok priors
         fit's own fit_pc) on --train-photos training photos for each window given, against the model's shipped
         frequency and context priors, on the same held-out grids: bits per token (what the coder's frequencies
         give) and the median encode and decode milliseconds of one grid, learning CPU seconds.
Writes benchmarks/results/pc.json (--quick: pc_quick.json, 16 training photos, 4 held out, one window, < 60 s).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, repeats: int):
    """(result of the last call, median seconds)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def tile(digits: np.ndarray, columns: int) -> np.ndarray:
    """[n, 64] digits -> one uint8 image of 8x8 tiles, `columns` per row (the last row padded with zeros)."""
    n = len(digits)
    rows = -(-n // columns)
    padded = np.zeros((rows * columns, 64), dtype=np.uint8)
    padded[:n] = digits
    return padded.reshape(rows, columns, 8, 8).transpose(0, 2, 1, 3).reshape(rows * 8, columns * 8)


def classic_lossless_bits(image: np.ndarray) -> dict:
    """bits of each lossless codec's file for a grey uint8 image (checked to decode to the same pixels)."""
    out = {}
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="PNG", optimize=True)
    out["png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, format="WEBP", lossless=True, method=6, quality=100)
    out["webp_lossless"] = buf.getvalue()
    for name, data in out.items():
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("L")), image), name
    try:
        import imagecodecs

        data = imagecodecs.jpegxl_encode(image, lossless=True, effort=9)
        assert np.array_equal(imagecodecs.jpegxl_decode(data), image)
        out["jxl_lossless"] = data
    except ImportError:
        pass
    return {k: 8 * len(v) for k, v in out.items()}


def digits_benchmark(quick: bool, hidden: int, em_steps: int) -> dict:
    from sklearn.datasets import load_digits

    from gqtok.training.circuit import CircuitConfig, learn_hclt

    x = load_digits().data.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    train, held = x[order[:cut]], x[order[cut:]]
    cfg = CircuitConfig(hidden=8 if quick else hidden, em_steps=8 if quick else em_steps)
    circuit, fit = learn_hclt(train, 17, cfg, progress=False)
    words, enc_s = timed(lambda: circuit.encode(held), 1 if quick else 3)
    decoded, dec_s = timed(lambda: circuit.decode(words, len(held)), 1 if quick else 3)
    assert np.array_equal(decoded, held), "the circuit did not decode its own stream"
    pixels = held.size
    counts = np.stack([np.bincount(col, minlength=17) for col in train.T]) + 0.5
    freq_bits = -np.log2((counts / counts.sum(axis=1, keepdims=True))[np.arange(64), held]).sum()
    classic = classic_lossless_bits(tile(held, 20))
    bpp = {"pc": 32 * len(words) / pixels, "pc_ideal": float(circuit.code_lengths(held).sum()) / pixels,
           "frequency": float(freq_bits) / pixels} | {k: v / pixels for k, v in classic.items()}
    return {"train_digits": len(train), "heldout_digits": len(held), "tiled_image": list(tile(held, 20).shape),
            "bits_per_pixel": {k: round(v, 4) for k, v in bpp.items()},
            "pc_encode_ms": round(1e3 * enc_s, 2), "pc_decode_ms": round(1e3 * dec_s, 2),
            "fit": {k: v for k, v in fit.items() if k != "train_bits_per_variable"}
            | {"final_train_bits_per_variable": fit["train_bits_per_variable"][-1]}}


def token_grids(model_dir: Path, paths: list[Path]) -> np.ndarray:
    from gqtok.core.artifact import load_artifact
    from gqtok.service.runtime import TokenizerRuntime
    from gqtok.training.priors import tokenize_photos

    runtime = TokenizerRuntime(load_artifact(model_dir), device="cpu")
    return tokenize_photos(runtime.tokenize, paths, (512, 768), progress=False)


def tokens_benchmark(model_dir: Path, data: Path, quick: bool, windows: list[tuple[int, int]], hidden: int,
                     em_steps: int, train_photos: int) -> dict:
    import tempfile

    from gqtok.core.artifact import load_artifact
    from gqtok.core.bitstream import entropy_code, entropy_decode
    from gqtok.core.circuit import load_circuit
    from gqtok.core.priors import CircuitPrior, load_priors
    from gqtok.photos import list_images, split_heldout
    from gqtok.training.priors import PriorConfig, fit_pc

    artifact = load_artifact(model_dir)
    priors = load_priors(artifact)
    train_paths, held_paths = split_heldout(list_images(data))
    train_paths, held_paths = train_paths[: 16 if quick else train_photos], held_paths[: 4 if quick else None]
    train, held = token_grids(model_dir, train_paths), token_grids(model_dir, held_paths)
    rows = []

    def measure(name, prior, extra):
        bits = float(np.mean(np.concatenate([prior_bits(prior, g) for g in held])))
        words, enc_s = timed(lambda: entropy_code(held[0], prior), 1 if quick else 3)
        ids, dec_s = timed(lambda: entropy_decode(words, prior, held[0].shape), 1 if quick else 3)
        assert np.array_equal(ids, held[0]), name
        rows.append({"prior": name, "bits_per_token": round(bits, 4), "encode_ms": round(1e3 * enc_s, 1),
                     "decode_ms": round(1e3 * dec_s, 1)} | extra)

    for name in ("frequency", "context"):
        if name in priors:
            measure(name, priors[name], {})
    for window in windows[:1] if quick else windows:
        cfg = PriorConfig(pc_window=window, pc_hidden=8 if quick else hidden, pc_em_steps=5 if quick else em_steps)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prior_pc.npz"
            fit = fit_pc(path, train, held[:0], artifact.codebook, cfg, progress=not quick)
            circuit, _, extra = load_circuit(path.read_bytes())
        prior = CircuitPrior(circuit, extra["order"], window, artifact.manifest.tokens_per_position, b"")
        measure("pc", prior, {"window": list(window), "hidden": cfg.pc_hidden, "em_steps": cfg.pc_em_steps,
                              "learn_cpu_s": fit["learn_cpu_s"], "train_windows": fit["samples"]})
    return {"model": model_dir.name,
            "train_photos": len(train), "heldout_photos": len(held), "grid": list(held.shape[1:]), "priors": rows}


def prior_bits(prior, grid: np.ndarray) -> np.ndarray:
    if prior.name == "frequency":
        p = prior.probabilities()
        return np.concatenate([-np.log2(p[s][grid[s].ravel()]) for s in range(grid.shape[0])])
    return prior.code_lengths(grid)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "default"))
    ap.add_argument("--data", default=str(REPO / "data" / "endless-sky"))
    ap.add_argument("--windows", nargs="+", default=["1x1", "2x2", "4x4"], help="pc windows, ROWSxCOLUMNS")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--em-steps", type=int, default=30)
    ap.add_argument("--train-photos", type=int, default=120)
    ap.add_argument("--skip-tokens", action="store_true", help="the digits part only")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/pc[_quick].json)")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one BLAS thread, as the server codes (and never time it beside a training)
        t0 = time.perf_counter()
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
                  "quick": args.quick, "digits": digits_benchmark(args.quick, args.hidden, args.em_steps)}
        if not args.skip_tokens:
            windows = [tuple(int(v) for v in w.split("x")) for w in args.windows]
            result["tokens"] = tokens_benchmark(Path(args.model), Path(args.data), args.quick, windows, args.hidden,
                                                args.em_steps, args.train_photos)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
    from benchmarks.service import write_result

    write_result(result, "pc", args.quick, args.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
