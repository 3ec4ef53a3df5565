"""Train the generator on token grids: pre-tokenized shards, or grids the tokenizer service makes over HTTP.

    gqtok tokenize data/photos --out tokens --size 128            # once (docs/pretokenize.md)
    gqtok generator train --tokens tokens --out runs/generator     # trains from the shards
    gqtok generator train --out runs/generator                     # or: tokenize random crops over HTTP first

Either way it asks the server for the model's metadata and codebook. With --tokens it checks that the shards
were made by the served model (id, version, codebook digest: gqtok.core.shards), takes the grid from them, and
validates on the rows of held-out photos (gqtok.photos.split_heldout; the last 5% of rows when none are).
Without, it sends random crops of the training photos to POST /v1/tokenize (and centre crops of the held-out
photos, for validation) and caches the grids in the run directory, keyed by the model's id, version and codebook
digest. It trains and writes config.json + model.safetensors. Validation loss is reported in bits per token, to
compare with log2 K (what a token costs with no model at all).
"""

from __future__ import annotations

import json
import os
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


def from_shards(tokens_dir: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(training grids, validation grids) from a token directory made by the served model."""
    from gqtok.core.shards import TokenShards, describe
    from gqtok.photos import split_heldout

    shards = TokenShards(tokens_dir)
    served = {"model_id": meta["model_id"], "model_version": meta["model_version"],
              "codebook_sha256": meta["codebook"]["sha256"], "model_digest": meta.get("model_digest")}
    made_by = shards.meta["model"]
    if made_by.get("model_digest") and served["model_digest"]:  # a re-export under the same id and version differs here
        same = made_by["model_digest"] == served["model_digest"]
    else:  # shards written before the model digest
        same = all(made_by[k] == served[k] for k in ("model_id", "model_version", "codebook_sha256"))
    if not same:
        raise ValueError(f"{tokens_dir} was tokenized by {describe(made_by)}, the server serves {describe(served)}: "
                         "tokenize the data again")
    grids = shards.grids().astype(np.int64)
    paths = [Path(shards.source(i)["path"]) for i in range(len(shards))]
    held = {str(p) for p in split_heldout(sorted(set(paths)))[1]}
    is_val = np.array([str(p) in held for p in paths], bool)
    if not is_val.any():
        is_val[-max(1, len(grids) // 20):] = True
    if is_val.all():
        raise ValueError(f"{tokens_dir} holds only held-out photos' rows: nothing to train on")
    return grids[~is_val], grids[is_val]


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
                    train_overrides: dict | None = None, api_key: str | None = None, progress: bool = True,
                    tokens_dir: Path | None = None, tokenizer_model: str | None = None) -> dict:
    from tqdm import tqdm

    from gqtok.service.client import TokenizerClient

    cfg = GeneratorTrainConfig(**(train_overrides or {}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # tokenizer_model: one of the server's models by name (None: its default); its id goes into the summary, and
    # the generator's own server decodes with it
    with TokenizerClient(tokenizer_url, api_key=api_key, model=tokenizer_model, timeout=300) as client:
        meta = client.model_info(tokenizer_model)
        codebook = client.codebook(tokenizer_model)
        from_tokenizer = {"vocab_size": meta["num_codes"], "tokens_per_position": meta["tokens_per_position"]}
        if tokens_dir is not None:
            train_grids, val_grids = from_shards(Path(tokens_dir), meta)
            from_tokenizer["grid"] = tuple(train_grids.shape[2:])
            if "grid" in (model_overrides or {}) and tuple(model_overrides["grid"]) != from_tokenizer["grid"]:
                raise ValueError(f"the shards hold {from_tokenizer['grid']} grids; --grid cannot change that")
        model_cfg = GeneratorConfig(**(from_tokenizer | (model_overrides or {})))
        if model_cfg.vocab_size != meta["num_codes"] or model_cfg.tokens_per_position != meta["tokens_per_position"]:
            raise ValueError("vocab_size and tokens_per_position come from the tokenizer; do not override them")
        f = meta["downsample"]
        pixel_size = (model_cfg.grid[0] * f, model_cfg.grid[1] * f)
        cache = out / "tokens.npz"
        made_by = {"tokenizer_model": meta["model_id"], "model_version": meta["model_version"],
                   "codebook_sha256": meta["codebook"]["sha256"],
                   "model_digest": meta.get("model_digest")}  # a re-exported model invalidates the cache
        if tokens_dir is not None:  # the grids came from the shards above
            key = made_by | {"tokens": str(tokens_dir)}
        else:
            key = made_by | {"pixel_size": list(pixel_size), "crops_per_photo": cfg.crops_per_photo,
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

    weights = Path(run) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    os.chmod(weights, 0o644)  # safetensors writes 0600: the generator container's user (uid 10001) must read it
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
