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
from gqtok.core.priors import (NEIGHBOURS, PRIOR_FILES, CircuitPrior, ContextPrior, cell_count, cell_index, context_heads, context_param_shapes,
                               context_tables, latent_of, neighbour_features, save_context, save_frequency)
from gqtok.core.select import codeword_features, token_features


@dataclass
class PriorConfig:
    hidden: int = 128  # MLP width of the context model
    steps: int = 10000  # optimizer steps
    batch_size: int = 1024  # positions per step (each scores its P cells and the M members of its cell)
    lr: float = 2e-3  # AdamW, cosine decay to 0
    crop: tuple[int, int] = (512, 768)  # (H, W) centre crop of each photo before tokenizing
    max_photos: int = 0  # training photos to tokenize; 0 = all
    seed: int = 0
    priors: tuple[str, ...] = ("frequency", "context", "pc")  # which to fit (the others' files are kept)
    pc_window: tuple[int, int] = (4, 4)  # the pc prior's window of grid positions (rows, columns)
    pc_hidden: int = 16  # its hidden states per variable
    pc_em_steps: int = 30  # its EM iterations
    pc_max_windows: int = 60000  # training windows it learns from (a random subset when there are more)


def partition_codebook(codebook: np.ndarray, cells: int) -> np.ndarray:
    """Split the codebook's ids into `cells` groups of equal size of nearby codewords: halve every group at the
    median of its widest coordinate until there are enough (a k-d tree's leaves). -> int [cells, K / cells]."""
    groups = [np.arange(len(codebook))]
    while len(groups) < cells:
        halves = []
        for g in groups:
            x = codebook[g]
            order = np.argsort(x[:, int(np.argmax(x.var(axis=0)))], kind="stable")
            halves += [g[order[: len(g) // 2]], g[order[len(g) // 2 :]]]
        groups = halves
    return np.stack([np.sort(g) for g in groups])


class ContextNet(nn.Module):
    """The context model of gqtok.core.priors in float (torch), for fitting: the same parameters (names, shapes,
    the [in, out] layout of prior_context.npz) and the same formula (core's context_heads with xp=torch);
    ContextPrior runs it in fixed point."""

    def __init__(self, channels: int, token_dim: int, codebook: np.ndarray, log_freq: np.ndarray, hidden: int,
                 cells: np.ndarray):
        super().__init__()
        self.channels, self.token_dim = channels, token_dim
        t, k = log_freq.shape
        num_cells = len(cells)
        shapes = context_param_shapes(channels, t, k, hidden, num_cells)
        self.w = nn.ParameterDict({name: nn.Parameter(torch.empty(shape)) for name, shape in shapes.items()})
        for name in ("w1", "w2", "w3", "w_cell"):  # nn.Linear's default init: uniform(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(shapes[name][0])
            nn.init.uniform_(self.w[name], -bound, bound)
            nn.init.uniform_(self.w["b" + name[1:]], -bound, bound)
        cell_of, index = cell_index(cells)
        with torch.no_grad():  # start wide (s = e^2) and flat: the model begins as the frequency prior
            nn.init.normal_(self.w["w3"], std=1e-3)
            nn.init.normal_(self.w["w_cell"], std=1e-3)
            self.w["b3"].zero_()
            self.w["b3"][channels:] = 2.0
            self.w["bias"].copy_(torch.as_tensor(log_freq, dtype=torch.float32))  # [T, K]
            cell_freq = np.logaddexp.reduce(log_freq[:, cells], axis=2)  # [T, P]
            self.w["b_cell"].copy_(torch.as_tensor(cell_freq.reshape(-1), dtype=torch.float32))
        code = codeword_features(torch.as_tensor(codebook, dtype=torch.float32), xp=torch)  # [K, 2d]
        self.register_buffer("cells", torch.as_tensor(cells))
        self.register_buffer("cell_of", torch.as_tensor(cell_of))
        self.register_buffer("index_in_cell", torch.as_tensor(index))
        self.register_buffer("member_features", code[torch.as_tensor(cells)].contiguous())  # [P, M, 2d]

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, F] features, int [n, T] targets -> (cell logits [n * T, P], member logits [n * T, M]) for the
        targets' cells; cross-entropy against cell_of and index_in_cell of the targets is the code length."""
        mean, log_s, cell_logits = context_heads(features, self.w, self.channels, self.token_dim, xp=torch)
        target = targets.reshape(-1)
        cells = self.cell_of[target]
        slots = torch.arange(len(target)) % targets.shape[1]
        # 0.5 * [-1/s^2, 2m/s^2] . [c^2, c] = log N(c; m, s^2) + terms without c (ContextPrior's [-A, 2 A m])
        coef = 0.5 * token_features(mean, 2.0 * log_s, beta=0.0, xp=torch)
        gauss = torch.bmm(self.member_features[cells], coef[:, :, None])[:, :, 0]
        return cell_logits, gauss + self.w["bias"][slots[:, None], self.cells[cells]]

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean nats per token."""
        cell_logits, member_logits = self(features, targets)
        target = targets.reshape(-1)
        return (nn.functional.cross_entropy(cell_logits, self.cell_of[target])
                + nn.functional.cross_entropy(member_logits, self.index_in_cell[target]))

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


def context_bits(prior: ContextPrior, grids: np.ndarray) -> float:
    """Mean bits per token of [N, T, h, w] grids under the fixed-point prior, exactly as the coder computes it."""
    return sum(prior.code_lengths(g).sum() for g in grids) / grids.size


def _frequency_bits(counts: np.ndarray, grids: np.ndarray) -> float:
    p = counts / counts.sum(axis=1, keepdims=True)
    t = grids.shape[1]
    return float(np.mean([-np.log2(p[s][grids[:, s].ravel()]).mean() for s in range(t)]))


def fit_priors(model_dir: Path, data_dir: Path, tokenize, config: PriorConfig | None = None,
               progress: bool = True) -> dict:
    """Fit both priors of the model in model_dir, write their files, list them in its manifest. Returns the figures.

    tokenize: uint8 [1, H, W, 3] -> int [1, T, h, w], the exported model's own tokens (what the service makes);
    the CLI passes the onnxruntime runtime's (gqtok.cli.fit_model_priors), so training never imports the service."""
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

    unknown = set(cfg.priors) - set(PRIOR_FILES)
    if unknown:
        raise ValueError(f"unknown priors {sorted(unknown)}: choose from {', '.join(PRIOR_FILES)}")
    base = {"config": asdict(cfg), "train_photos": len(train_grids), "tokenize_s": round(tokenize_s, 1)}
    held = {"photos": len(held_grids), "crop": list(cfg.crop), "uniform": math.log2(m.num_codes)}
    cells = partition_codebook(artifact.codebook, cell_count(m.num_codes))
    info = {}
    if "frequency" in cfg.priors or "context" in cfg.priors:
        # Frequency prior: counts per slot, plus one so every id stays codable.
        counts = np.stack([np.bincount(train_grids[:, s].ravel(), minlength=m.num_codes)
                           for s in range(m.tokens_per_position)]) + 1
        weights, fit = fit_context(train_grids, artifact.codebook, cells, m.token_dim, counts, cfg, progress)
        # Held-out bits per token, with the fixed-point prior exactly as the codec runs it.
        if len(held_grids):
            held["frequency"] = _frequency_bits(counts, held_grids)
            held["context"] = context_bits(context_prior(weights, cells, artifact.codebook, m.token_dim), held_grids)
        info = base | fit | {"heldout_bits_per_token": dict(held)}
        save_frequency(Path(model_dir) / PRIOR_FILES["frequency"], counts)
        save_context(Path(model_dir) / PRIOR_FILES["context"], weights, cells, info)
    if "pc" in cfg.priors:
        pc_info = base | fit_pc(Path(model_dir) / PRIOR_FILES["pc"], train_grids, held_grids, artifact.codebook, cfg, progress)
        held["pc"] = pc_info["heldout_bits_per_token"]["pc"]
        info = info | {"pc": pc_info, "heldout_bits_per_token": held}
    add_files_to_manifest(Path(model_dir), [PRIOR_FILES[p] for p in cfg.priors])
    return info


def grid_windows(prior_shape: CircuitPrior, grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, T, h, w] grids -> (variables [n, D], present [n, D]) of all their windows."""
    parts = [prior_shape.to_variables(g) for g in grids]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def sign_order(codebook: np.ndarray) -> np.ndarray:
    """The codebook's ids sorted by their codewords' sign patterns (the first coordinate most significant), ties
    by id. A token's rank in this order, written in base-16 digits, says the signs of its coordinates, four per
    digit: the same meaning in every token, so that neighbouring tokens' digits agree where their latents do.
    (GQ's codebook has one codeword per orthant at K = 2^d, so there the rank is the sign pattern itself.)"""
    signs = np.asarray(codebook) > 0
    return np.lexsort((np.arange(len(codebook)),) + tuple(signs[:, j] for j in reversed(range(signs.shape[1]))))


def fit_pc(path: Path, train_grids: np.ndarray, held_grids: np.ndarray, codebook: np.ndarray, cfg: PriorConfig,
           progress: bool = True) -> dict:
    """Learn the pc prior (an HCLT over windows of cfg.pc_window positions) on the training grids' complete
    windows, write it to path, and measure it on the held-out grids -> figures of the fit."""
    from gqtok.core.circuit import HCLT, save_circuit
    from gqtok.training.circuit import CircuitConfig, learn_hclt

    t = train_grids.shape[1]
    order = sign_order(codebook)
    base = CircuitPrior.base
    digits = max(1, int(np.ceil(np.log2(len(codebook)) / np.log2(base))))
    d = digits * t * cfg.pc_window[0] * cfg.pc_window[1]
    blank = HCLT(np.r_[-1, np.zeros(d - 1, dtype=np.int64)], np.ones(1), np.ones((d, 1, 1)), np.ones((d, 1, base)))
    shape = CircuitPrior(blank, order, cfg.pc_window, t, b"")
    x, present = grid_windows(shape, train_grids)
    x = x[present.all(axis=1)]
    rng = np.random.default_rng(cfg.seed)
    if len(x) > cfg.pc_max_windows:
        x = x[rng.choice(len(x), cfg.pc_max_windows, replace=False)]
    circuit, fit = learn_hclt(x, base, CircuitConfig(hidden=cfg.pc_hidden, em_steps=cfg.pc_em_steps,
                                                     seed=cfg.seed), progress=progress)
    prior = CircuitPrior(circuit, order, cfg.pc_window, t, b"")
    fit["window"] = list(cfg.pc_window)
    if len(held_grids):
        fit["heldout_bits_per_token"] = {"pc": float(np.mean(np.concatenate([prior.code_lengths(g) for g in held_grids])))}
    save_circuit(path, circuit, fit, order=order, window=np.asarray(cfg.pc_window, dtype=np.int64))
    return fit


def context_prior(weights: dict, cells: np.ndarray, codebook: np.ndarray, token_dim: int) -> ContextPrior:
    """The fixed-point prior that save_context's file of these weights loads as."""
    return ContextPrior(weights | {"cells": cells} | context_tables(), codebook, token_dim, b"")


def fit_context(grids: np.ndarray, codebook: np.ndarray, cells: np.ndarray, token_dim: int, counts: np.ndarray,
                cfg: PriorConfig, progress: bool = True) -> tuple[dict, dict]:
    """Train the context model on [N, T, h, w] token grids -> (float weights, figures of the fit)."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    feats, targets = context_dataset(grids, codebook)
    log_freq = np.log(counts / counts.sum(axis=1, keepdims=True))
    net = ContextNet(feats.shape[1] // len(NEIGHBOURS) - 1, token_dim, codebook, log_freq, cfg.hidden, cells)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    feats_t, targets_t = torch.from_numpy(feats), torch.from_numpy(targets.astype(np.int64))
    bar = tqdm(range(cfg.steps), desc="context prior", disable=not progress)
    ema = None
    t0 = time.perf_counter()
    for step in bar:
        idx = torch.from_numpy(rng.integers(0, len(feats), cfg.batch_size))
        loss = net.loss(feats_t[idx], targets_t[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bits = loss.item() / math.log(2)
        ema = bits if ema is None else 0.98 * ema + 0.02 * bits
        if step % 50 == 0:
            bar.set_postfix(bits_per_token=f"{ema:.3f}")
    fit = {"train_positions": int(len(feats)), "cells": list(cells.shape), "final_train_bits_per_token_ema": ema,
           "train_s": round(time.perf_counter() - t0, 1)}
    return net.weights(), fit


def add_files_to_manifest(model_dir: Path, names: list[str]) -> Manifest:
    """Record the sha256 of extra files of a model directory in its manifest (load_artifact checks them)."""
    manifest = Manifest.read(model_dir)
    manifest.files.update({n: file_sha256(model_dir / n) for n in names})
    manifest.write(model_dir)
    return manifest
