"""By image size (issue 31): does a model trained on small crops keep its rate and its colours on full photos?

    python benchmarks/kl_size.py [--model DIR_OR_NAME ...] [--sizes 128x128 256x256 512x768] [--photos 24] [--quick]

For each model and each centre-crop size of the held-out endless-sky photos: the mean KL(posterior || N(0, I))
per token in bits (TDC trains it to log2 K on the training crops), its spread over tokens (5th, 50th, 95th
percentiles), GQ's cost (PSNR of the decoder on the posterior means minus PSNR on the GQ tokens), and the mean
signed error of each of R, G, B of the tokens' reconstruction in 0..255 units (a cast: the same sign on every
photo). Models side by side in one run (default: the default model). No times: it may run beside trainings.
Writes benchmarks/results/kl_size.json (--quick: 3 photos, two sizes, kl_size_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(runtime, photos: list[np.ndarray]) -> dict:
    from gqtok.core import layout
    from gqtok.core.select import kl_bits
    from gqtok.service.runtime import to_uint8
    from gqtok.training.evaluate import image_metrics

    m = runtime.manifest
    kl, continuous, tokens, signed = [], [], [], []
    for img in photos:
        mu, logvar = runtime.encode(img[None])
        kl.append(kl_bits(layout.group(mu, m.token_dim), layout.group(logvar, m.token_dim)).ravel())
        continuous.append(image_metrics(img, to_uint8(runtime.decode(mu))[0])["psnr"])
        recon = runtime.detokenize(runtime.select(mu, logvar))[0]
        tokens.append(image_metrics(img, recon)["psnr"])
        signed.append((recon.astype(np.float64) - img).reshape(-1, 3).mean(0))
    kl = np.concatenate(kl)
    return {"photos": len(photos), "kl_bits_per_token": float(kl.mean()),
            "kl_p5_p50_p95": [float(v) for v in np.percentile(kl, (5, 50, 95))],
            "target_bits": math.log2(m.num_codes), "psnr_continuous": float(np.mean(continuous)),
            "psnr_tokens": float(np.mean(tokens)), "gq_cost_db": float(np.mean(continuous) - np.mean(tokens)),
            "signed_error_rgb": [float(v) for v in np.mean(signed, axis=0)]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model directory or name; repeat to compare (default: default)")
    ap.add_argument("--sizes", nargs="+", default=["128x128", "256x256", "512x768"], help="crops, HxW")
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/kl_size[_quick].json)")
    args = ap.parse_args(argv)
    from benchmarks.rd import heldout_photos
    from gqtok.core.artifact import load_artifact
    from gqtok.core.models import find_model
    from gqtok.service.runtime import TokenizerRuntime

    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.sizes[:2] if args.quick else args.sizes)]
    n = 3 if args.quick else args.photos
    photos = {(h, w): heldout_photos(n, (h, w)) for h, w in sizes}
    result = {"quick": args.quick, "photos": n, "models": {}}
    for spec in args.model or ["default"]:
        runtime = TokenizerRuntime(load_artifact(find_model(spec)), device="cpu")
        result["models"][spec] = {"model_id": runtime.manifest.model_id,
                                  "model_version": runtime.manifest.model_version,
                                  "sizes": {f"{h}x{w}": measure(runtime, photos[h, w]) for h, w in sizes}}
    from benchmarks.service import write_result

    write_result(result, "kl_size", args.quick, args.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
