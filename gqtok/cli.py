"""The `gqtok` command line: the top layer, and the one place that wires stages together.

Heavy imports (torch, onnxruntime) happen inside each command; a command whose extra is not installed says
which one to install."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from gqtok.core.layout import DEFAULT_MAX_IMAGE_PIXELS


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_flags(parser: argparse.ArgumentParser, cls, title: str, preset_values=None) -> None:
    """One --flag per dataclass field (underscores become dashes); unset flags keep the preset's value, which the
    help shows (`preset_values`: the preset's config object; None: the dataclass's defaults)."""
    group = parser.add_argument_group(title, "override any preset value")
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        shown = getattr(preset_values, f.name) if preset_values is not None else default
        if isinstance(default, bool):
            kind, meta = _parse_bool, "BOOL"
        elif isinstance(default, tuple):
            element = type(default[0]) if default else int
            kind, meta = (lambda s, element=element: tuple(element(v) for v in s.split(","))), "N,N,..."
        else:
            kind, meta = type(default), None
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", type=kind, default=None,
                           metavar=meta, help=f"(default {shown!r})")


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value given to `flag` (`FLAG VALUE` or `FLAG=VALUE`) in argv, read before parsing; None if absent."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def cmd_data_fetch(args) -> None:
    if args.source == "endless-sky":
        from gqtok.training.data import fetch_default_photos

        dest = fetch_default_photos(Path(args.dest or "data/endless-sky"), variant=args.variant, force=args.force)
        print(json.loads((dest / "SOURCE.json").read_text()) | {"folder": str(dest)})
        return
    from gqtok.training.sources import fetch_photos

    dest = Path(args.dest or "data/photos")
    record = fetch_photos(dest, packages=args.package, optional=args.optional, progress=not args.quiet,
                          existing=[Path(p) for p in args.dedup_against])
    print(json.dumps({"folder": str(dest), "files": len(record["files"]), "duplicates": len(record["duplicates"]),
                      "packages": {p: v["files"] for p, v in record["packages"].items()}}))


def cmd_train(args) -> None:
    from gqtok.training.train import train

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    last = train(Path(args.out), args.data or ["data/endless-sky"], preset=args.preset, overrides=overrides,
                 resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}))


def collect_photos(specs: list[str], split: str) -> list[Path]:
    """Photos from folders (searched recursively) or text files listing one path per line; split 'heldout' keeps
    the held-out photos of gqtok.photos.split_heldout, 'all' keeps every one."""
    from gqtok.photos import list_images, split_heldout

    paths = [p for spec in specs for p in list_images(spec)]
    if split == "all":
        return paths
    held = split_heldout(paths)[1]
    if not held:
        raise ValueError(f"none of the {len(paths)} photos in {', '.join(specs)} is in the held-out split; "
                         "pass --split all to evaluate every one (e.g. on your own photos)")
    return held


def cmd_data_list(args) -> None:
    from gqtok.photos import list_images, source_of, split_heldout

    paths = [p for spec in args.photos for p in list_images(spec)]
    known = {source_of(p) for p in paths}
    unknown = sorted(set(args.exclude_source) - known)
    if unknown:
        raise SystemExit(f"--exclude-source {', '.join(unknown)}: no such source among {', '.join(sorted(known))}")
    paths = [p for p in paths if source_of(p) not in args.exclude_source]
    if args.split != "all":
        paths = split_heldout(paths)[0 if args.split == "train" else 1]
    print("\n".join(str(p.resolve()) for p in paths))


def tokenizer_for(target: str, device: str):
    """(tokenize, detokenize, bits per token, name) for a training run, an exported model (directory or name on the
    model search path) or a running server (http://...): the CLI is where the stages meet."""
    import numpy as np

    if target.startswith(("http://", "https://")):
        from gqtok.service.client import TokenizerClient

        client = TokenizerClient(target, timeout=300)
        meta = client.model_info()
        return (lambda x: client.tokenize(list(x)), lambda ids: np.stack([np.asarray(i) for i in client.detokenize(ids)]),
                math.log2(meta["num_codes"]), meta["model_id"])
    if (Path(target) / "config.json").is_file():
        from gqtok.training.evaluate import run_tokenizer

        return (*run_tokenizer(Path(target), device), Path(target).name)
    from gqtok.core.artifact import load_artifact
    from gqtok.core.models import find_model
    from gqtok.service.runtime import TokenizerRuntime

    runtime = TokenizerRuntime(load_artifact(find_model(target)), device=device)
    m = runtime.manifest
    return runtime.tokenize, runtime.detokenize, math.log2(m.num_codes), m.model_id


def cmd_eval(args) -> None:
    sizes = [tuple(s) for s in args.size] if args.size else [(512, 768)]
    if args.photos or not (Path(args.target) / "config.json").is_file():
        from gqtok.training.evaluate import evaluate_tokenizer

        paths = collect_photos(args.photos or [args.data], args.split)[: args.limit]
        tokenize, detokenize, bits, name = tokenizer_for(args.target, args.device)
        results = {f"{h}x{w}": evaluate_tokenizer(
            tokenize, detokenize, paths, (h, w), bits, name=name, classic=not args.no_classic,
            progress=not args.quiet, png_out=Path(args.png).with_suffix(f".{h}x{w}.jpg") if args.png else None,
            fd=args.fd)
            for h, w in sizes}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
        keep = ("images", "bpp", "tokens", "jpeg", "webp", "psnr_gap_to_jpeg", "psnr_gap_to_webp", "fd_effnet_lite0",
                "failed")
        print(json.dumps({size: {k: r[k] for k in keep if k in r} | {"per_source_psnr": {
            s: round(v["tokens"]["psnr"], 2) for s, v in r["per_source"].items()}} for size, r in results.items()},
            indent=1))
        return
    from gqtok.training.evaluate import evaluate

    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    result = evaluate(Path(args.target), Path(args.data), json_out=args.json, png_out=png, size=sizes[0],
                      limit=args.limit, device=args.device, progress=not args.quiet, method=args.method,
                      tokenbridge_levels=args.tokenbridge_levels, fd=args.fd)
    summary = {k: result[k] for k in ("method", "continuous", "quantized", "rate", "kl_bits_per_token", "codebook")}
    summary["quantization_error_in_sigmas"] = result["quantization_error_in_sigmas"]
    print(json.dumps(summary, indent=1))


def cmd_export(args) -> None:
    from gqtok.export.exporter import export_run

    manifest = export_run(Path(args.run), Path(args.out), model_id=args.model_id, model_version=args.model_version,
                          eval_json=args.eval, weights=not args.no_weights)
    print(json.dumps({"model_id": manifest.model_id, "out": args.out, "files": manifest.files}, indent=1))


def cmd_serve(args) -> None:
    from gqtok.service.settings import from_arguments

    settings = from_arguments(args)
    if settings.engine == "ray":
        from gqtok.service.ray_serve import serve_on_ray

        serve_on_ray(settings)
        return
    from gqtok.service.server import serve

    serve(settings)


def fit_model_priors(model_dir: Path, data_dir: Path, config=None, progress: bool = True) -> dict:
    """Fit the entropy-coding priors of an exported model on the tokens the service makes: training's fit
    (torch) fed by the service's onnxruntime runtime."""
    from gqtok.core.artifact import load_artifact
    from gqtok.service.runtime import TokenizerRuntime
    from gqtok.training.priors import fit_priors

    runtime = TokenizerRuntime(load_artifact(model_dir), device="cpu")
    return fit_priors(Path(model_dir), Path(data_dir), runtime.tokenize, config, progress=progress)


def cmd_priors_fit(args) -> None:
    from gqtok.training.priors import PriorConfig

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    info = fit_model_priors(Path(args.model), Path(args.data), PriorConfig(**overrides), progress=not args.quiet)
    print(json.dumps(info, indent=1))


def _read_image(path: Path, max_pixels: int):
    """An image file -> uint8 RGB (gqtok.photos.to_rgb), its size checked from the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    from gqtok.photos import to_rgb

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"{path} is {w}x{h} = {w * h} pixels; the limit is {max_pixels} (--max-pixels)")
            return to_rgb(im, name=str(path))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None


def _output_path(path: Path, force: bool) -> Path:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    return path


def cmd_compress(args) -> None:
    import time

    from gqtok.core.bitstream import read_header
    from gqtok.service.compressor import load_compressor
    from gqtok.service.runtime import one_blas_thread

    one_blas_thread()  # as the server does: the same context-prior probabilities
    out = _output_path(Path(args.output or Path(args.image).with_suffix(".gqt")), args.force)
    image = _read_image(Path(args.image), args.max_pixels)
    compressor = load_compressor(args.model, device=args.device)
    start = time.perf_counter()
    data = compressor.compress(image, args.prior, args.quality)
    seconds = time.perf_counter() - start
    out.write_bytes(data)
    header = read_header(data)
    h, w = image.shape[:2]
    summary = {"output": str(out), "model": header.model_id, "codec": header.codec, "prior": header.prior,
               "bytes": len(data), "bits_per_pixel": round(8 * len(data) / (h * w), 5), "image_size": [h, w]}
    if header.codec == "dvae":
        summary["quality"] = header.quality
    else:
        summary["bits_per_token"] = round(8 * header.payload_length / math.prod(header.grid), 4)
    print(json.dumps(summary | {"seconds": round(seconds, 3)}))


def cmd_decompress(args) -> None:
    from PIL import Image

    from gqtok.core.artifact import load_artifact
    from gqtok.core.bitstream import BitstreamError, read_header
    from gqtok.core.models import find_model
    from gqtok.service.compressor import compressor_for
    from gqtok.service.runtime import one_blas_thread

    one_blas_thread()
    data = Path(args.input).read_bytes()
    header = read_header(data)
    out = _output_path(Path(args.output or Path(args.input).with_suffix(".png")), args.force)
    if args.model:
        artifacts = [load_artifact(find_model(m)) for m in args.model]
        match = [a for a in artifacts if a.manifest.model_id == header.model_id]
        if not match:
            raise BitstreamError(f"{args.input} was made by model {header.model_id!r}; the models given are "
                                 f"{[a.manifest.model_id for a in artifacts]} (pass its directory with --model)")
        artifact = match[0]
    else:  # the model the header names, on the model search path
        artifact = load_artifact(find_model(header.model_id))
    image, _ = compressor_for(artifact, device=args.device).decompress(data, args.max_pixels)
    Image.fromarray(image).save(out)
    print(json.dumps({"output": str(out), "model": header.model_id, "codec": header.codec, "prior": header.prior,
                      "image_size": list(image.shape[:2])} | ({"quality": header.quality} if header.codec == "dvae" else {})))


def cmd_tokenize(args) -> None:
    from gqtok.bulk.preprocess import Preprocess
    from gqtok.bulk.shards import Job, list_inputs

    pre = Preprocess(size=args.size, crop=args.crop, flip=args.flip, seed=args.seed, fit=args.fit,
                     draft=not args.full_decode, max_tokens=args.max_tokens)
    job = Job(list_inputs(args.input), Path(args.out), pre, shard_size=args.shard_size, batch_size=args.batch_size,
              alpha=args.alpha, max_pixels=args.max_pixels)
    if args.engine == "ray":
        from gqtok.bulk.ray_engine import run_ray

        meta = run_ray(job, args.model, address=args.address, workers=args.workers, device=args.device,
                       threads=args.threads, decode_workers=args.decode_workers, progress=not args.quiet)
    else:
        from gqtok.bulk.shards import run_local
        from gqtok.core.artifact import load_artifact
        from gqtok.core.models import find_model
        from gqtok.service.runtime import TokenizerRuntime

        runtime = TokenizerRuntime(load_artifact(find_model(args.model)), device=args.device, threads=args.threads)
        meta = run_local(job, runtime, decode_workers=args.decode_workers, progress=not args.quiet)
    print(json.dumps({"out": args.out, "grid": meta["grid"], "dtype": meta["dtype"], **meta["counts"],
                      "shards": len(meta["shards"]), **meta.get("run", {})}))


def cmd_detokenize(args) -> None:
    import numpy as np
    from PIL import Image

    from gqtok.core.artifact import load_artifact
    from gqtok.core.models import find_model
    from gqtok.core.shards import TokenShards
    from gqtok.service.runtime import TokenizerRuntime

    shards = TokenShards(args.tokens)
    artifact = load_artifact(find_model(args.model or shards.meta["model"]["model_id"]))
    shards.check_model(artifact.manifest)
    runtime = TokenizerRuntime(artifact, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = range(min(args.limit, len(shards)) if args.limit else len(shards))
    written = []
    for start in range(0, len(rows), 8):
        images = runtime.detokenize(shards.grids(start, min(start + 8, len(rows))).astype(np.int64))
        for i, image in enumerate(images, start):
            path = _output_path(out / f"row-{i:06d}.png", args.force)
            Image.fromarray(image).save(path)
            written.append(str(path))
    print(json.dumps({"out": str(out), "images": len(written), "rows": len(shards)}))


def cmd_generator_train(args) -> None:
    from gqtok.generator.train import train_generator

    model_kw = {k[4:]: v for k, v in vars(args).items() if k.startswith("gen_") and v is not None}
    train_kw = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    summary = train_generator(Path(args.out), args.tokenizer_url, Path(args.data), model_kw, train_kw,
                              api_key=args.api_key, progress=not args.quiet,
                              tokens_dir=Path(args.tokens) if args.tokens else None,
                              tokenizer_model=args.tokenizer_model)
    print(json.dumps({k: summary[k] for k in ("val_bits_per_token", "log2_k", "parameters", "train_sequences",
                                              "val_sequences")} | {"out": args.out}))


def cmd_generator_sample(args) -> None:
    import torch

    from gqtok.generator.sample import grid_png, sample_grids, sampling_speed
    from gqtok.generator.train import load_generator
    from gqtok.service.client import TokenizerClient

    model, summary = load_generator(Path(args.run))
    grids = sample_grids(model, args.n, args.temperature, args.top_k, args.top_p, args.seed)
    with TokenizerClient(args.tokenizer_url, api_key=args.api_key,
                         model=summary["tokenizer"]["tokenizer_model"]) as client:
        images = client.detokenize(grids)
    Path(args.output).write_bytes(grid_png(images))
    report = {"output": args.output, "n": args.n, "grid": list(grids.shape[1:])}
    if args.speed:
        torch.manual_seed(0)
        report["speed"] = [sampling_speed(model, args.n, use_cache=c, repeats=3) for c in (True, False)]
    print(json.dumps(report, indent=1))


def cmd_generator_serve(args) -> None:
    import uvicorn

    from gqtok.generator.app import create_app

    if not (Path(args.run) / "config.json").exists():
        raise FileNotFoundError(f"no trained generator in {args.run}: make one with "
                                f"`gqtok generator train --out {args.run} --tokenizer-url {args.tokenizer_url}`")
    uvicorn.run(create_app(Path(args.run), args.tokenizer_url, api_key=args.api_key), host=args.host, port=args.port,
                log_level="info")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    import gqtok

    parser = argparse.ArgumentParser(prog="gqtok", description="Gaussian Quant image tokenizer: train, evaluate, export, serve.")
    parser.add_argument("--version", action="version", version=f"gqtok {gqtok.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch photo sets; list photos").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download real photos from Debian packages into data/ (never installs them)")
    fetch.add_argument("--source", choices=["endless-sky", "debian-photos"], default="endless-sky",
                       help="endless-sky: the default training set (273 photos); debian-photos: the photographs "
                            "of the other Debian packages in training/photo_sources.csv (default endless-sky)")
    fetch.add_argument("--dest", help="target folder (default data/endless-sky or data/photos)")
    fetch.add_argument("--variant", choices=["high-dpi", "small"], default="high-dpi",
                       help="endless-sky only: high-dpi 1440x720 (default; evaluation needs it) or small 720x360")
    fetch.add_argument("--package", action="append", metavar="NAME",
                       help="debian-photos only: fetch just this package (repeat for several)")
    fetch.add_argument("--optional", action="store_true",
                       help="debian-photos only: also ufoai-textures (336 MB) and stellarium's panorama tiles")
    fetch.add_argument("--dedup-against", action="append", default=[], metavar="DIR",
                       help="debian-photos only: skip photos that duplicate one in DIR (e.g. data/endless-sky)")
    fetch.add_argument("--force", action="store_true", help="endless-sky only: download again even if present")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=cmd_data_fetch)
    listing = data.add_parser("list", help="print photo paths, one per line: a list file for --data and --photos")
    listing.add_argument("photos", nargs="+", metavar="DIR_OR_LIST", help="folders (searched recursively) or lists")
    listing.add_argument("--exclude-source", action="append", default=[], metavar="SOURCE",
                         help="leave out a source: a fetched package's name, or a folder's name (repeatable)")
    listing.add_argument("--split", choices=["all", "train", "heldout"], default="all",
                         help="all photos (default), or one side of the fixed held-out split")
    listing.set_defaults(func=cmd_data_list)

    tr = sub.add_parser("train", help="train a Gaussian VAE with TDC, a baseline, or the discretized-VAE codec")
    tr.add_argument("--preset", default="default",
                    help="tiny, default (the tokenizer) or codec (the discretized-VAE codec, fine-tuned from the "
                         "default model) (default: default)")
    tr.add_argument("--data", action="append", metavar="DIR[:WEIGHT]",
                    help="folder of training photos or a text file listing them (one path per line), repeat for several; WEIGHT is the folder's share of the crops "
                         "(default 1 each); held-out photos are skipped (default data/endless-sky)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out (training settings may change)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    if argv[:1] == ["train"]:  # the config flags need torch; build them only when they can be used
        from gqtok.training.model import PRESETS, VAEConfig
        from gqtok.training.train import TrainConfig, build_configs

        preset = _flag_value(argv, "--preset")  # so that help shows the preset's values
        model_values, train_values = build_configs(preset if preset in PRESETS else "default")
        _add_config_flags(tr, VAEConfig, "model", model_values)
        _add_config_flags(tr, TrainConfig, "training", train_values)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a tokenizer on photos: a run (continuous and GQ, in detail), an "
                                     "exported model or a running server, against JPEG and WebP at the same bpp")
    ev.add_argument("target", help="a run directory, a model directory or name (the model search path), or a "
                                   "server URL (http://...)")
    ev.add_argument("--data", default="data/endless-sky", help="folder holding the held-out photos (default "
                                                               "data/endless-sky)")
    ev.add_argument("--photos", action="append", metavar="DIR_OR_LIST",
                    help="evaluate on these photos instead: a folder (recursive) or a text file of paths; repeat "
                         "for several. Always the any-tokenizer report, also for a run")
    ev.add_argument("--split", choices=["heldout", "all"], default="heldout",
                    help="heldout: only the held-out photos of every source (default); all: every photo given")
    ev.add_argument("--json", help="write the full results here")
    ev.add_argument("--png", help="reconstruction grid: of a run's detailed report (default: next to --json); with "
                    "--photos, PNG.HxW.jpg per size: the first photo of each source, original | tokens | JPEG")
    ev.add_argument("--size", type=int, nargs=2, action="append", metavar=("H", "W"),
                    help="centre-crop size; repeat for several (default 512 768). Smaller photos are skipped")
    ev.add_argument("--limit", type=int, help="evaluate only the first N photos")
    ev.add_argument("--no-classic", action="store_true", help="skip JPEG and WebP at the same bpp")
    ev.add_argument("--method", default="auto",
                    help="auto (GQ for a Gaussian VAE, else the run's own quantizer), gq, or tokenbridge")
    ev.add_argument("--tokenbridge-levels", type=int, default=64, help="bins per channel for --method tokenbridge")
    ev.add_argument("--fd", action="store_true", help="also the Frechet distance on EfficientNet-Lite0 features")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export a run to ONNX + manifest (a model directory the service loads)")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--out", required=True, help="model directory to write, e.g. models/NAME")
    ex.add_argument("--model-id", help="model id (default: the run directory's name)")
    ex.add_argument("--no-weights", action="store_true",
                    help="ship the ONNX graphs without the torch weights (smaller; the model cannot be fine-tuned from)")
    ex.add_argument("--model-version", help="model version (default: the first 12 hex digits of the model digest, "
                                            "which differs between any two exports of different networks)")
    ex.add_argument("--eval", help="eval JSON to embed (default: RUN/eval.json if present)")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("priors", help="entropy-coding priors of an exported model").add_subparsers(
        dest="priors_command", required=True)
    pf = pr.add_parser("fit", help="fit the frequency and context priors on the model's training-photo tokens "
                                   "and add them to the model directory")
    pf.add_argument("model", help="model directory (from gqtok export)")
    pf.add_argument("--data", default="data/endless-sky", help="folder of training photos (held-out ones are skipped)")
    pf.add_argument("--quiet", action="store_true")
    if argv[:2] == ["priors", "fit"]:
        from gqtok.training.priors import PriorConfig

        _add_config_flags(pf, PriorConfig, "context prior")
    pf.set_defaults(func=cmd_priors_fit)

    cp = sub.add_parser("compress", help="image -> compressed file (GQ tokens entropy-coded with a prior, or the "
                                         "codec model's latents at a quality)")
    cp.add_argument("image", help="PNG, JPEG, WebP, ... of any size")
    cp.add_argument("-o", "--output", help="compressed file (default: IMAGE with suffix .gqt)")
    cp.add_argument("--model", help="model directory or name on the model search path (default: the default model, "
                                    "a GQ tokenizer at one rate; 'codec': the discretized-VAE codec, a rate you choose)")
    cp.add_argument("--quality", type=int, metavar="N",
                    help="codec models only: 1 (fewest bits) .. the model's qualities (6 for the bundled codec; "
                         "default: its middle one; docs/compression.md lists their rates)")
    cp.add_argument("--prior", choices=["uniform", "frequency", "context", "pc"],
                    help="GQ tokenizers only: entropy model of the tokens (default: the strongest the model has)")
    cp.add_argument("--device", default="cpu", help="onnxruntime device: cpu (default), cuda or auto")
    cp.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    cp.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                    help="refuse larger images, read from the header before decoding (default %(default)s, the "
                         "server's --max-image-pixels): memory grows with pixels")
    cp.set_defaults(func=cmd_compress)

    dc = sub.add_parser("decompress", help="compressed file -> image (the header names the model)")
    dc.add_argument("input", help="file from gqtok compress or POST /v1/compress")
    dc.add_argument("-o", "--output", help="image to write; the suffix picks the format (default: INPUT.png)")
    dc.add_argument("--model", action="append", metavar="DIR_OR_NAME",
                    help="model directory or name; repeat to offer several, the header picks (default: the model "
                         "the header names, found on the model search path)")
    dc.add_argument("--force", action="store_true", help="overwrite the output image if it exists")
    dc.add_argument("--device", default="cpu")
    dc.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                    help="refuse streams that decode to more pixels, read from the header (default %(default)s)")
    dc.set_defaults(func=cmd_decompress)

    tk = sub.add_parser("tokenize", help="pre-tokenize a dataset: image files -> token shards (.npy), an index "
                        "and meta.json (docs/pretokenize.md)")
    tk.add_argument("input", nargs="+", help="folders (searched recursively) or text files listing image paths")
    tk.add_argument("--out", required=True, help="output folder; run again to resume (finished shards are kept)")
    tk.add_argument("--model", default="default", help="model directory or name (default: the default model)")
    tk.add_argument("--size", type=int, default=256,
                    help="shorter side resized to SIZE, then SIZE x SIZE crops (default %(default)s); 0: no resize, "
                         "the image fitted by --fit (every file must then give the same grid)")
    tk.add_argument("--crop", choices=["center", "random", "ten"], default="center",
                    help="center (default), random (one seeded random crop per file) or ten (corners and centre, "
                         "and their mirror images: ten rows per file)")
    tk.add_argument("--flip", action="store_true", help="with --crop random: mirror half of the views (seeded)")
    tk.add_argument("--seed", type=int, default=0, help="seed of the random crops and flips (default 0)")
    tk.add_argument("--fit", choices=["pad", "crop", "exact"], default="pad",
                    help="with --size 0: make sides multiples of f as the service does (default pad)")
    tk.add_argument("--max-tokens", type=int, default=0, metavar="N",
                    help="token budget: each view resized (aspect kept, never enlarged) so that its grid has at most N "
                         "tokens, then padded to multiples of f (e.g. 256 with --size 256: 128x128 views, 16x16 "
                         "grids); 0 (default): no budget")
    tk.add_argument("--full-decode", action="store_true",
                    help="decode JPEGs at full size before resizing (default: at the smallest 1/2, 1/4 or 1/8 scale "
                         "still covering --size, libjpeg's DCT scaling: 2x faster on large photos, views within ~47 dB)")
    tk.add_argument("--alpha", choices=["composite", "refuse"], default="composite",
                    help="transparent images: composite on white (default) or record them as errors")
    tk.add_argument("--max-pixels", type=int, default=64 * 2**20,
                    help="files with more pixels are recorded as errors, not decoded (default %(default)s)")
    tk.add_argument("--shard-size", type=int, default=1024, help="input files per shard (default %(default)s)")
    tk.add_argument("--batch-size", type=int, default=16, help="images per inference call (default %(default)s)")
    tk.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local (default: this process) or ray (Ray Data; pip install 'gqtok[ray]')")
    tk.add_argument("--address", help="with --engine ray: the cluster to join (default: start a local one)")
    tk.add_argument("--workers", type=int, default=0,
                    help="with --engine ray: tokenizer actors (default: one per 2 CPUs of the cluster)")
    tk.add_argument("--decode-workers", type=int, default=1,
                    help="threads decoding files while the runtime tokenizes (per actor with --engine ray; default 1)")
    tk.add_argument("--threads", type=int, default=0, help="onnxruntime threads per runtime (0: one per core)")
    tk.add_argument("--device", default="cpu", help="onnxruntime device: cpu (default), cuda or auto")
    tk.add_argument("--quiet", action="store_true", help="no progress bar")
    tk.set_defaults(func=cmd_tokenize)

    dt = sub.add_parser("detokenize", help="token shards -> PNG images, for spot checks")
    dt.add_argument("tokens", help="a folder written by gqtok tokenize")
    dt.add_argument("--out", required=True, help="folder for row-NNNNNN.png")
    dt.add_argument("--limit", type=int, default=16, help="first N rows (default %(default)s; 0: all)")
    dt.add_argument("--model", help="model directory or name (default: the one meta.json names)")
    dt.add_argument("--device", default="cpu")
    dt.add_argument("--force", action="store_true", help="overwrite existing images")
    dt.set_defaults(func=cmd_detokenize)

    gen = sub.add_parser("generator", help="the downstream autoregressive generator over the tokenizer's tokens"
                         ).add_subparsers(dest="generator_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tokenizer-url", default="http://127.0.0.1:8000", help="the tokenizer service (default %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("GQTOK_API_KEY") or None,
                        help="the tokenizer's API key, if it has one (default: $GQTOK_API_KEY)")
    gt = gen.add_parser("train", parents=[common], help="tokenize photos through the service, then train")
    gt.add_argument("--out", required=True, help="run directory")
    gt.add_argument("--data", default="data/endless-sky", help="photos (held-out ones validate)")
    gt.add_argument("--tokens", help="train from these token shards (gqtok tokenize) instead of tokenizing --data "
                                     "over HTTP; rows of held-out photos validate")
    gt.add_argument("--tokenizer-model", metavar="NAME",
                    help="which of the server's models makes the tokens, e.g. gqtok-f16 (default: the server's default)")
    gt.add_argument("--quiet", action="store_true")
    if argv[:2] == ["generator", "train"]:
        from gqtok.generator.model import GeneratorConfig
        from gqtok.generator.train import GeneratorTrainConfig

        model_group = gt.add_argument_group("model")
        for name in ("grid", "n_layer", "n_head", "n_embd", "dropout", "codebook_init"):
            f = next(f for f in fields(GeneratorConfig) if f.name == name)
            kind = (lambda v: tuple(int(x) for x in v.split(","))) if name == "grid" else (
                _parse_bool if isinstance(f.default, bool) else type(f.default))
            model_group.add_argument(f"--{name.replace('_', '-')}", dest=f"gen_{name}", type=kind, default=None,
                                     help=f"(default {f.default!r})")
        _add_config_flags(gt, GeneratorTrainConfig, "training")
    gt.set_defaults(func=cmd_generator_train)
    gs = gen.add_parser("sample", parents=[common], help="sample a grid of images (decoded by the service)")
    gs.add_argument("run", help="generator run directory")
    gs.add_argument("-o", "--output", default="samples.png")
    gs.add_argument("--n", type=int, default=16)
    gs.add_argument("--seed", type=int, default=0)
    gs.add_argument("--temperature", type=float, default=1.0)
    gs.add_argument("--top-k", type=int)
    gs.add_argument("--top-p", type=float)
    gs.add_argument("--speed", action="store_true", help="also time sampling with and without the KV cache")
    gs.set_defaults(func=cmd_generator_sample)
    gv = gen.add_parser("serve", parents=[common], help="serve POST /generate")
    gv.add_argument("run", help="generator run directory")
    gv.add_argument("--host", default="127.0.0.1")
    gv.add_argument("--port", type=int, default=8001)
    gv.set_defaults(func=cmd_generator_serve)

    sv = sub.add_parser("serve", help="serve the tokenizer over HTTP (default: the bundled default model)",
                        description="Every option is also an environment variable GQTOK_<OPTION> (flags win); "
                                    "GQTOK_MODELS takes a JSON list. See docs/service.md.")
    if argv[:1] == ["serve"] or "-h" in argv or "--help" in argv:  # the flags come from ServiceSettings
        from gqtok.service.settings import add_arguments

        add_arguments(sv)
    sv.set_defaults(func=cmd_serve)
    return parser


EXTRAS = {  # a module a command imports -> the extra that installs it
    "torch": "train", "safetensors": "train", "pytorch_msssim": "train", "efficientnet_lite_pytorch": "train",
    "onnxruntime": "serve", "fastapi": "serve", "uvicorn": "serve", "pydantic_settings": "serve",
    "prometheus_client": "serve", "httpx": "serve", "multipart": "serve", "onnx": "export", "onnxscript": "export",
    "PIL": "serve", "tqdm": "train", "matplotlib": "train", "ray": "ray", "threadpoolctl": "serve",
}


def missing_extra_message(command: str, error: ModuleNotFoundError) -> str:
    module = (error.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return f"gqtok {command} needs the Python module {error.name!r}, which is not installed"
    if command.startswith("generator"):
        extra = "generator"
    return (f"gqtok {command} needs the '{extra}' extra (module {module!r} is missing): "
            f"pip install 'gqtok[{extra}]'")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(a for a in argv[:2] if not a.startswith("-"))
    try:
        args = build_parser(argv).parse_args(argv)  # some commands' flags come from torch-side configs
        command = " ".join(filter(None, [args.command, getattr(args, f"{args.command}_command", None)]))
        args.func(args)
    except ModuleNotFoundError as e:
        print(f"gqtok: error: {missing_extra_message(command, e)}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"gqtok: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
