"""TDC training of the Gaussian VAE: single process, or data-parallel under torchrun.

A run directory holds:
  config.json          preset name, VAEConfig and TrainConfig (everything needed to rebuild the model)
  model.safetensors    model weights plus the TDC scalars (tdc.lam, tdc.lam_max, tdc.lam_min)
  trainer.pt           optimizer state, step and RNG states (for --resume)
  log.jsonl            one line of metrics every `log_every` steps (time_s: wall seconds of this process; cpu_s: the
                       run's CPU seconds, all threads, across resumes)
  samples/step_N.png   originals (top) over reconstructions (bottom), every `image_every` steps

Data parallel: `torchrun --nproc_per_node N -m gqtok.cli train ...` (gloo on CPU,
nccl on GPU). Each rank draws its own crops (seed + rank); DDP averages the
gradients and TDC all-reduces its KL statistics, so every rank holds the same
model and the same three scalars.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gqtok.training import data as photo_data
from gqtok.training.model import PRESETS, VAEConfig, build_model, calibrate_fixed_norms, kl_bits_per_token
from gqtok.training.tdc import TDC


@dataclass
class TrainConfig:
    steps: int = 10_000  # optimizer steps in total (a resumed run continues up to this)
    time_limit_min: float = 0.0  # stop (and checkpoint) after this many minutes; 0 = no limit
    stop_at: int = 0  # stop (and checkpoint) at this step, the learning-rate schedule still that of `steps`; 0 = at steps
    batch_size: int = 8  # images per step per rank
    crop: int = 128  # random square crop size
    # random resized crops: windows of side crop * U(1, crop_window_max), resized to crop; 1 = plain crops
    crop_window_max: float = 1.0
    lr: float = 2e-4  # Adam learning rate (the peak, with a schedule)
    lr_schedule: str = "constant"  # "constant", or "cosine": linear warm-up, then cosine down to lr * lr_final_ratio
    warmup_steps: int = 0  # steps of linear warm-up from 0 to lr (cosine schedule)
    lr_final_ratio: float = 0.1  # the cosine schedule ends at lr * this, at `steps`
    ema_decay: float = 0.0  # exponential moving average of the weights (e.g. 0.999); 0 = off. Eval and export use it
    init_from: str = ""  # a run directory or an exported model with weights.safetensors to start from (new runs)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    recon_loss: str = "l1"  # "l1" or "mse", mean over pixels in [-1, 1]
    perceptual_weight: float = 0.0  # weight of the EfficientNet-Lite0 deep-feature distance; 0 = off
    # Colour fidelity (issue 31): the mean squared error of 8x8-averaged pixels, the low frequencies where a colour
    # cast lives and where MSE on pixels gives it little weight; and crops made grey or dark with these
    # probabilities, the photos whose cast the default model's training data (a game's art) rarely shows
    colour_weight: float = 0.0
    # ... and chroma_weight times the MSE of the opponent-colour channels (R - G, (R + G) / 2 - B): colour errors,
    # which a per-pixel RGB MSE weighs little; on a grey crop, exactly its reconstruction's tint
    chroma_weight: float = 0.0
    # Train the decoder alone on what it decodes in service: GQ's codewords for the frozen encoder's posteriors
    # (no KL term, no encoder gradient). Training otherwise decodes posterior samples, whose noise is not GQ's
    decoder_on_tokens: bool = False
    grey_prob: float = 0.0
    dark_prob: float = 0.0
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    kl_mode: str = "tdc"  # "tdc": adaptive per-token constraint; "fixed": kl_weight * KL (the plain-KL baseline)
    kl_weight: float = 1e-5  # KL weight when kl_mode == "fixed" (per bit, summed over tokens, mean over images)
    tdc_band: float = 0.5  # +- bits around log2 K
    tdc_rate: float = 1.01  # per-step multiplicative update of lam, lam_max, lam_min
    tdc_lam_init: float = 1e-4  # first KL weight (adapts)
    # lam's lower bound. 0 is the reference rule; there, while KL is under target early on, lam falls 1% a
    # step to ~1e-9 and takes ~1000 steps to climb back, so KL overshoots (see the README, issue 6)
    tdc_lam_floor: float = 0.0
    seed: int = 0
    log_every: int = 50  # steps between log lines (and bar updates)
    image_every: int = 1000  # steps between reconstruction grids; 0 = only at the end
    ckpt_every: int = 1000  # steps between checkpoints; 0 = only at the end
    device: str = "auto"  # "auto", "cpu", "cuda"

    def __post_init__(self):
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        if not (0 <= self.grey_prob <= 1 and 0 <= self.dark_prob <= 1) or min(self.colour_weight, self.chroma_weight) < 0:
            raise ValueError("grey_prob and dark_prob must lie in [0, 1], colour_weight and chroma_weight be >= 0")
        if self.kl_mode not in ("tdc", "fixed"):
            raise ValueError(f"kl_mode must be 'tdc' or 'fixed', got {self.kl_mode!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based); a function of the step alone, so resuming is exact."""
        if self.lr_schedule == "constant":
            return self.lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.lr_final_ratio + (1 - self.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_configs(preset: str, overrides: dict | None = None) -> tuple[VAEConfig, TrainConfig]:
    """Preset values, then `overrides` (field name -> value; names are unique across both configs)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    model_kw, train_kw = dict(PRESETS[preset]["model"]), dict(PRESETS[preset]["train"])
    model_names = {f.name for f in fields(VAEConfig)}
    train_names = {f.name for f in fields(TrainConfig)}
    for key, value in (overrides or {}).items():
        if key in model_names:
            model_kw[key] = value
        elif key in train_names:
            train_kw[key] = value
        else:
            raise ValueError(f"unknown setting {key!r}")
    return VAEConfig(**model_kw), TrainConfig(**train_kw)


WEIGHTS = "weights.safetensors"  # the torch weights an exported model ships beside its ONNX files
CODEC_SETTINGS = ("quantizer", "rate_lambdas", "hyper_channels")  # what the codec adds to a network it starts from
GROW_SETTINGS = ("downsample", "channel_mult")  # what a model with a coarser grid changes in the one it starts from
NORM_SETTINGS = ("norm",)  # a fine-tune may freeze its source's GroupNorm statistics (model.py, FixedGroupNorm)
OUTPUT_SETTINGS = ("chroma_deadzone",)  # settings of the decoder's output, no weights: a fine-tune may set them
STAT_KEYS = ("stat_mean", "stat_var")  # FixedGroupNorm's buffers
NORM_CALIBRATION_BATCHES = 8  # of 16 crops: 128 crops measure each layer's statistics


def load_weights(source: Path, device: str = "cpu", ema: bool = True) -> tuple[dict, dict]:
    """(model config dict, model state dict) of a run directory (the EMA weights when it has them and `ema`) or of
    an exported model directory that ships weights.safetensors."""
    source = Path(source)
    if not source.exists() and len(source.parts) == 1:  # a model's name on the search path ("default")
        from gqtok.core.models import find_model

        source = find_model(str(source))
    if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        config = json.loads((source / "config.json").read_text())["model"]
        state = load_file(str(source / "model.safetensors"), device=device)
        prefix = "ema." if ema and any(k.startswith("ema.") for k in state) else "model."
        return config, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if (source / "manifest.json").is_file():
        manifest = json.loads((source / "manifest.json").read_text())
        if WEIGHTS not in manifest.get("files", {}):
            raise FileNotFoundError(f"{source} is an exported model without torch weights ({WEIGHTS}); it cannot be "
                                    "fine-tuned. Models exported by this version ship them")
        from gqtok.core.artifact import load_artifact

        load_artifact(source)  # every digest, the weights' included
        return manifest["training"]["model"], load_file(str(source / WEIGHTS), device=device)
    raise FileNotFoundError(f"{source} is neither a training run (config.json, model.safetensors) nor an exported "
                            "model (manifest.json)")


def load_run(run_dir: Path, device: str = "cpu", ema: bool = True) -> tuple[GaussianVAE, dict]:
    """Rebuild the model of a run directory from config.json + model.safetensors (its EMA weights when it kept
    them and `ema`)."""
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run (needs config.json and model.safetensors)")
    config = json.loads(cfg_path.read_text())
    model_config, state = load_weights(run_dir, device, ema)
    model = build_model(VAEConfig(**model_config))
    model.load_state_dict(state)
    return model.to(device).eval(), config


def opponent_chroma(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB -> [B, 2, H, W]: R - G and (R + G) / 2 - B, zero wherever a pixel is grey."""
    r, g, b = images.unbind(1)
    return torch.stack([r - g, (r + g) / 2 - b], dim=1)


def _grid_png(originals: torch.Tensor, recons: torch.Tensor, path: Path, n: int = 8) -> None:
    from PIL import Image

    top = photo_data.to_uint8(originals[:n])
    bottom = photo_data.to_uint8(recons[:n])
    grid = np.concatenate([np.concatenate(list(top), axis=1), np.concatenate(list(bottom), axis=1)], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = F.mse_loss(x.float().clamp(-1, 1), y.float()).item() / 4.0  # [-1,1] -> [0,1] scale
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _bar_fields(m: dict) -> dict:
    """loss, PSNR, KL bits per token (mean/min/max) and the TDC scalars, or a baseline's own stats."""
    out = {"loss": f"{m['loss']:.4f}", "psnr": f"{m['psnr']:.2f}"}
    if "bpp" in m:
        out.update(bpp=f"{m['bpp']:.3f}", side=f"{m['side_bpp']:.4f}")
    if "kl_mean" in m:
        out["kl"] = f"{m['kl_mean']:.2f}/{m['kl_min']:.1f}/{m['kl_max']:.1f}"
    if "lam" in m:
        out.update(lam=f"{m['lam']:.2e}", lam_max=f"{m['lam_max']:.2f}", lam_min=f"{m['lam_min']:.3f}")
    out.update({k: f"{v:.3g}" for k, v in m.items() if k.startswith("q_")})
    return out


class Trainer:
    def __init__(self, run_dir: Path, data, model_cfg: VAEConfig, train_cfg: TrainConfig, preset: str,
                 progress: bool = True):
        self.run_dir, self.preset = Path(run_dir), preset
        self.mcfg, self.tcfg = model_cfg, train_cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        use_cuda = train_cfg.device == "cuda" or (train_cfg.device == "auto" and torch.cuda.is_available())
        if self.distributed:
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        self.progress = progress and self.rank == 0

        torch.manual_seed(train_cfg.seed)  # same initial weights on every rank
        self.model = build_model(model_cfg).to(self.device)
        self.codec = model_cfg.quantizer == "uniform"
        self.tdc = TDC(model_cfg.codebook_bits, train_cfg.tdc_band, train_cfg.tdc_rate, train_cfg.tdc_lam_init,
                       lam_floor=train_cfg.tdc_lam_floor).to(self.device)
        self.gq = None
        if train_cfg.decoder_on_tokens:
            if model_cfg.quantizer != "gq":
                raise ValueError(f"decoder_on_tokens decodes GQ tokens; this is a {model_cfg.quantizer} model")
            if self.distributed:  # its step calls the decoder outside DistributedDataParallel
                raise ValueError("decoder_on_tokens runs in one process, not under torchrun")
            from gqtok.training.gq import GaussianQuantize

            self.gq = GaussianQuantize(model_cfg.num_codes, model_cfg.token_dim, model_cfg.codebook_seed,
                                       model_cfg.gq_beta).to(self.device)
            self.model.encoder.requires_grad_(False)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(trained, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[local] if use_cuda else None)
                    if self.distributed else self.model)
        self.perceptual = None
        if train_cfg.perceptual_weight > 0:
            from gqtok.training.perceptual import DeepFeatureDistance

            self.perceptual = DeepFeatureDistance().to(self.device)
        refreeze, fresh_gains = False, self.codec
        if train_cfg.init_from:
            source_cfg, state = load_weights(Path(train_cfg.init_from), str(self.device))
            if source_cfg.get("downsample", model_cfg.downsample) != model_cfg.downsample:  # a coarser grid
                from gqtok.training.model import grown_state

                if model_cfg.encoder == "effnet-lite0":
                    self.model.encoder.trunk.load_imagenet()  # the stage the source lacks
                state, fresh = grown_state(state, VAEConfig(**source_cfg), model_cfg, self.model.state_dict())
                print(f"grown from {train_cfg.init_from} (f={source_cfg['downsample']} -> {model_cfg.downsample}): "
                      f"{len(fresh)} tensors new ({', '.join(sorted({k.rsplit('.', 2)[0] for k in fresh})[:6])} ...)")
            # what a starting point may lack: a codec's hyperprior and gains (it starts from a Gaussian VAE), and
            # the statistics of norms being frozen (measured below, on training crops; model.py FixedGroupNorm)
            refreeze = model_cfg.norm == "fixed" and source_cfg.get("norm", "group") == "group"
            widen_from = source_cfg.get("latent_channels", model_cfg.latent_channels)
            if self.codec and widen_from < model_cfg.latent_channels:
                from gqtok.training.codec import widened_state

                state = widened_state(state, widen_from, self.model.state_dict())
                print(f"latent channels {widen_from} -> {model_cfg.latent_channels}: the new ones start "
                      "disconnected from the decoder")
            if self.codec and "log_gain" in state and list(source_cfg["rate_lambdas"]) != list(model_cfg.rate_lambdas):
                from gqtok.training.codec import resampled_gains

                state = {**state, "log_gain": resampled_gains(state["log_gain"], source_cfg["rate_lambdas"],
                                                              model_cfg.rate_lambdas)}
                print(f"rate levels {source_cfg['rate_lambdas']} -> {list(model_cfg.rate_lambdas)}: gains "
                      "interpolated in log(lambda), extended at the ends")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            new = [k for k in missing if not (self.codec and k.startswith(("hyper.", "log_gain")))
                   and not (refreeze and k.endswith(STAT_KEYS))]
            if new or unexpected:
                raise ValueError(f"{train_cfg.init_from} does not match this network (missing {new[:5]}, "
                                 f"unexpected {unexpected[:5]})")
            fresh_gains = self.codec and "log_gain" in missing
        elif model_cfg.encoder == "effnet-lite0":  # a resumed run then loads its own weights over these
            self.model.encoder.trunk.load_imagenet()
        self.step, self.ranks, self.interrupted = 0, [], False
        self.cpu_start, self.cpu_before = time.process_time(), 0.0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

        train_paths, weights = photo_data.training_photos(data)
        self.sources = [{"folder": str(f), "weight": w} for f, w in map(photo_data.parse_source,
                        [data] if isinstance(data, (str, Path)) else data)]
        self.data = photo_data.RandomCrops(train_paths, train_cfg.crop, seed=train_cfg.seed + 1000 * self.rank,
                                           progress=self.progress, weights=weights,
                                           window_max=train_cfg.crop_window_max, grey_prob=train_cfg.grey_prob,
                                           dark_prob=train_cfg.dark_prob)
        self.fixed = photo_data.to_model_input(
            photo_data.RandomCrops(train_paths, train_cfg.crop, seed=12345).batch(8)).to(self.device)
        if fresh_gains:  # a resumed run, or a codec started from a codec, loads its own gains over these
            self.model.calibrate_gains(self.fixed)
        if refreeze:  # a resumed run loads its own
            crops = photo_data.RandomCrops(train_paths, train_cfg.crop, seed=54321, window_max=train_cfg.crop_window_max)
            batches = [photo_data.to_model_input(crops.batch(16)).to(self.device) for _ in range(NORM_CALIBRATION_BATCHES)]
            levels = torch.Generator().manual_seed(0)
            # a codec's decoder sees every rate level's latents: each crop at a level drawn at random
            codec_forward = (lambda x: self.model(x, torch.randint(len(model_cfg.rate_lambdas), (len(x),),
                                                                   generator=levels).to(self.device), noise=False))
            calibrate_fixed_norms(self.model, batches, codec_forward if self.codec else None)
        # EMA of every floating-point entry of the state dict (weights and buffers, calibrated ones included),
        # updated after each step; a frozen encoder (decoder_on_tokens) is left out: the average of a constant
        # drifts by an ulp in float32, and its tokens must stay bit for bit the source's
        frozen = ("encoder.",) if train_cfg.decoder_on_tokens else ()
        self.ema = ({k: v.detach().clone().float() for k, v in self.model.state_dict().items()
                     if v.is_floating_point() and not k.startswith(frozen)} if train_cfg.ema_decay else None)
        if self.codec:
            self.lambdas = torch.tensor(model_cfg.rate_lambdas, device=self.device)

    # -- checkpoints ---------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        state.update({f"tdc.{k}": v.detach().cpu() for k, v in self.tdc.state_dict().items()})
        if self.ema is not None:  # the EMA copy of every entry (non-float buffers as they are, copied: safetensors
            # refuses two names for one tensor, e.g. BatchNorm's num_batches_tracked)
            state.update({f"ema.{k}": (self.ema[k] if k in self.ema else v.clone()).detach().contiguous().cpu()
                          for k, v in self.model.state_dict().items()})
        tmp = self.run_dir / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"step": str(self.step)})
        os.chmod(tmp, 0o644)  # safetensors writes 0600: a container's user (uid 10001) could not read it
        os.replace(tmp, self.run_dir / "model.safetensors")  # never leave a half-written checkpoint
        torch.save({"optimizer": self.opt.state_dict(), "step": self.step, "data_rng": self.data.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state()}, self.run_dir / "trainer.pt.tmp")
        os.replace(self.run_dir / "trainer.pt.tmp", self.run_dir / "trainer.pt")
        (self.run_dir / "config.json").write_text(json.dumps(
            {"preset": self.preset, "model": self.mcfg.to_dict(), "train": asdict(self.tcfg), "step": self.step,
             "world_size": self.world, "tdc": self.tdc.scalars(), "ranks": self.ranks, "data": self.sources,
             "cpu_seconds": round(self.cpu_seconds(), 1)},
            indent=2))

    def cpu_seconds(self) -> float:
        """CPU time of the run so far, every thread of this rank's process counted, across resumes (core-seconds:
        one thread busy for a second is one)."""
        return self.cpu_before + time.process_time() - self.cpu_start

    def load(self) -> None:
        self.cpu_before = json.loads((self.run_dir / "config.json").read_text()).get("cpu_seconds", 0.0)
        state = load_file(str(self.run_dir / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.tdc.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("tdc.")})
        if self.ema is not None:
            saved = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
            self.ema = {k: saved.get(k, v).float().clone() for k, v in self.ema.items()}
        trainer = torch.load(self.run_dir / "trainer.pt", map_location=self.device, weights_only=False)
        self.opt.load_state_dict(trainer["optimizer"])
        self.step = trainer["step"]
        if self.world == 1:  # with several ranks each keeps drawing fresh crops from its own seed
            self.data.rng.bit_generator.state = trainer["data_rng"]
            torch.set_rng_state(trainer["torch_rng"])

    # -- one step ------------------------------------------------------------
    def train_step(self) -> dict:
        x = photo_data.to_model_input(self.data.batch(self.tcfg.batch_size)).to(self.device)
        if self.codec:
            return self.codec_step(x)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.tcfg.precision == "bf16"
                    else nullcontext())
        with autocast:
            if self.gq is not None:  # decoder_on_tokens
                with torch.no_grad():
                    z_hat = self.gq(*self.model.encoder(x))[0]
                recon, quantized = self.model.decoder(z_hat), None
            else:
                recon, mu, logvar, quantized = self.ddp(x)
        recon = recon.float()
        rec = F.l1_loss(recon, x) if self.tcfg.recon_loss == "l1" else F.mse_loss(recon, x)
        logs = {}
        if self.gq is not None:
            loss = rec
        elif quantized is not None:  # a baseline: its own codebook / commitment / entropy terms
            loss = rec + quantized.loss
            logs = {f"q_{k}": float(v) for k, v in quantized.stats.items()}
        else:
            kl_tok = kl_bits_per_token(mu, logvar, self.mcfg.token_dim)
            if self.tcfg.kl_mode == "tdc":
                loss = rec + self.tdc.loss(kl_tok)
            else:
                loss = rec + self.tcfg.kl_weight * kl_tok.flatten(1).sum(1).mean()
        if self.perceptual is not None:
            loss = loss + self.tcfg.perceptual_weight * self.perceptual(recon, x).mean()
        if self.tcfg.colour_weight:
            loss = loss + self.tcfg.colour_weight * F.mse_loss(F.avg_pool2d(recon, 8), F.avg_pool2d(x, 8))
        if self.tcfg.chroma_weight:
            loss = loss + self.tcfg.chroma_weight * F.mse_loss(opponent_chroma(recon), opponent_chroma(x))
        lr = self.tcfg.lr_at(self.step)
        self.optimize(loss)
        logs["lr"] = lr
        if quantized is None and self.gq is None:
            stats = self.tdc.statistics(kl_tok)  # all-reduced: every rank updates the same way
            logs.update(kl_mean=stats["mean"], kl_min=stats["min"], kl_max=stats["max"])
            if self.tcfg.kl_mode == "tdc":
                logs.update(self.tdc.scalars())
                self.tdc.update(stats)
        self.step += 1
        return {"loss": loss.item(), "recon": rec.item(), "psnr": _psnr(recon.detach(), x), **logs}

    def codec_step(self, x: torch.Tensor) -> dict:
        """Rate + lambda * distortion, each image at a rate level drawn at random (one model, every rate)."""
        from gqtok.training.codec import rate_distortion_loss

        level = torch.randint(len(self.lambdas), (x.shape[0],), device=self.device)
        recon, bits_y, bits_z = self.ddp(x, level)
        loss, bpp, mse = rate_distortion_loss(x, recon, bits_y + bits_z, self.lambdas[level])
        self.optimize(loss)
        self.step += 1
        psnr = (10 * torch.log10(1 / mse.detach().clamp_min(1e-12))).mean().item()
        pixels = x.shape[-2] * x.shape[-1]
        return {"loss": loss.item(), "recon": mse.mean().item(), "psnr": psnr, "lr": self.tcfg.lr_at(self.step - 1),
                "bpp": bpp.mean().item(), "side_bpp": (bits_z / pixels).mean().item()}

    def optimize(self, loss: torch.Tensor) -> None:
        """Backward, clip, the learning rate of this step, Adam, the EMA."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.tcfg.lr_at(self.step)
        self.opt.step()
        if self.ema is not None:
            # warm-up of the decay: at 0.999 from step 0, after 1,350 steps a quarter of the average would still be
            # the initial weights (0.999 ** 1350); (1 + t) / (10 + t) lets the early average follow the model
            decay = min(self.tcfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    if k in self.ema:
                        self.ema[k].mul_(decay).add_(v.float(), alpha=1 - decay)

    @torch.no_grad()
    def sample_grid(self) -> None:
        if self.rank != 0:
            return
        self.model.eval()
        if self.codec:  # the middle rate level, rounded as when coding
            level = torch.full((self.fixed.shape[0],), len(self.lambdas) // 2, device=self.device)
            recon = self.model(self.fixed, level, noise=False)[0]
        else:
            recon = self.model(self.fixed, sample=False)[0]
        self.model.train()
        _grid_png(self.fixed, recon, self.run_dir / "samples" / f"step_{self.step:07d}.png")

    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.tcfg
        start, last = time.monotonic(), {}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc="train")
        log = open(self.run_dir / "log.jsonl", "a") if self.rank == 0 else None
        self.model.train()
        while self.step < (min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps):
            last = self.train_step()
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                bar.set_postfix(_bar_fields(last))
                if log:
                    log.write(json.dumps({"step": self.step, "time_s": round(time.monotonic() - start, 1),
                                          "cpu_s": round(self.cpu_seconds(), 1), **last}) + "\n")
                    log.flush()
            if cfg.image_every and self.step % cfg.image_every == 0:
                self.sample_grid()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if self._should_stop(start):
                break
        bar.close()
        self.sample_grid()
        self.ranks = self._rank_agreement()
        self.save()
        if log:
            log.close()
        if self.distributed:
            # no rank tears its process group down while a peer is still writing or gathering: gloo aborts the
            # process ("terminate called without an active exception") when a peer's sockets close under it
            dist.barrier()
        return last

    @torch.no_grad()
    def _rank_agreement(self) -> list[dict]:
        """Every rank's TDC scalars and a weight checksum, gathered; recorded in config.json as a check."""
        mine = torch.tensor([*self.tdc.scalars().values(),
                             sum(p.double().sum().item() for p in self.model.parameters())],
                            dtype=torch.float64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world)]
        if self.distributed:
            dist.all_gather(everyone, mine)
        else:
            everyone = [mine]
        return [dict(zip(("lam", "lam_max", "lam_min", "weight_sum"), t.tolist())) for t in everyone]

    def _should_stop(self, start: float) -> bool:
        """Time limit reached or SIGTERM/SIGINT received; ranks agree, or the next all-reduce would hang."""
        limit = self.tcfg.time_limit_min
        stop = self.interrupted or bool(limit and time.monotonic() - start > 60 * limit)
        if not self.distributed:
            return stop
        flag = torch.tensor([float(stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _on_signal(self, signum, frame) -> None:
        if self.interrupted:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.interrupted = True  # finish this step, checkpoint, exit

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


def train(run_dir: Path, data, preset: str = "default", overrides: dict | None = None,
          resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run; returns the last step's metrics.

    data: a folder of photos, or a list of folders or 'DIR:WEIGHT' specs (each folder's share of the crops;
    held-out photos are skipped everywhere)."""
    run_dir = Path(run_dir)
    if resume:
        saved = json.loads((run_dir / "config.json").read_text())
        preset = saved["preset"]
        model_cfg = VAEConfig(**saved["model"])
        settings = {f.name for f in dataclasses.fields(TrainConfig)}  # a run saved before a setting existed takes it
        train_kw = {**saved["train"], **{k: v for k, v in (overrides or {}).items() if k in settings}}
        if set(overrides or {}) - settings:
            raise ValueError("only training settings can change on --resume, not the model's")
        train_cfg = TrainConfig(**train_kw)
    else:
        if (run_dir / "model.safetensors").exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
        model_cfg, train_cfg = build_configs(preset, overrides)
        if train_cfg.init_from:  # fine-tuning: the model is the source's, whatever the preset says
            source = load_weights(Path(train_cfg.init_from))[0]
            # ... except the codec's own settings: it takes a Gaussian VAE's network and adds its hyperprior
            own = CODEC_SETTINGS if model_cfg.quantizer == "uniform" else ()
            # a codec started from a codec may widen its latents (widened_state); from a Gaussian VAE it takes them
            if own and source.get("quantizer") == "uniform" and "latent_channels" in (overrides or {}):
                if overrides["latent_channels"] < source.get("latent_channels", 0):
                    raise ValueError(f"a codec can widen its latents, not narrow them ({source['latent_channels']} "
                                     f"in {train_cfg.init_from})")
                own = own + ("latent_channels",)
            own = own + tuple(k for k in OUTPUT_SETTINGS if k in (overrides or {}))
            if "norm" in (overrides or {}):  # asked for; otherwise the source's norms, whatever the preset says
                own = own + NORM_SETTINGS
            if source.get("downsample") != model_cfg.downsample:  # a coarser grid grown from a finer model
                own = own + GROW_SETTINGS
            changed = sorted(k for k in (overrides or {}) if k in source and k not in own)
            if changed:
                raise ValueError(f"--init-from takes the model of {train_cfg.init_from}; model settings cannot change "
                                 f"({', '.join(changed)})")
            model_cfg = VAEConfig(**{**source, **{k: getattr(model_cfg, k) for k in own}})
    trainer = Trainer(run_dir, data, model_cfg, train_cfg, preset, progress=progress)
    try:
        if resume:
            trainer.load()
        else:
            trainer.save()  # config.json exists from the first moment
        return trainer.fit()
    finally:
        trainer.close()
