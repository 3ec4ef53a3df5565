"""`gqtok export RUN --out models/NAME`: a training run -> ONNX graphs + verified manifest.

Writes encoder.onnx, decoder.onnx, gq_select.onnx, weights.safetensors (the torch weights, for `gqtok train
--init-from`; left out with --no-weights) and manifest.json (every file's sha256, the codebook's generator, seed and
digest, the run's eval figures). The manifest also lists codebook.safetensors, a file derived from the seed that is
not written (gqtok.core.artifact rebuilds and checks it). Graph conventions (recorded in the manifest):
  encoder.onnx   image uint8 [B, H, W, 3] RGB (H, W multiples of f) -> mu, logvar float32 [B, C, H/f, W/f]
                 (the x / 127.5 - 1 normalization is inside the graph)
  decoder.onnx   latent float32 [B, C, h, w] -> image float32 [B, 8h, 8w, 3] in [0, 1] (clamped; round to uint8 yourself)
  gq_select.onnx mu, logvar [R, d], codebook [K, d] -> ids int64 [R]  (R = ROWS fixed: the torch SelectGraph
                 of training/gq.py, the same score as every other selector)
Batch, height and width are dynamic in the encoder and decoder.

A discretized-VAE codec run (quantizer "uniform", training/codec.py) exports as a codec model instead: the same
encoder.onnx and decoder.onnx (the decoder takes y_hat / gain), hyper_analysis.onnx (y float32 [B, C, h, w] ->
side information z float32 [B, Cz, ceil(h/4), ceil(w/4)], rounded by the caller) and latent_coder.npz (the
hyperprior's synthesis in integers, the frequency tables, the gains per quality: gqtok.core.latents), no
codebook; the manifest's kind is "codec".
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from gqtok.core import codebook as cb
from gqtok.core.artifact import (CODEBOOK, DECODER, ENCODER, GQ_SELECT, HYPER_ANALYSIS, LATENT_CODER, codebook_file_bytes,
                                 load_artifact)
from gqtok.core.manifest import CodebookSpec, CodecSpec, Manifest, file_sha256, model_digest_of
from gqtok.training.gq import SelectGraph
from gqtok.training.train import WEIGHTS, load_run

OPSET = 18
MAX_SIDE = 8192  # largest image side the dynamic axes promise to support
# Tokens per gq_select.onnx call, fixed: every call has the same shapes, so the runtime takes the same kernels and
# a token's id cannot depend on its neighbours (callers pad the last block). Its [R, K] score matrix is the peak
# memory: 16 MiB for R = 64 and K = 2^16.
ROWS = 64


class EncoderGraph(torch.nn.Module):
    """uint8 NHWC -> (mu, logvar); normalization inside, so clients send raw pixels."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image):
        return self.encoder(image.permute(0, 3, 1, 2).float() / 127.5 - 1.0)


class DecoderGraph(torch.nn.Module):
    """latent -> float NHWC image in [0, 1]."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latent):
        return ((self.decoder(latent).clamp(-1.0, 1.0) + 1.0) * 0.5).permute(0, 2, 3, 1)


class HyperAnalysisGraph(torch.nn.Module):
    """The codec's latents y -> side information z (unrounded)."""

    def __init__(self, analysis):
        super().__init__()
        self.analysis = analysis

    def forward(self, latent):
        return self.analysis(latent)


