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

from gqtok.photos import center_crop, load_rgb

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
    with tempfile.TemporaryDirectory() as tmp:
        if subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True).returncode != 0:
            # A fresh machine has no package lists yet.
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"apt-get download {package} failed: {proc.stderr.strip()}")
        deb = next(Path(tmp).glob(f"{package}_*.deb"))
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


class RandomCrops:
    """All training photos decoded once into memory; batches of random crops with random horizontal flips.

    paths: photos to train on (at least one side >= crop)
    crop:  square crop size in pixels
    seed:  numpy seed for crop positions and flips (give each data-parallel rank its own)
    """

    def __init__(self, paths: list[Path], crop: int, seed: int = 0, progress: bool = False):
        from tqdm import tqdm

        self.crop = crop
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
        for i, k in enumerate(self.rng.integers(0, len(self.images), batch_size)):
            img = self.images[k]
            top = self.rng.integers(0, img.shape[0] - self.crop + 1)
            left = self.rng.integers(0, img.shape[1] - self.crop + 1)
            patch = img[top : top + self.crop, left : left + self.crop]
            out[i] = patch[:, ::-1] if self.rng.random() < 0.5 else patch
        return out
