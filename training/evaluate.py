"""Held-out evaluation of a run: the continuous VAE (posterior mean) against its GQ tokenizer.

Reports PSNR / SSIM / MS-SSIM for both, the rate (tokens per image, bits per
token, bpp), per-token KL in bits against log2 K, codebook usage, and the
distribution of |z_hat - mu| / sigma (how far GQ moved each latent, in
posterior standard deviations). Writes JSON and a PNG grid
(original | posterior mean | tokens, one row per photo). The token path is GQ
for a Gaussian VAE, or TokenBridge-style scalar quantization, or a baseline's
own quantizer (VQ, FSQ, LFQ, BSQ).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ms_ssim, ssim

from gqtok import photos as photo_files
from gqtok.training import data as photo_data
from gqtok.training.gq import GaussianQuantize
from gqtok.training.quantizers.tokenbridge import GaussianScalarQuantizer
from gqtok.training.model import kl_bits_per_token
from gqtok.training.train import load_run

MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window need more than (11 - 1) * 2^4 pixels


def image_metrics(x_u8: np.ndarray, y_u8: np.ndarray) -> dict:
    """PSNR (dB), SSIM and MS-SSIM of two uint8 [H, W, 3] images, on the [0, 1] scale."""
    x = torch.from_numpy(np.array(x_u8)).permute(2, 0, 1)[None].float() / 255
    y = torch.from_numpy(np.array(y_u8)).permute(2, 0, 1)[None].float() / 255
    mse = F.mse_loss(x.double(), y.double()).item()
    out = {
        "psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "ssim": ssim(x, y, data_range=1.0).item(),
        "ms_ssim": None,
    }
    if min(x_u8.shape[:2]) >= MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = ms_ssim(x, y, data_range=1.0).item()
    return out


def srgb_to_lab(img_u8: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> CIELAB (D65 white) float64 [..., 3]."""
    c = np.asarray(img_u8, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920],
                             [0.1804375, 0.0721750, 0.9503041]])
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


GREY_CHROMA = 1.0  # an original whose mean chroma C*ab is below this is a greyscale photo


def colour_metrics(x_u8: np.ndarray, y_u8: np.ndarray) -> dict:
    """Colour fidelity of a reconstruction y of x, in CIELAB: colour_shift, the CIE76 distance between their mean
    colours (a cast); delta_e76, the mean per-pixel CIE76 distance; grey_chroma, for a greyscale original only
    (mean chroma below GREY_CHROMA), the reconstruction's mean chroma C*ab = sqrt(a*^2 + b*^2): a tint that a
    grey photo should not have (None otherwise)."""
    lx, ly = srgb_to_lab(x_u8).reshape(-1, 3), srgb_to_lab(y_u8).reshape(-1, 3)
    grey = float(np.hypot(lx[:, 1], lx[:, 2]).mean()) < GREY_CHROMA
    return {"colour_shift": float(np.linalg.norm(lx.mean(axis=0) - ly.mean(axis=0))),
            "delta_e76": float(np.linalg.norm(lx - ly, axis=1).mean()),
            "grey_chroma": float(np.hypot(ly[:, 1], ly[:, 2]).mean()) if grey else None}


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else None


def _quantiles(x: np.ndarray, qs=(5, 50, 95)) -> dict:
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(x, qs))}


class TokenPath:
    """How one method turns posteriors into tokens and back: (mu, logvar) -> (ids [B, T, h, w], z_hat)."""

    def __init__(self, model, method: str, levels: int, device: str):
        cfg = model.cfg
        self.method = method
        if method == "gq":
            if cfg.quantizer != "gq":
                raise ValueError(f"GQ needs a Gaussian VAE; this run trained with the {cfg.quantizer} quantizer")
            gq = GaussianQuantize(cfg.num_codes, cfg.token_dim, cfg.codebook_seed, cfg.gq_beta).to(device)
            self.num_codes, self.bits, self.per_position = cfg.num_codes, float(cfg.codebook_bits), cfg.tokens_per_position
            self.to_ids = lambda mu, logvar: gq(mu, logvar)[1]
            self.to_latent = gq.get_output_from_indices
        elif method == "tokenbridge":
            if cfg.quantizer != "gq":
                raise ValueError("tokenbridge quantizes a Gaussian VAE's latents; this run is a baseline")
            sq = GaussianScalarQuantizer(levels).to(device)
            self.num_codes, self.bits, self.per_position = levels, sq.bits_per_token, cfg.latent_channels
            self.to_ids = lambda mu, logvar: sq.encode(mu)
            self.to_latent = sq.decode
        elif method == cfg.quantizer:  # a baseline's own quantizer
            q = model.quantizer
            self.num_codes, self.bits, self.per_position = q.num_codes, float(q.bits_per_token), cfg.tokens_per_position
            self.to_ids = lambda mu, logvar: model.quantize(mu.float()).ids
            self.to_latent = model.dequantize
        else:
            raise ValueError(f"method {method!r} does not apply to a {cfg.quantizer} run (gq, tokenbridge or its own)")