def _export(module, examples: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic: dict | None) -> None:
    """torch module -> ONNX file. dynamic: input name -> {axis: Dim}, or None for fixed shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module.eval(), examples, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic, opset_version=OPSET,
                          optimize=True, verbose=False, external_data=False)
    # The exporter annotates every node with its Python stack trace (machine paths, a large share of
    # the file); the graph does not need them.
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def _eval_summary(run_dir: Path, eval_json: Path | None) -> dict | None:
    path = Path(eval_json) if eval_json else Path(run_dir) / "eval.json"
    if not path.exists():
        return None
    full = json.loads(path.read_text())
    keys = ("method", "images", "image_size", "continuous", "quantized", "rate", "kl_bits_per_token", "codebook",
            "quantization_error_in_sigmas", "step")
    return {k: full[k] for k in keys if k in full}


TREE_METRIC_PHOTOS = 16  # training photos whose 256x256 centre crops give the k-d tree's metric at export


def tree_metric_from_photos(encode, paths: list[Path], beta: float, token_dim: int) -> list[float] | None:
    """gqtok.core.select.tree_metric over the posteriors of up to TREE_METRIC_PHOTOS photos' 256x256 centre crops;
    encode(uint8 [1, H, W, 3]) -> (mu, logvar) [1, C, h, w]. None when there is no photo to measure on."""
    from gqtok.core import layout
    from gqtok.core.select import tree_metric
    from gqtok.photos import center_crop, load_rgb

    mus, logvars = [], []
    for path in paths[:: max(1, len(paths) // TREE_METRIC_PHOTOS)][:TREE_METRIC_PHOTOS]:
        mu, logvar = encode(np.ascontiguousarray(center_crop(load_rgb(path), (256, 256)))[None])
        mus.append(layout.group(np.asarray(mu), token_dim).reshape(-1, token_dim))
        logvars.append(layout.group(np.asarray(logvar), token_dim).reshape(-1, token_dim))
    return tree_metric(np.concatenate(mus), np.concatenate(logvars), beta) if mus else None


def _run_tree_metric(model, config: dict) -> list[float] | None:
    """The k-d tree's metric on the run's own training photos (config.json's data); None, with a warning, where
    they are not on this machine (the server then takes the first selection's tokens)."""
    import logging

    from gqtok.training import data as photo_data

    try:
        paths, _ = photo_data.training_photos([s["folder"] for s in config.get("data") or []] or "data/endless-sky")
    except (FileNotFoundError, ValueError) as e:
        logging.getLogger("gqtok.export").warning("no training photos for the k-d tree's metric (%s)", e)
        return None

    @torch.no_grad()
    def encode(images):
        mu, logvar = model.encoder(photo_data.to_model_input(images))
        return mu.numpy(), logvar.numpy()

    return tree_metric_from_photos(encode, paths, model.cfg.gq_beta, model.cfg.token_dim)


def _export_encoder_decoder(model, out_dir: Path) -> dict:
    """encoder.onnx and decoder.onnx (batch, height and width dynamic); returns the latent grid's dynamic axes."""
    cfg = model.cfg
    f = cfg.downsample
    batch = torch.export.Dim("batch", min=1, max=4096)
    hb, wb = torch.export.Dim("grid_h", min=1, max=MAX_SIDE // f), torch.export.Dim("grid_w", min=1, max=MAX_SIDE // f)
    latent_axes = {0: batch, 2: hb, 3: wb}
    with torch.no_grad():
        _export(EncoderGraph(model.encoder), (torch.zeros(2, 4 * f, 6 * f, 3, dtype=torch.uint8),), out_dir / ENCODER,
                ["image"], ["mu", "logvar"], {"image": {0: batch, 1: f * hb, 2: f * wb}})
        _export(DecoderGraph(model.decoder), (torch.zeros(2, cfg.latent_channels, 4, 6),), out_dir / DECODER,
                ["latent"], ["image"], {"latent": latent_axes})
    return latent_axes


def save_npz_exactly(arrays: dict[str, np.ndarray], path: Path) -> None:
    """An npz whose bytes depend only on its arrays (np.savez stamps each member with the time of writing, which
    would give every export a new file digest and model digest). Mode 0644."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)
    path.chmod(0o644)


def _save_weights(model, out_dir: Path, weights: bool) -> tuple[str, ...]:
    """The torch weights the graphs were made from (the EMA ones when the run kept them), for fine-tuning:
    gqtok train --init-from MODEL_DIR. weights=False ships the graphs alone (a smaller directory; such a model
    cannot be fine-tuned from). Returns the file names to list in the manifest."""
    from safetensors.torch import save_file as save_torch

    if not weights:
        (out_dir / WEIGHTS).unlink(missing_ok=True)  # a stale file from an earlier export would not be listed
        return ()
    save_torch({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS))
    (out_dir / WEIGHTS).chmod(0o644)
    return (WEIGHTS,)


def _training_record(model, config: dict) -> dict:
    return {"preset": config.get("preset"), "step": config.get("step"), "model": model.cfg.to_dict(),
            "train": config.get("train"), "parameters": model.num_parameters()}


def export_codec(model, config: dict, run_dir: Path, out_dir: Path, model_id: str | None = None,
                 model_version: str | None = None, eval_json: Path | None = None, weights: bool = True) -> Manifest:
    """A discretized-VAE codec run -> a codec model directory (see the module's docstring)."""
    from gqtok.training.codec import portable_coder

    cfg = model.cfg
    f = cfg.downsample
    latent_axes = _export_encoder_decoder(model, out_dir)
    with torch.no_grad():
        _export(HyperAnalysisGraph(model.hyper.analysis), (torch.zeros(2, cfg.latent_channels, 4, 6),),
                out_dir / HYPER_ANALYSIS, ["latent"], ["side"], {"latent": latent_axes})
        gain = model.log_gain.detach().double().exp().numpy()
    order = np.argsort(cfg.rate_lambdas)  # quality 1 = the lowest lambda, the lowest rate
    save_npz_exactly(portable_coder(model).arrays() | {"gain": gain[order], "inv_gain": 1.0 / gain[order]},
                     out_dir / LATENT_CODER)
    shipped = _save_weights(model, out_dir, weights)
    files = {name: file_sha256(out_dir / name) for name in (ENCODER, DECODER, HYPER_ANALYSIS, LATENT_CODER, *shipped)}
    lambdas = sorted(float(v) for v in cfg.rate_lambdas)
    manifest = Manifest(
        kind="codec",
        model_id=model_id or run_dir.name,
        model_version=model_version or model_digest_of(files)[:12],
        downsample=f,
        latent_channels=cfg.latent_channels,
        codec=CodecSpec(rate_lambdas=lambdas, default_quality=(len(lambdas) + 1) // 2,
                        hyper_channels=cfg.hyper_channels),
        opset=OPSET,
        files=files,
        eval=_eval_summary(run_dir, eval_json),
        training=_training_record(model, config),
    )
    manifest.write(out_dir)
    load_artifact(out_dir)  # what we wrote must pass the loader's checks
    return manifest


def export_run(run_dir: Path, out_dir: Path, model_id: str | None = None, model_version: str | None = None,
               eval_json: Path | None = None, weights: bool = True) -> Manifest:
    """The run's encoder, decoder and selection graph as ONNX, its torch weights (unless weights=False), and the
    manifest that lists them and the codebook with their digests. model_version: None gives the first 12 hex digits of the model digest
    (Manifest.model_digest), so that two different exports never share a version by default."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, config = load_run(run_dir)
    cfg = model.cfg
    if cfg.quantizer not in ("gq", "uniform"):
        raise ValueError(f"only GQ models and codecs export to the service; {run_dir} trained the "
                         f"{cfg.quantizer} baseline")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.quantizer == "uniform":
        return export_codec(model, config, run_dir, out_dir, model_id, model_version, eval_json, weights)
    f = cfg.downsample
    _export_encoder_decoder(model, out_dir)
    with torch.no_grad():
        # three distinct example tensors: the exporter would merge one tensor passed twice into one graph input
        examples = (torch.zeros(ROWS, cfg.token_dim), torch.ones(ROWS, cfg.token_dim), torch.zeros(cfg.num_codes, cfg.token_dim))
        _export(SelectGraph(cfg.gq_beta), examples, out_dir / GQ_SELECT,
                ["mu", "logvar", "codebook"], ["ids"], None)

    shipped = _save_weights(model, out_dir, weights)
    codebook = cb.make_codebook(cfg.codebook_seed, cfg.num_codes, cfg.token_dim)
    files = {name: file_sha256(out_dir / name) for name in (ENCODER, DECODER, GQ_SELECT, *shipped)}
    # derived, not written: the loader rebuilds it from the seed (gqtok.core.artifact)
    files[CODEBOOK] = hashlib.sha256(codebook_file_bytes(codebook, cfg.codebook_seed)).hexdigest()
    manifest = Manifest(
        model_id=model_id or run_dir.name,
        model_version=model_version or model_digest_of(files)[:12],
        downsample=f,
        latent_channels=cfg.latent_channels,
        token_dim=cfg.token_dim,
        tokens_per_position=cfg.tokens_per_position,
        gq_beta=cfg.gq_beta,
        codebook=CodebookSpec(seed=cfg.codebook_seed, num_codes=cfg.num_codes, dim=cfg.token_dim,
                              sha256=cb.codebook_digest(codebook)),
        opset=OPSET,
        gq_select_rows=ROWS,
        gq_tree_metric=_run_tree_metric(model, config),
        files=files,
        eval=_eval_summary(run_dir, eval_json),
        training=_training_record(model, config),
    )
    manifest.write(out_dir)
    load_artifact(out_dir)  # what we wrote must pass the loader's checks
    return manifest

