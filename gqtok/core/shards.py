"""Reading token shards written by `gqtok tokenize` (gqtok.bulk): numpy only, memory-mapped.

    shards = TokenShards("tokens/")            # meta.json + shard-*.npy, checked against each other
    len(shards), shards.grid                   # rows, (t, h, w) of every row
    seq = shards[i]                            # int64 [t * h * w]: row i as a sequence in SEQUENCE_ORDER
    grids = shards.grids(i, j)                 # rows i..j-1 as [n, t, h, w] (the shards' own dtype)
    shards.source(i)                           # the index entry of row i: path, view, original size
    shards.check_model(manifest)               # ValueError unless made by this model (its digest)

A TokenShards is a map-style dataset (len and getitem), so torch's DataLoader takes it as it is.

Layout of a token directory: meta.json (model, codebook digest, grid, dtype, token order, preprocessing,
counts, and the shards with their rows), shard-NNNNN.npy ([rows, t, h, w], uint16 when K <= 65536, else int32),
shard-NNNNN.jsonl (one line per input file of the shard: path, status, rows, original size, error) and
index.jsonl (all of them, in order).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path

import numpy as np

from gqtok.core.layout import SEQUENCE_ORDER, grids_to_sequences

META = "meta.json"
INDEX = "index.jsonl"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def made_by(manifest) -> dict:
    """What a token directory records of the model that made it (meta.json's and job.json's "model")."""
    return {"model_id": manifest.model_id, "model_version": manifest.model_version,
            "codebook_sha256": manifest.codebook.sha256, "model_digest": manifest.model_digest}


def describe(model: dict) -> str:
    """'ID VERSION (model digest ABC...)' of a made_by record; older records without a digest name the codebook."""
    digest = model.get("model_digest")
    return (f"{model['model_id']} {model['model_version']} "
            + (f"(model digest {digest[:12]})" if digest else f"(codebook {model['codebook_sha256'][:12]})"))


def same_model(theirs: dict, manifest) -> bool:
    """Were tokens recorded as made_by `theirs` made by `manifest`'s model? By the model digest where the record
    has one; records written before it are compared by id, version and codebook."""
    ours = made_by(manifest)
    if theirs.get("model_digest"):
        return theirs["model_digest"] == ours["model_digest"]
    return all(theirs[k] == ours[k] for k in ("model_id", "model_version", "codebook_sha256"))


def token_dtype(num_codes: int) -> np.dtype:
    return np.dtype(np.uint16 if num_codes <= 2**16 else np.int32)


class TokenShards:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory} has no {META}: not a finished token directory "
                                    "(gqtok tokenize writes it last)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("token_order") != SEQUENCE_ORDER:
            raise ValueError(f"{meta_path}: token order {self.meta.get('token_order')!r} is not {SEQUENCE_ORDER!r}")
        self.grid = tuple(self.meta["grid"])
        self.arrays, self.starts, total = [], [], 0
        for shard in self.meta["shards"]:
            arr = np.load(self.directory / f"{shard['name']}.npy", mmap_mode="r")
            if arr.shape[0] != shard["rows"] or (arr.shape[0] and tuple(arr.shape[1:]) != self.grid):
                raise ValueError(f"{shard['name']}.npy holds {arr.shape}, meta.json says {shard['rows']} rows of "
                                 f"{self.grid}")
            self.arrays.append(arr)
            self.starts.append(total)
            total += shard["rows"]
        self.rows = total
        self._sources: list[dict] | None = None

    def __len__(self) -> int:
        return self.rows

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self.rows <= i < self.rows:
            raise IndexError(f"row {i} of {self.rows}")
        i %= self.rows
        s = bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def __getitem__(self, i: int) -> np.ndarray:
        s, r = self._locate(int(i))
        return grids_to_sequences(np.asarray(self.arrays[s][r:r + 1], dtype=np.int64))[0]

    def grids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop-1 as one [n, t, h, w] array (read from the memory maps)."""
        stop = self.rows if stop is None else min(stop, self.rows)
        parts = []
        for arr, first in zip(self.arrays, self.starts):
            lo, hi = max(start, first), min(stop, first + len(arr))
            if lo < hi:
                parts.append(np.asarray(arr[lo - first:hi - first]))
        return np.concatenate(parts) if parts else np.zeros((0, *self.grid), token_dtype(self.meta["num_codes"]))

    def source(self, i: int) -> dict:
        """Where row i came from: its index entry (path, original size, ...) and which of its views it is."""
        if self._sources is None:
            self._sources = []
            for line in (self.directory / INDEX).read_text().splitlines():
                entry = json.loads(line)
                self._sources += [entry | {"view": v} for v in range(entry.get("rows", 0))]
        self._locate(int(i))  # bounds
        return self._sources[int(i) % self.rows]

    def check_model(self, manifest) -> None:
        """ValueError unless these tokens were made by `manifest`'s model (same_model), naming both."""
        if not same_model(self.meta["model"], manifest):
            raise ValueError(f"{self.directory} was tokenized by {describe(self.meta['model'])}, not by "
                             f"{describe(made_by(manifest))}: tokenize the data again with this model")
