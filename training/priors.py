"""Fit the entropy-coding priors of an exported model (gqtok/core/priors.py) on its own token grids.

    gqtok priors fit models/default --data data/endless-sky

tokenizes the training photos with the model's ONNX graphs (the tokens the service makes), counts
ids per slot (prior_frequency.npz), trains the causal context model (prior_context.npz), measures
both on the held-out photos, and adds the two files to the model's manifest.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gqtok.core.artifact import load_artifact
from gqtok.core.manifest import Manifest, file_sha256
from gqtok.core.priors import (PRIOR_FILES, ContextPrior, context_logits, context_param_shapes, latent_of,
                               neighbour_features, save_context, save_frequency)
from gqtok.core.select import codeword_features


@dataclass
class PriorConfig:
    hidden: int = 128  # MLP width of the context model
    steps: int = 3000  # optimizer steps
    batch_size: int = 256  # positions per step (each scores all K ids)
    lr: float = 2e-3  # AdamW, cosine decay to 0
    crop: tuple[int, int] = (512, 768)  # (H, W) centre crop of each photo before tokenizing
    max_photos: int = 0  # training photos to tokenize; 0 = all
    seed: int = 0


class ContextNet(nn.Module):
    """The context model of gqtok.core.priors in torch, for fitting: the same parameters (names, shapes, the
    [in, out] layout of prior_context.npz) and the same formula (core's context_logits with xp=torch)."""

    def __init__(self, channels: int, token_dim: int, codebook: np.ndarray, log_freq: np.ndarray, hidden: int):
        super().__init__()
        self.channels, self.token_dim = channels, token_dim
        t, k = log_freq.shape
        shapes = context_param_shapes(channels, t, k, hidden)
        self.w = nn.ParameterDict({name: nn.Parameter(torch.empty(shape)) for name, shape in shapes.items()})
        for i in (1, 2, 3):  # nn.Linear's default init: uniform(+-1/sqrt(fan_in)) for weights and biases
            bound = 1.0 / math.sqrt(shapes[f"w{i}"][0])
            nn.init.uniform_(self.w[f"w{i}"], -bound, bound)
            nn.init.uniform_(self.w[f"b{i}"], -bound, bound)
        with torch.no_grad():  # start wide (s = e^2) and flat: the model begins as the frequency prior
            nn.init.normal_(self.w["w3"], std=1e-3)
            self.w["b3"].zero_()
            self.w["b3"][channels:] = 2.0
            self.w["bias"].copy_(torch.as_tensor(log_freq, dtype=torch.float32))  # [T, K]
        code = codeword_features(torch.as_tensor(codebook, dtype=torch.float32), xp=torch)
        self.register_buffer("code_t", code.T.contiguous())  # [2d, K]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n, F] -> logits [n, T, K]."""
        return context_logits(features, self.w, self.code_t, self.channels, self.token_dim, xp=torch)

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().contiguous().numpy() for name, p in self.w.items()}


def tokenize_photos(tokenize, paths: list[Path], crop: tuple[int, int], progress: bool = True) -> np.ndarray:
    """Centre crops of the photos -> int64 [N, T, h, w] token grids, one photo per call of
    tokenize(uint8 [1, H, W, 3]) -> int [1, T, h, w]."""
    from tqdm import tqdm

    from gqtok.photos import center_crop, load_rgb

    grids = [tokenize(center_crop(load_rgb(p), crop)[None])[0]
             for p in tqdm(paths, desc="tokenizing", disable=not progress, leave=False)]
    return np.stack(grids)