@torch.no_grad()
def evaluate(run_dir: Path, data_dir: Path, json_out: Path | None = None, png_out: Path | None = None,
             size: tuple[int, int] = photo_files.HELDOUT_SIZE, limit: int | None = None, device: str = "cpu",
             progress: bool = True, method: str = "auto", tokenbridge_levels: int = 64, fd: bool = False) -> dict:
    """Evaluate a run on the held-out photos. method: "auto" (GQ for a Gaussian VAE, else the run's own
    quantizer), "gq", or "tokenbridge" (per-channel scalar quantization with `tokenbridge_levels` bins)."""
    from tqdm import tqdm

    model, config = load_run(run_dir, device)
    cfg = model.cfg
    gaussian = cfg.quantizer == "gq"
    method = ("gq" if gaussian else cfg.quantizer) if method == "auto" else method
    token_path = TokenPath(model, method, tokenbridge_levels, device)
    if size[0] % cfg.downsample or size[1] % cfg.downsample:
        raise ValueError(f"evaluation size {size} must be a multiple of f={cfg.downsample}")
    _, heldout = photo_files.split_heldout(photo_files.list_images(data_dir))
    if not heldout:
        raise FileNotFoundError(f"none of the held-out photos ({', '.join(photo_files.HELDOUT[:3])}, ...) are in {data_dir}")
    heldout = heldout[:limit] if limit else heldout

    rows, kls, errs, grid_rows = [], [], [], []
    counts = np.zeros(token_path.num_codes, np.int64)
    fd_sets = {"original": [], "continuous": [], "quantized": []}
    for path in tqdm(heldout, desc=f"eval {method}", disable=not progress, leave=False):
        original = photo_files.center_crop(photo_files.load_rgb(path), size)
        x = photo_data.to_model_input(original[None]).to(device)
        mu, logvar = model.encoder(x)
        ids = token_path.to_ids(mu, logvar)
        z_hat = token_path.to_latent(ids)
        recon_mean = photo_data.to_uint8(model.decoder(mu))[0]
        recon_q = photo_data.to_uint8(model.decoder(z_hat))[0]
        if gaussian:
            kls.append(kl_bits_per_token(mu, logvar, cfg.token_dim).flatten().cpu().numpy())
            errs.append(((z_hat - mu).abs() / torch.exp(0.5 * logvar)).flatten().cpu().numpy())
        counts += np.bincount(ids.flatten().cpu().numpy(), minlength=token_path.num_codes)
        rows.append({"image": path.name, "continuous": image_metrics(original, recon_mean),
                     "quantized": image_metrics(original, recon_q)})
        grid_rows.append(np.concatenate([original, recon_mean, recon_q], axis=1))
        if fd:
            for key, img in (("original", original), ("continuous", recon_mean), ("quantized", recon_q)):
                fd_sets[key].append(photo_data.to_model_input(img[None]))

    h, w = size
    tokens = token_path.per_position * (h // cfg.downsample) * (w // cfg.downsample)
    p = counts[counts > 0] / counts.sum()
    result = {
        "run": str(run_dir),
        "method": method,
        "step": config.get("step"),
        "preset": config.get("preset"),
        "model": cfg.to_dict(),
        "train": config.get("train"),
        "parameters": model.num_parameters(),
        "images": len(rows),
        "image_size": [h, w],
        "continuous": {k: _mean([r["continuous"] for r in rows], k) for k in ("psnr", "ssim", "ms_ssim")},
        "quantized": {k: _mean([r["quantized"] for r in rows], k) for k in ("psnr", "ssim", "ms_ssim")},
        "rate": {
            "tokens_per_image": tokens,
            "tokens_per_256x256": token_path.per_position * (256 // cfg.downsample) ** 2,
            "bits_per_token": token_path.bits,
            "bpp": tokens * token_path.bits / (h * w),
        },
        "kl_bits_per_token": None,
        "codebook": {
            "size": token_path.num_codes,
            "used_fraction": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "tokens_counted": int(counts.sum()),
        },
        "quantization_error_in_sigmas": None,
        "per_image": rows,
    }
    if gaussian:
        kl, err = np.concatenate(kls), np.concatenate(errs)
        target, band = float(cfg.codebook_bits), float((config.get("train") or {}).get("tdc_band", 0.5))
        result["kl_bits_per_token"] = {
            "target": target, "band": band, "mean": float(kl.mean()), **_quantiles(kl),
            "min": float(kl.min()), "max": float(kl.max()),
            "fraction_in_band": float(np.mean(np.abs(kl - target) <= band)),
        }
        result["quantization_error_in_sigmas"] = {
            "mean": float(err.mean()), **_quantiles(err, (50, 95, 99)), "max": float(err.max()),
            "fraction_below_1": float(np.mean(err < 1.0)),
        }
    if fd:
        from gqtok.training.perceptual import fd_effnet_lite0

        originals = torch.cat(fd_sets["original"])
        result["fd_effnet_lite0"] = {k: fd_effnet_lite0(originals, torch.cat(fd_sets[k]))
                                     for k in ("continuous", "quantized")}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    if png_out:
        save_grid(grid_rows[:6], png_out, scale=2)
    return result


def save_grid(rows: list[np.ndarray], path: Path, scale: int | None = None) -> None:
    """Image rows stacked into one picture, shrunk by `scale` (default: the least that keeps it at most 1536 px
    wide)."""
    grid = np.concatenate(rows, axis=0)
    scale = scale or -(-grid.shape[1] // 1536)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] // scale, grid.shape[0] // scale), Image.LANCZOS).save(path)


# -- any tokenizer, any photos --------------------------------------------------------------------------------------
def classic_at_bpp(img: np.ndarray, fmt: str, target_bpp: float) -> tuple[np.ndarray, float, int]:
    """Pillow's JPEG or WebP at the highest quality whose file stays at or under target_bpp (quality 1 when none
    does): (decoded uint8 image, its bpp, the quality)."""
    import io

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, quality=q)
        return buf.getvalue()

    pixels = img.shape[0] * img.shape[1]
    lo, hi, best = 1, 95, 1
    while lo <= hi:  # bpp grows with quality: binary search the largest quality under the target
        mid = (lo + hi) // 2
        if len(encode(mid)) * 8 / pixels <= target_bpp:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    data = encode(best)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), len(data) * 8 / pixels, best


def evaluate_tokenizer(tokenize, detokenize, paths: list[Path], size: tuple[int, int], bits_per_token: float,
                       name: str = "model", classic: bool = True, progress: bool = True,
                       png_out: Path | None = None, fd: bool = False, greyed: bool = True) -> dict:
    """Any tokenizer on any photos: centre crops of `size` (photos smaller than it are skipped, not upscaled),
    tokenize(uint8 [1, H, W, 3]) -> ids [1, T, h, w] and detokenize(ids) -> uint8 [1, H, W, 3] (an exported model's
    runtime, a server's client, a run's torch model), PSNR / SSIM / MS-SSIM of the tokens' reconstruction, and
    JPEG and WebP at the same bpp on the same crops, and the colour figures of colour_metrics for each; for the
    tokens also greyed_chroma, the mean chroma C*ab of the reconstruction of each crop made grey (gqtok.photos.
    to_grey; a grey picture's should be 0; greyed=False leaves it out, half the model's work). Results overall
    and per source (gqtok.photos.source_of).
    png_out: a grid of the first photo of each source (up to 8): original | tokens | JPEG at the same bpp.
    fd: also fd_effnet_lite0, the Frechet distance on EfficientNet-Lite0 features between the crops and each
    method's reconstructions (over all crops; comparable only on the same photos, and not FID).
    A photo that cannot be read or tokenized is listed under "failed" with its reason; the others are measured."""
    from tqdm import tqdm

    h, w = size
    rows, skipped, failed, grid_rows = [], [], [], {}
    fd_sets: dict[str, list[np.ndarray]] = {"original": [], "tokens": [], "jpeg": [], "webp": []}
    for path in tqdm(paths, desc=f"eval {name} {h}x{w}", disable=not progress, leave=False):
        try:
            img = photo_files.load_rgb(path)
            if img.shape[0] < h or img.shape[1] < w:
                skipped.append(str(path))
                continue
            crop = np.ascontiguousarray(photo_files.center_crop(img, size))
            ids = np.asarray(tokenize(crop[None]))
            recon = np.asarray(detokenize(ids))[0]
        except Exception as e:  # an unreadable file, a server's refusal: this photo only
            failed.append({"image": str(path), "error": f"{type(e).__name__}: {e}"})
            continue
        bpp = ids[0].size * bits_per_token / (h * w)
        row = {"image": str(path), "source": photo_files.source_of(path), "bpp": bpp,
               "tokens": image_metrics(crop, recon) | colour_metrics(crop, recon)}
        if greyed:  # every photo made grey and tokenized too: a tint on a grey picture, measured on all photos,
            # not the few that are greyscale already
            lab = srgb_to_lab(np.asarray(detokenize(np.asarray(tokenize(photo_files.to_grey(crop)[None]))))[0])
            row["tokens"]["greyed_chroma"] = float(np.hypot(lab[..., 1], lab[..., 2]).mean())
        if classic:
            for fmt in ("JPEG", "WEBP"):
                decoded, fbpp, q = classic_at_bpp(crop, fmt, bpp)
                row[fmt.lower()] = image_metrics(crop, decoded) | colour_metrics(crop, decoded) | {"bpp": fbpp,
                                                                                                   "quality": q}
                if fmt == "JPEG" and png_out and row["source"] not in grid_rows and len(grid_rows) < 8:
                    grid_rows[row["source"]] = np.concatenate([crop, recon, decoded], axis=1)
                if fd:
                    fd_sets[fmt.lower()].append(decoded)
        if fd:
            fd_sets["original"].append(crop)
            fd_sets["tokens"].append(recon)
        rows.append(row)
    if not rows:
        reasons = f"; {len(failed)} failed, the first: {failed[0]['error']}" if failed else ""
        raise ValueError(f"no photo of at least {h}x{w} among the {len(paths)} given{reasons}")
    kinds = ["tokens"] + (["jpeg", "webp"] if classic else [])

    def summary(group: list[dict]) -> dict:
        out = {"images": len(group), "bpp": float(np.mean([r["bpp"] for r in group]))}
        for k in kinds:
            out[k] = {m: _mean([r[k] for r in group], m) for m in ("psnr", "ssim", "ms_ssim", "colour_shift",
                                                                       "delta_e76", "grey_chroma")}
            out[k]["grey_images"] = sum(r[k]["grey_chroma"] is not None for r in group)
            if k == "tokens" and greyed:
                out[k]["greyed_chroma"] = _mean([r[k] for r in group], "greyed_chroma")
            if k != "tokens":
                out[k]["bpp"] = float(np.mean([r[k]["bpp"] for r in group]))
                out[f"psnr_gap_to_{k}"] = out["tokens"]["psnr"] - out[k]["psnr"]
        return out

    if png_out and grid_rows:
        save_grid([grid_rows[k] for k in sorted(grid_rows)], png_out)
    sources = sorted({r["source"] for r in rows})
    extra = {}
    if fd:
        from gqtok.training.perceptual import fd_effnet_lite0

        originals = photo_data.to_model_input(np.stack(fd_sets["original"]))
        extra["fd_effnet_lite0"] = {k: fd_effnet_lite0(originals, photo_data.to_model_input(np.stack(v)))
                                    for k, v in fd_sets.items() if k != "original" and v}
    return {"model": name, "image_size": [h, w], "bits_per_token": bits_per_token, **summary(rows), **extra,
            "per_source": {s: summary([r for r in rows if r["source"] == s]) for s in sources},
            "skipped_smaller_than_crop": skipped, "failed": failed, "per_image": rows}


def run_tokenizer(run_dir: Path, device: str = "cpu", method: str = "auto", tokenbridge_levels: int = 64):
    """(tokenize, detokenize, bits per token) of a training run's torch model and its token path (method "auto":
    GQ for a Gaussian VAE, else its own quantizer; or "gq", "tokenbridge" as in `evaluate`), on uint8
    [B, H, W, 3] images."""
    model, _ = load_run(run_dir, device)
    if method == "auto":
        method = "gq" if model.cfg.quantizer == "gq" else model.cfg.quantizer
    path = TokenPath(model, method, tokenbridge_levels, device)

    @torch.no_grad()
    def tokenize(images):
        mu, logvar = model.encoder(photo_data.to_model_input(images).to(device))
        return path.to_ids(mu, logvar).cpu().numpy()

    @torch.no_grad()
    def detokenize(ids):
        return photo_data.to_uint8(model.decoder(path.to_latent(torch.as_tensor(ids, device=device))))

    return tokenize, detokenize, path.bits
