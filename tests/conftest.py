"""Shared fixtures: the real default photos (fetched once), and a small subset of them for fast runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The default photo set (gqtok data fetch), in the repo's data/ folder or $GQTOK_DATA."""
    from gqtok.training.data import fetch_default_photos

    # absolute: some tests hand the path to processes running in other folders
    return fetch_default_photos(Path(os.environ.get("GQTOK_DATA", REPO / "data" / "endless-sky")).resolve())


@pytest.fixture(scope="session")
def small_photos(photos_dir, tmp_path_factory) -> Path:
    """12 training photos and 3 held-out photos (symlinks): enough for a real run in seconds."""
    from gqtok.photos import HELDOUT, list_images, split_heldout

    train, held = split_heldout(list_images(photos_dir))
    out = tmp_path_factory.mktemp("photos")
    for p in train[::20][:12] + [h for h in held if h.stem in HELDOUT[:3]]:
        (out / p.name).symlink_to(p.resolve())
    return out


@pytest.fixture(scope="session")
def tiny_run(small_photos, tmp_path_factory) -> Path:
    """A real tiny model trained by our code (80 steps) and evaluated on the held-out photos."""
    from gqtok.training.evaluate import evaluate
    from gqtok.training.train import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(run, small_photos, preset="tiny", overrides={"steps": 80, "image_every": 0}, progress=False)
    evaluate(run, small_photos, json_out=run / "eval.json", size=(192, 256), progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_model_reexport(tiny_run, tiny_model, small_photos, tmp_path_factory) -> Path:
    """The re-export scenario: the tiny run trained a few steps more, exported under the same id and version as
    tiny_model, with the same codebook: only the networks differ (and so the model digest)."""
    import shutil

    from gqtok.export.exporter import export_run
    from gqtok.training.train import train

    run = tmp_path_factory.mktemp("runs") / "tiny-more"
    shutil.copytree(tiny_run, run)
    train(run, small_photos, overrides={"steps": 84}, resume=True, progress=False)
    out = tmp_path_factory.mktemp("models") / "tiny"
    from gqtok.core.manifest import Manifest

    export_run(run, out, model_id="tiny", model_version=Manifest.read(tiny_model).model_version)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run, small_photos, tmp_path_factory) -> Path:
    """The tiny run exported to ONNX, with its entropy-coding priors fitted: a model directory the service loads."""
    from gqtok.export.exporter import export_run
    from gqtok.cli import fit_model_priors
    from gqtok.training.priors import PriorConfig

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_run(tiny_run, out, model_id="tiny")
    fit_model_priors(out, small_photos, PriorConfig(steps=100, crop=(128, 192)), progress=False)
    return out


def wait_until_ready(url: str, timeout: float = 60.0, alive=lambda: None) -> None:
    """Poll url/health/ready until 200; `alive()` may raise to stop early (a server process that died)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        try:
            if httpx.get(f"{url}/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {url} did not become ready in {timeout:g} s")


# Process settings that must not change a token id or a compressed byte (issue 19): OpenBLAS kernels and thread
# counts, and numpy's SIMD paths switched off.
PORTABILITY_ENVS = ({}, {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}, {"OPENBLAS_NUM_THREADS": "2"},
                    {"OPENBLAS_CORETYPE": "Prescott"}, {"OPENBLAS_CORETYPE": "Sandybridge"},
                    {"NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512_SKX AVX512_ICL AVX2 FMA3"})


def run_under_each_env(script: Path, *args, timeout: float = 300) -> list[list[str]]:
    """Run `python script args` once per PORTABILITY_ENVS entry (the caller's own BLAS/numpy settings removed)
    -> each run's stdout, split into words."""
    outputs = []
    for extra in PORTABILITY_ENVS:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS", "OMP", "NPY_"))} | extra
        run = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                             text=True, timeout=timeout)
        assert run.returncode == 0, (extra, run.stderr[-2000:])
        outputs.append(run.stdout.split())
    return outputs


