"""Photos: fetching the default set, the fixed held-out list, and random-crop batches.

Default set: the 273 landscape/city/industry photos of Debian's
`endless-sky-high-dpi` package (1440x720 JPEG). We `apt-get download` the
.deb and unpack it with `dpkg-deb -x` (never install it: it pulls in the game).
Licences: public domain (morguefile) except files whose names start with
bwerner, myrabella, dmottl or mfield or contain -sfiera, -harro, -striker,
-iridium or -spfld, which are CC-BY-SA; `fetch_default_photos` writes this
into the data folder's SOURCE.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from PIL import Image

from gqtok.photos import center_crop, list_images, load_rgb, split_heldout, to_grey

DEFAULT_DATA_DIR = Path("data/endless-sky")
PACKAGES = {  # variant -> (Debian package, folder of photos inside it)
    "high-dpi": ("endless-sky-high-dpi", "usr/share/games/endless-sky/plugins/endless-sky-high-dpi/images/land"),
    "small": ("endless-sky-data", "usr/share/games/endless-sky/images/land"),
}
CC_BY_SA_MARKERS = ("bwerner", "myrabella", "dmottl", "mfield", "-sfiera", "-harro", "-striker", "-iridium", "-spfld")



def is_cc_by_sa(name: str) -> bool:
    return any(m in name for m in CC_BY_SA_MARKERS)


def fetch_default_photos(dest: Path = DEFAULT_DATA_DIR, variant: str = "high-dpi", force: bool = False) -> Path:
    """Download and unpack the default photo set into `dest`; returns `dest`. Idempotent."""
    package, inner = PACKAGES[variant]
    dest = Path(dest)
    marker = dest / "SOURCE.json"
    if marker.exists() and not force and json.loads(marker.read_text()).get("package") == package:
        return dest
    from gqtok.training.sources import download

    with tempfile.TemporaryDirectory() as tmp:
        deb = download(package, Path(tmp))  # a fresh machine has no package lists: it runs apt-get update first
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        photos = sorted((Path(tmp) / "x" / inner).glob("*.jpg"))
        dest.mkdir(parents=True, exist_ok=True)
        for p in photos:
            shutil.copyfile(p, dest / p.name.replace("@2x", ""))
        version = deb.name.split("_")[1]
    names = sorted(p.name.replace("@2x", "") for p in photos)
    cc = [n for n in names if is_cc_by_sa(n)]
    (dest / "SOURCE.md").write_text(
        f"# Photos from Debian package {package} {version}\n\n"
        f"{len(names)} photos. Public domain (morguefile), except these {len(cc)}, which are CC-BY-SA "
        f"(see the package's copyright file):\n\n" + "\n".join(f"- {n}" for n in cc) + "\n"
    )
    marker.write_text(json.dumps({"package": package, "version": version, "count": len(names)}, indent=1))
    return dest


def to_model_input(batch_u8: np.ndarray):
    """uint8 [B, H, W, 3] -> float32 torch [B, 3, H, W] in [-1, 1] (the models' input range)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(batch_u8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x) -> np.ndarray:
    """float torch [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded, clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def parse_source(spec: str | Path) -> tuple[Path, float]:
    """'DIR' or 'DIR:WEIGHT' (a folder of photos and its share of the training batches) -> (folder, weight)."""
    text = str(spec)
    folder, sep, weight = text.rpartition(":")
    if sep and folder and weight.replace(".", "", 1).isdigit():
        if float(weight) <= 0:
            raise ValueError(f"the weight of {folder} must be positive, got {weight}")
        return Path(folder), float(weight)
    return Path(text), 1.0


def training_photos(sources) -> tuple[list[Path], np.ndarray | None]:
    """Folders (or 'DIR:WEIGHT' specs) -> (training photos, per-photo sampling probabilities or None for uniform).

    A folder's weight is its share of the crops, whatever its number of photos: two folders at weight 1 each give
    half the crops, even if one has 10 photos and the other 300. One folder: uniform, as before."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    parsed = [s if isinstance(s, tuple) else parse_source(s) for s in sources]
    paths, probs = [], []
    for folder, weight in parsed:
        train, _ = split_heldout(list_images(folder))
        if not train:
            raise FileNotFoundError(f"no training photos under {folder} (all are held out)")
        paths += train
        probs += [weight / len(train)] * len(train)
    if len(parsed) == 1:
        return paths, None
    p = np.asarray(probs)
    return paths, p / p.sum()


class RandomCrops:
    """All training photos decoded once into memory; batches of random crops with random horizontal flips.

    paths:      photos to train on (at least one side >= crop)
    crop:       square crop size in pixels
    seed:       numpy seed for crop positions and flips (give each data-parallel rank its own)
    weights:    per-photo sampling probabilities (training_photos), None for uniform
    window_max: random resized crops: each crop is a square window of side crop * U(1, window_max) (capped by
                the photo), resized to crop (bicubic); the high-resolution photos then give views at several
                scales. 1 (the default) cuts plain crops, with no resampling.
    grey_prob:  each crop made grey (its luma, ITU-R BT.601, in all three channels) with this probability
    dark_prob:  each crop darkened (times U(0.15, 0.6)) with this probability: low light
    """

    def __init__(self, paths: list[Path], crop: int, seed: int = 0, progress: bool = False,
                 weights: np.ndarray | None = None, window_max: float = 1.0, grey_prob: float = 0.0,
                 dark_prob: float = 0.0):
        from tqdm import tqdm

        self.crop, self.weights, self.window_max = crop, weights, float(window_max)
        self.grey_prob, self.dark_prob = grey_prob, dark_prob
        if self.window_max < 1:
            raise ValueError(f"window_max must be at least 1, got {window_max}")
        self.images = []
        for p in tqdm(paths, desc="loading photos", disable=not progress, leave=False):
            img = load_rgb(p)
            if min(img.shape[:2]) < crop:
                img = center_crop(img, (max(crop, img.shape[0]), max(crop, img.shape[1])))
            self.images.append(img)
        if not self.images:
            raise ValueError("no training photos")
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, batch_size: int) -> np.ndarray:
        out = np.empty((batch_size, self.crop, self.crop, 3), dtype=np.uint8)
        if self.weights is None:
            picks = self.rng.integers(0, len(self.images), batch_size)
        else:
            picks = self.rng.choice(len(self.images), size=batch_size, p=self.weights)
        for i, k in enumerate(picks):
            img = self.images[k]
            side = self.crop
            if self.window_max > 1:
                side = min(int(round(self.crop * self.rng.uniform(1.0, self.window_max))), *img.shape[:2])
            top = self.rng.integers(0, img.shape[0] - side + 1)
            left = self.rng.integers(0, img.shape[1] - side + 1)
            patch = img[top : top + side, left : left + side]
            if side != self.crop:
                patch = np.asarray(Image.fromarray(patch).resize((self.crop, self.crop), Image.BICUBIC))
            out[i] = patch[:, ::-1] if self.rng.random() < 0.5 else patch
            if self.grey_prob and self.rng.random() < self.grey_prob:
                out[i] = to_grey(out[i])
            if self.dark_prob and self.rng.random() < self.dark_prob:
                out[i] = np.rint(out[i] * self.rng.uniform(0.15, 0.6)).astype(np.uint8)
        return out
