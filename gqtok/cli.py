"""The `gqtok` command line. Heavy imports (torch, onnxruntime) happen inside each command."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One --flag per dataclass field (underscores become dashes); unset flags keep the preset's value."""
    group = parser.add_argument_group(title, "override any preset value")
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            kind, meta = _parse_bool, "BOOL"
        elif isinstance(default, tuple):
            kind, meta = (lambda s: tuple(int(v) for v in s.split(","))), "N,N,..."
        else:
            kind, meta = type(default), None
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", type=kind, default=None,
                           metavar=meta, help=f"(default {default!r})")


def cmd_data_fetch(args) -> None:
    from training.data import fetch_default_photos

    dest = fetch_default_photos(Path(args.dest), variant=args.variant, force=args.force)
    print(json.loads((dest / "SOURCE.json").read_text()) | {"folder": str(dest)})


def cmd_train(args) -> None:
    from training.train import train

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    last = train(Path(args.out), Path(args.data), preset=args.preset, overrides=overrides, resume=args.resume,
                 progress=not args.quiet)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}))


def cmd_eval(args) -> None:
    from training.evaluate import evaluate

    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    result = evaluate(Path(args.run), Path(args.data), json_out=args.json, png_out=png, size=tuple(args.size),
                      limit=args.limit, device=args.device, progress=not args.quiet)
    summary = {k: result[k] for k in ("continuous", "gq", "rate", "kl_bits_per_token", "codebook")}
    summary["quantization_error_in_sigmas"] = result["quantization_error_in_sigmas"]
    print(json.dumps(summary, indent=1))


def cmd_export(args) -> None:
    from export.exporter import export_run

    manifest = export_run(Path(args.run), Path(args.out), model_id=args.model_id, model_version=args.model_version,
                          eval_json=args.eval)
    print(json.dumps({"model_id": manifest.model_id, "out": args.out, "files": manifest.files}, indent=1))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gqtok", description="Gaussian Quant image tokenizer: train, evaluate, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch the default photo set").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download the default photos (Debian endless-sky) into data/")
    fetch.add_argument("--dest", default="data/endless-sky", help="target folder (default data/endless-sky)")
    fetch.add_argument("--variant", choices=["high-dpi", "small"], default="high-dpi",
                       help="high-dpi: 1440x720 (default; evaluation needs it), small: 720x360")
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.set_defaults(func=cmd_data_fetch)

    tr = sub.add_parser("train", help="train a Gaussian VAE with TDC")
    tr.add_argument("--preset", default="default", help="tiny or default (default: default)")
    tr.add_argument("--data", default="data/endless-sky", help="folder of training images (held-out photos are skipped)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out (training settings may change)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    if argv[:1] == ["train"]:  # the config flags need torch; build them only when they can be used
        from training.model import VAEConfig
        from training.train import TrainConfig

        _add_config_flags(tr, VAEConfig, "model")
        _add_config_flags(tr, TrainConfig, "training")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run on the held-out photos (continuous and GQ)")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--data", default="data/endless-sky", help="folder holding the held-out photos")
    ev.add_argument("--json", help="write the full results here")
    ev.add_argument("--png", help="reconstruction grid (default: next to --json)")
    ev.add_argument("--size", type=int, nargs=2, default=[512, 768], metavar=("H", "W"),
                    help="centre-crop size (default 512 768)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N held-out photos")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export a run to ONNX + manifest (a model directory the service loads)")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--out", required=True, help="model directory to write, e.g. models/NAME")
    ex.add_argument("--model-id", help="model id (default: the run directory's name)")
    ex.add_argument("--model-version", default="1")
    ex.add_argument("--eval", help="eval JSON to embed (default: RUN/eval.json if present)")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"gqtok: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
