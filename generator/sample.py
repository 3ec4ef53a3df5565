"""Sampling token grids from a trained generator, and turning them into one PNG grid through the tokenizer.

    model, summary = load_generator("runs/generator")
    grids = sample_grids(model, 16, temperature=1.0, top_k=200, seed=0)     # [16, T, h, w]
    png = grid_png(client.detokenize(grids))                                # via the tokenizer service
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch
from PIL import Image

from gqtok.core.layout import sequences_to_grids
from gqtok.generator.model import ARTransformer


def sample_grids(model: ARTransformer, n: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, use_cache: bool = True) -> np.ndarray:
    seqs = model.generate(n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache)
    return sequences_to_grids(seqs.numpy(), model.cfg.tokens_per_position, model.cfg.grid)


def grid_png(images: list[Image.Image], gap: int = 2) -> bytes:
    """Images of one size -> one PNG, as square a grid as they make, `gap` white pixels between them."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def sampling_speed(model: ARTransformer, n: int = 4, use_cache: bool = True, repeats: int = 1) -> dict:
    """Tokens per second of generate(), median of `repeats` runs (torch's current thread count)."""
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        model.generate(n, seed=r, use_cache=use_cache)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {"use_cache": use_cache, "batch": n, "tokens": n * model.cfg.seq_len, "seconds": seconds,
            "tokens_per_s": n * model.cfg.seq_len / seconds, "threads": torch.get_num_threads()}
