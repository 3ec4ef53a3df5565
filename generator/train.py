"""Train the generator on token grids that the tokenizer service makes, over HTTP.

    gqtok generator train --tokenizer-url http://127.0.0.1:8000 --out runs/generator

It asks the server for the model's metadata and codebook, sends random crops of the training photos
to POST /v1/tokenize (and centre crops of the held-out photos, for validation), caches the token
grids in the run directory, trains, and writes config.json + model.safetensors. Validation loss is
reported in bits per token, to compare with log2 K (what a token costs with no model at all).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from gqtok.core.layout import grids_to_sequences
from gqtok.generator.model import ARTransformer, GeneratorConfig


@dataclass
class GeneratorTrainConfig:
    steps: int = 2000
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3  # AdamW peak; linear warm-up over the first 5% of steps, cosine decay after
    weight_decay: float = 0.01
    crops_per_photo: int = 8  # random crops (with random flips) of each training photo
    max_photos: int = 0  # training photos to use; 0 = all
    eval_every: int = 250  # steps between validation passes
    seed: int = 0


def random_crops(img: np.ndarray, size: tuple[int, int], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = size
    out = []
    for _ in range(n):
        top, left = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
        crop = img[top : top + h, left : left + w]
        out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return out


def tokenize_via_service(client, images: list[np.ndarray], batch: int = 8, progress: bool = True) -> np.ndarray:
    """Images -> [N, T, h, w] token grids, `batch` images per request (multipart)."""
    from tqdm import tqdm

    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    grids = [client.tokenize(c) for c in tqdm(chunks, desc="tokenizing via the service", disable=not progress,
                                              leave=False)]
    return np.concatenate(grids).astype(np.int64)


def collect(client, data_dir: Path, pixel_size: tuple[int, int], cfg: GeneratorTrainConfig,
            progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(training grids from random crops, validation grids from held-out centre crops)."""
    from gqtok.photos import center_crop, list_images, load_rgb, split_heldout

    train_paths, held_paths = split_heldout(list_images(data_dir))
    if cfg.max_photos:
        train_paths = train_paths[: cfg.max_photos]
    rng = np.random.default_rng(cfg.seed)
    crops = [c for p in train_paths for c in random_crops(load_rgb(p), pixel_size, cfg.crops_per_photo, rng)]
    val = [center_crop(load_rgb(p), pixel_size) for p in held_paths]
    return tokenize_via_service(client, crops, progress=progress), tokenize_via_service(client, val, progress=progress)


def bits_per_token(model: ARTransformer, seqs: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            x = seqs[i : i + batch]
            logits = model(x)
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1),
                                                       reduction="sum").item()
    model.train()
    return total / seqs.numel() / math.log(2)


def train_generator(out: Path, tokenizer_url: str, data_dir: Path, model_overrides: dict | None = None,
                    train_overrides: dict | None = None, api_key: str | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from gqtok.service.client import TokenizerClient

    cfg = GeneratorTrainConfig(**(train_overrides or {}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with TokenizerClient(tokenizer_url, api_key=api_key, timeout=300) as client:
        meta = client.model_info()
        codebook = client.codebook()
        model_cfg = GeneratorConfig(**({"vocab_size": meta["num_codes"], "tokens_per_position": meta["tokens_per_position"]}
                                       | (model_overrides or {})))
        if model_cfg.vocab_size != meta["num_codes"] or model_cfg.tokens_per_position != meta["tokens_per_position"]:
            raise ValueError("vocab_size and tokens_per_position come from the tokenizer; do not override them")
        f = meta["downsample"]
        pixel_size = (model_cfg.grid[0] * f, model_cfg.grid[1] * f)
        cache = out / "tokens.npz"
        key = {"tokenizer_model": meta["model_id"], "pixel_size": list(pixel_size), "crops_per_photo": cfg.crops_per_photo,
               "max_photos": cfg.max_photos, "seed": cfg.seed}
        cached = dict(np.load(cache)) if cache.exists() else {}
        if cached and json.loads(str(cached["key"])) == key:
            train_grids, val_grids = cached["train"], cached["val"]
        else:
            t0 = time.perf_counter()
            train_grids, val_grids = collect(client, Path(data_dir), pixel_size, cfg, progress)
            np.savez(cache, train=train_grids, val=val_grids, key=json.dumps(key))
            key["tokenize_s"] = round(time.perf_counter() - t0, 1)

    torch.manual_seed(cfg.seed)
    model = ARTransformer(model_cfg, codebook)
    train_seqs = torch.from_numpy(grids_to_sequences(train_grids))
    val_seqs = torch.from_numpy(grids_to_sequences(val_grids))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, cfg.steps - warm)))))
    rng = np.random.default_rng(cfg.seed)
    log = []
    bar = tqdm(range(cfg.steps), desc="generator", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        x = train_seqs[torch.from_numpy(rng.integers(0, len(train_seqs), cfg.batch_size))]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "train_bits_per_token": loss.item() / math.log(2),
                     "val_bits_per_token": bits_per_token(model, val_seqs), "seconds": round(time.perf_counter() - t0, 1)}
            log.append(entry)
            bar.set_postfix(val_bits=f"{entry['val_bits_per_token']:.3f}")
    summary = {
        "model": asdict(model_cfg), "train": asdict(cfg), "tokenizer": {"url": tokenizer_url, **key},
        "train_sequences": len(train_seqs), "val_sequences": len(val_seqs), "log2_k": math.log2(model_cfg.vocab_size),
        "val_bits_per_token": log[-1]["val_bits_per_token"] if log else None, "log": log,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_generator(out, model, summary)
    return summary


def save_generator(run: Path, model: ARTransformer, summary: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(run) / "model.safetensors"))
    (Path(run) / "config.json").write_text(json.dumps(summary, indent=1) + "\n")


def load_generator(run: Path) -> tuple[ARTransformer, dict]:
    from safetensors.torch import load_file

    run = Path(run)
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"no generator in {run} (train one with `gqtok generator train --out {run}`)")
    summary = json.loads((run / "config.json").read_text())
    known = {f.name for f in fields(GeneratorConfig)}
    cfg = GeneratorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["model"].items() if k in known})
    model = ARTransformer(cfg)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    model.eval()
    return model, summary