class LiveServer:
    """A real `gqtok serve` process (uvicorn) on a free loopback port; `command` runs another server subcommand
    (e.g. ["generator", "serve", RUN]) on that port instead."""

    def __init__(self, model_dirs, *flags, env=None, command=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if command:
            cmd = [sys.executable, "-m", "gqtok.cli", *command, "--port", str(self.port), *flags]
        else:
            cmd = [sys.executable, "-m", "gqtok.cli", "serve", "--port", str(self.port), "--log-level", "warning", *flags]
        for d in model_dirs:
            cmd += ["--model", str(d)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        def alive():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")

        try:
            wait_until_ready(self.url, timeout, alive)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> str:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read() if self.proc.stdout else ""

@pytest.fixture(scope="session")
def tiny_codec(tiny_run, small_photos, tmp_path_factory) -> Path:
    """A real tiny discretized-VAE codec run: the tiny run's network fine-tuned (30 steps) at three lambdas."""
    from gqtok.training.train import train

    run = tmp_path_factory.mktemp("codec") / "codec"
    train(run, small_photos, preset="tiny", progress=False,
          overrides={"quantizer": "uniform", "rate_lambdas": (0.002, 0.02, 0.2), "init_from": str(tiny_run),
                     "steps": 30, "image_every": 0})
    return run


@pytest.fixture(scope="session")
def tiny_codec_model(tiny_codec, tmp_path_factory) -> Path:
    """The tiny codec exported (id "tiny-codec"): a codec model directory the service and the CLI load."""
    from gqtok.export.exporter import export_run

    out = tmp_path_factory.mktemp("models") / "tiny-codec"
    export_run(tiny_codec, out, model_id="tiny-codec")
    return out


@pytest.fixture(scope="session")
def start_server():
    """Factory: start_server(model_dirs, *flags) -> LiveServer, stopped at the end of the session."""
    servers = []

    def start(model_dirs, *flags, env=None):
        server = LiveServer(model_dirs, *flags, env=env)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def live_server(tiny_model, start_server) -> str:
    """Base URL of a real uvicorn serving the tiny model (id "tiny") with default settings."""
    return start_server([tiny_model]).url


def tool(name: str) -> str:
    """A console tool of the dev extra: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def compose(*args: str, file: Path = COMPOSE, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Docker Compose on a clean environment (no GQTOK_* or .env from the developer's shell)."""
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([tool("docker-compose"), "--env-file", os.devnull, "-f", str(file), *args],
                          capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KillUnderLoad:
    """Clients tokenizing `images` through `url` in a loop, with the gqtok client's retries, while `kill()` takes
    one replica away: every request's outcome, how many extra attempts the clients made, and the latency around
    the kill. Used against compose's balancer (test_images) and Ray Serve (test_ray_serve)."""

    def __init__(self, url: str, images: list[bytes], kill, senders: int = 4, before_s: float = 4.0,
                 after_s: float = 6.0, at_kill=lambda: None):
        import threading
        import time

        from gqtok.service.client import TokenizerClient

        self.results: list[tuple[float, float, str]] = []  # (start, seconds, "ok" or the error)
        self.attempts: list[int] = []  # every request the clients sent, retries included
        stop = threading.Event()

        def load():
            with TokenizerClient(url, retries=8, backoff=0.1) as client:
                client._http.event_hooks["request"] = [lambda r: self.attempts.append(1)]
                i = 0
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        client.tokenize(images[i % len(images)])
                        outcome = "ok"
                    except Exception as e:  # every failure counts as lost
                        outcome = repr(e)
                    self.results.append((t0, time.monotonic() - t0, outcome))
                    i += 1

        threads = [threading.Thread(target=load) for _ in range(senders)]
        for t in threads:
            t.start()
        time.sleep(before_s)
        at_kill()
        self.killed_at = time.monotonic()
        kill()
        time.sleep(after_s)
        stop.set()
        for t in threads:
            t.join(120)

    @property
    def lost(self) -> list:
        return [r for r in self.results if r[2] != "ok"]

    @property
    def retried(self) -> int:
        return len(self.attempts) - len(self.results)

    def summary(self) -> str:
        import numpy as np

        around = sorted(s for t0, s, _ in self.results if self.killed_at - 1 <= t0 <= self.killed_at + 3)
        p99 = around[min(len(around) - 1, int(0.99 * len(around)))] if around else float("nan")
        median = np.median([s for _, s, _ in self.results])
        return (f"{len(self.results)} requests, {len(self.lost)} lost, {self.retried} sent again by the client, "
                f"p99 of those started 1 s before to 3 s after the kill {p99 * 1000:.0f} ms ({len(around)} "
                f"requests), median of all {median * 1000:.0f} ms")

    def check(self) -> None:
        assert not self.lost, self.lost[:5]
        after = sum(1 for t0, *_ in self.results if t0 > self.killed_at + 2)
        assert after > 10, "the load did not go on after the kill"


def center_crop(photo: Path, size: int = 256):
    """The central size x size RGB crop of a photo file, uint8 [size, size, 3]."""
    import numpy as np
    from PIL import Image

    with Image.open(photo) as im:
        img = np.asarray(im.convert("RGB"))
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top: top + size, left: left + size]


def png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