def context_dataset(grids: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token grids -> (features [P, F], targets [P, T]) for every position: the decoder sees exactly these
    features, since every neighbour it reads is decoded before the position itself."""
    _, t, h, w = grids.shape
    rows, cols = np.indices((h, w)).reshape(2, -1)
    feats, targets = [], []
    for g in grids:
        latent = latent_of(codebook, g.reshape(t, -1).T).T.reshape(-1, h, w)
        feats.append(neighbour_features(latent, rows, cols))
        targets.append(g.reshape(t, -1).T)
    return np.concatenate(feats), np.concatenate(targets)


def bits_per_token(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean -log2 p(target) of [n, T, K] logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], axis=-1).mean() / math.log(2))


def _batched_bits(prior: ContextPrior, feats: np.ndarray, targets: np.ndarray, rows: int = 512) -> float:
    total = sum(bits_per_token(prior.logits(feats[i : i + rows]), targets[i : i + rows]) * len(feats[i : i + rows])
                for i in range(0, len(feats), rows))
    return total / len(feats)


def _frequency_bits(counts: np.ndarray, grids: np.ndarray) -> float:
    p = counts / counts.sum(axis=1, keepdims=True)
    t = grids.shape[1]
    return float(np.mean([-np.log2(p[s][grids[:, s].ravel()]).mean() for s in range(t)]))


def fit_priors(model_dir: Path, data_dir: Path, tokenize, config: PriorConfig | None = None,
               progress: bool = True) -> dict:
    """Fit both priors of the model in model_dir, write their files, list them in its manifest. Returns the figures.

    tokenize: uint8 [1, H, W, 3] -> int [1, T, h, w], the exported model's own tokens (what the service makes);
    the CLI passes the onnxruntime runtime's (gqtok.cli.fit_model_priors), so training never imports the service."""
    from tqdm import tqdm

    from gqtok.photos import list_images, split_heldout

    cfg = config or PriorConfig()
    artifact = load_artifact(model_dir)
    m = artifact.manifest
    train_paths, held_paths = split_heldout(list_images(data_dir))
    if cfg.max_photos:
        train_paths = train_paths[: cfg.max_photos]
    if not train_paths:
        raise FileNotFoundError(f"no training photos under {data_dir} (all are held out)")
    t0 = time.perf_counter()
    train_grids = tokenize_photos(tokenize, train_paths, cfg.crop, progress)
    held_grids = tokenize_photos(tokenize, held_paths, cfg.crop, progress) if held_paths else train_grids[:0]
    tokenize_s = time.perf_counter() - t0

    # Frequency prior: counts per slot, plus one so every id stays codable.
    counts = np.stack([np.bincount(train_grids[:, s].ravel(), minlength=m.num_codes)
                       for s in range(m.tokens_per_position)]) + 1

    # Context prior.
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    feats, targets = context_dataset(train_grids, artifact.codebook)
    log_freq = np.log(counts / counts.sum(axis=1, keepdims=True))
    net = ContextNet(m.latent_channels, m.token_dim, artifact.codebook, log_freq, cfg.hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    feats_t, targets_t = torch.from_numpy(feats), torch.from_numpy(targets.astype(np.int64))
    bar = tqdm(range(cfg.steps), desc="context prior", disable=not progress)
    ema = None
    t0 = time.perf_counter()
    for step in bar:
        idx = torch.from_numpy(rng.integers(0, len(feats), cfg.batch_size))
        logits = net(feats_t[idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_t[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bits = loss.item() / math.log(2)
        ema = bits if ema is None else 0.98 * ema + 0.02 * bits
        if step % 50 == 0:
            bar.set_postfix(bits_per_token=f"{ema:.3f}")
    train_s = time.perf_counter() - t0

    # Held-out bits per token, with the numpy priors exactly as the codec will run them.
    weights = net.weights()
    held = {"photos": len(held_grids), "crop": list(cfg.crop), "uniform": math.log2(m.num_codes)}
    if len(held_grids):
        held["frequency"] = _frequency_bits(counts, held_grids)
        hf, ht = context_dataset(held_grids, artifact.codebook)
        held["context"] = _batched_bits(ContextPrior(weights, artifact.codebook, m.token_dim, b""), hf, ht)
    info = {"config": asdict(cfg), "train_photos": len(train_grids), "train_positions": int(len(feats)),
            "final_train_bits_per_token_ema": ema, "tokenize_s": round(tokenize_s, 1), "train_s": round(train_s, 1),
            "heldout_bits_per_token": held}
    save_frequency(Path(model_dir) / PRIOR_FILES["frequency"], counts)
    save_context(Path(model_dir) / PRIOR_FILES["context"], weights, info)
    add_files_to_manifest(Path(model_dir), list(PRIOR_FILES.values()))
    return info


def add_files_to_manifest(model_dir: Path, names: list[str]) -> Manifest:
    """Record the sha256 of extra files of a model directory in its manifest (load_artifact checks them)."""
    manifest = Manifest.read(model_dir)
    manifest.files.update({n: file_sha256(model_dir / n) for n in names})
    manifest.write(model_dir)
    return manifest
