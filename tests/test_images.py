"""The images, built by docker/images.sh and run by a real Docker engine.

`make test` runs the suite through `bash docker/images.sh run ...`, which builds the tokenizer, generator and
balancer images and sets GQTOK_IMAGE_TAG; without it (no engine here) these tests skip, and under CI=true the
script fails instead, so CI never passes without them. What is checked, on the images themselves:
- the tokenizer container, run with exactly the settings docker-compose.yml declares (read-only root, tmpfs /tmp,
  every capability dropped, no-new-privileges, its memory limit and budget): healthy by the image's own
  HEALTHCHECK, the same tokens for real photos as the in-process Tokenizer, the same pixels back, uid 10001;
- the API key; drain on `docker stop`; memory under compose's limit at the largest image the server admits;
- compose itself: three replicas behind HAProxy, one killed during a steady load, no request lost; the generator
  trained and served through the balancer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, KillUnderLoad, center_crop, compose, free_port, png

TAG = os.environ.get("GQTOK_IMAGE_TAG")
DOCKER = os.environ.get("GQTOK_DOCKER", "docker")
LABEL = "gqtok.test"  # docker/images.sh removes containers with this label if a run was interrupted

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not TAG, reason="no images: run the suite through `bash docker/images.sh run ...` (make test does)")]


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


@pytest.fixture(scope="module")
def tokenizer_service() -> dict:
    """docker-compose.yml's tokenizer service, resolved by Compose."""
    out = compose("config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]["tokenizer"]


class Container:
    """One container of an image, run with a compose service's settings; removed by stop()/remove()."""

    def __init__(self, image: str, service: dict | None = None, env: dict | None = None, *args: str):
        service = service or {}
        flags = ["--label", LABEL, "-p", "127.0.0.1::8000"]
        if service.get("read_only"):
            flags.append("--read-only")
        flags += [f for t in service.get("tmpfs", []) for f in ("--tmpfs", t)]
        flags += [f for c in service.get("cap_drop", []) for f in ("--cap-drop", c)]
        flags += [f for s in service.get("security_opt", []) for f in ("--security-opt", s)]
        flags += [f for v in service.get("volumes", []) if v["type"] == "bind"
                  for f in ("-v", f"{v['source']}:{v['target']}" + (":ro" if v.get("read_only") else ""))]
        if service.get("mem_limit"):
            flags += ["--memory", str(service["mem_limit"]), "--memory-swap", str(service["mem_limit"])]
        environment = {k: v for k, v in (service.get("environment") or {}).items() if v is not None}
        for k, v in {**environment, **(env or {})}.items():
            flags += ["-e", f"{k}={v}"]
        self.id = docker("run", "-d", *flags, image, *args)
        self.url = "http://" + docker("port", self.id, "8000").splitlines()[0]

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.id))

    def wait_healthy(self, timeout: float = 90) -> None:
        """Until the image's own HEALTHCHECK says healthy (docker runs it inside the container)."""
        deadline = time.monotonic() + timeout
        while (state := self.state())["Health"]["Status"] != "healthy":
            assert state["Running"], f"exited {state['ExitCode']}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"not healthy in {timeout:g} s: {state['Health']}\n{self.logs()}"
            time.sleep(0.5)

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([DOCKER, "exec", self.id, *cmd], capture_output=True, text=True, timeout=60)
        assert not check or out.returncode == 0, out.stderr
        return out

    def logs(self) -> str:
        out = subprocess.run([DOCKER, "logs", self.id], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr

    def remove(self) -> None:
        docker("rm", "-f", self.id, check=False)


def folder_for_containers(name: str) -> Path:
    """A new folder build/NAME that the images' uid 10001 can read when it is bind-mounted: not under pytest's
    tmp_path, whose folders are 0700."""
    path = REPO / "build" / name
    path.mkdir(parents=True)
    for d in (path.parent, path):
        d.chmod(0o755)
    return path


def test_every_image_was_built():
    for image in ("gqtok-tokenizer", "gqtok-tokenizer-gpu", "gqtok-generator", "gqtok-balancer"):
        docker("image", "inspect", f"{image}:{TAG}")


def crops(photos_dir: Path, n: int, size: int = 256) -> list[np.ndarray]:
    from gqtok.photos import list_images

    return [center_crop(photo, size) for photo in list_images(photos_dir)[::37][:n]]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_service):
    c = Container(f"gqtok-tokenizer:{TAG}", tokenizer_service, {"GQTOK_THREADS": "1"})
    try:
        c.wait_healthy()
        yield c
    finally:
        c.remove()


def test_the_tokenizer_image_gives_the_in_process_tokens_and_pixels(tokenizer, photos_dir):
    """Real photos through the container: the same ids as gqtok.Tokenizer here, the same pixels back."""
    from gqtok.service.client import TokenizerClient
    from gqtok.service.tokenizer import Tokenizer

    images = crops(photos_dir, 3)
    local = Tokenizer.load(str(REPO / "models" / "default"), device="cpu", threads=1)
    with TokenizerClient(tokenizer.url) as client:
        manifest = json.loads((REPO / "models" / "default" / "manifest.json").read_text())
        model = client.model_info()
        assert (model["model_id"], model["model_version"]) == (manifest["model_id"], manifest["model_version"])
        served = client.tokenize([png(a) for a in images])
        expected = local.encode(images)
        assert served.shape == expected.shape == (3, 1, 32, 32)
        assert np.array_equal(served.astype(np.int64), expected)
        back = client.detokenize(served, output="numpy")
    assert np.abs(back.astype(int) - local.decode(expected).astype(int)).max() <= 1


def test_the_container_runs_as_compose_declares(tokenizer, tokenizer_service):
    """Non-root, no capabilities, no new privileges, a read-only root with compose's tmpfs writable."""
    assert tokenizer.exec("id", "-u").stdout.strip() == "10001"
    status = dict(line.split(":\t", 1) for line in tokenizer.exec("cat", "/proc/1/status").stdout.splitlines()
                  if ":\t" in line)
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    touch = tokenizer.exec("touch", "/opt/venv/x", check=False)
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    for scratch in tokenizer_service["tmpfs"]:  # compose's writable folders (a path inside the container)
        tokenizer.exec("touch", f"{scratch}/x")
    assert tokenizer_service["read_only"] and tokenizer_service["cap_drop"] == ["ALL"]


def test_the_documented_override_serves_other_models(photos_dir):
    """docs/deploy.md's docker-compose.override.yml, merged by compose over docker-compose.yml: the tokenizer
    container serves the models in the mounted folder (the bundled default and a second one by its own name), with
    the in-process tokens; the image's own /models is out of sight."""
    from gqtok.service.client import TokenizerClient
    from gqtok.service.tokenizer import Tokenizer

    override = re.search(r"```yaml\n(# docker-compose.override.yml\n.*?)```", (REPO / "docs" / "deploy.md").read_text(),
                         re.S).group(1)
    project = folder_for_containers(f"override-{uuid.uuid4().hex[:8]}")  # ./my-models resolves beside the copy
    try:
        shutil.copy(REPO / "docker-compose.yml", project / "docker-compose.yml")
        (project / "docker-compose.override.yml").write_text(override)
        shutil.copytree(REPO / "models" / "default", project / "my-models" / "default")
        shutil.copytree(REPO / "models" / "f16", project / "my-models" / "my-model")
        for path in (project / "my-models").rglob("*"):  # whatever this checkout's umask gave the originals
            path.chmod(0o755 if path.is_dir() else 0o644)
        out = compose("-f", str(project / "docker-compose.override.yml"), "config", "--format", "json",
                      file=project / "docker-compose.yml")
        assert out.returncode == 0, out.stderr
        service = json.loads(out.stdout)["services"]["tokenizer"]
        c = Container(f"gqtok-tokenizer:{TAG}", service, {"GQTOK_THREADS": "1"})
        try:
            c.wait_healthy()
            assert c.exec("ls", "/models").stdout.split() == ["default", "my-model"]
            images = crops(photos_dir, 2)
            with TokenizerClient(c.url) as client:
                assert sorted(m["model_id"] for m in client.models()["models"]) == ["gqtok-default", "gqtok-f16"]
                served = client.tokenize([png(a) for a in images], model="gqtok-f16")
            local = Tokenizer.load(str(REPO / "models" / "f16"), device="cpu", threads=1)
            assert np.array_equal(served.astype(np.int64), local.encode(images))
        finally:
            c.remove()
    finally:
        shutil.rmtree(project, ignore_errors=True)


def test_the_api_key(tokenizer_service):
    c = Container(f"gqtok-tokenizer:{TAG}", tokenizer_service, {"GQTOK_API_KEY": "s3cret", "GQTOK_THREADS": "1"})
    try:
        c.wait_healthy()  # the health endpoints stay open: the orchestrator has no key
        body = png(np.zeros((64, 64, 3), np.uint8))
        denied = httpx.post(f"{c.url}/v1/tokenize", content=body, headers={"content-type": "image/png"})
        assert denied.status_code == 401 and denied.json()["error_type"] == "unauthorized"
        ok = httpx.post(f"{c.url}/v1/tokenize", content=body,
                        headers={"content-type": "image/png", "authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200, ok.text
    finally:
        c.remove()


def test_memory_stays_under_the_compose_limit_at_the_largest_image(tokenizer_service):
    """Compose's memory limit, and the budget it gives the server: the largest image the server then admits,
    tokenized and detokenized four times, is never killed and peaks under the limit (the cgroup's own count)."""
    from gqtok.service.client import TokenizerClient

    limit = int(tokenizer_service["mem_limit"])
    c = Container(f"gqtok-tokenizer:{TAG}", tokenizer_service, {"GQTOK_THREADS": "1"})
    try:
        c.wait_healthy()
        limits = httpx.get(f"{c.url}/info").json()["limits"]
        side = int(np.sqrt(limits["max_image_pixels"])) // 8 * 8
        rng = np.random.default_rng(0)
        image = png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        with TokenizerClient(c.url, timeout=300, retries=0) as client:
            for _ in range(4):
                assert client.detokenize(client.tokenize(image), output="numpy").shape == (1, side, side, 3)
        peak = max(int(c.exec("cat", p, check=False).stdout or 0) for p in (
            "/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"))
        state = c.state()
        assert state["Running"] and not state["OOMKilled"]
        assert 0 < peak < limit, f"peak {peak / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB"
        print(f"{side}x{side}: peak {peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB")
    finally:
        c.remove()


def test_hostile_clients_do_not_get_the_container_killed(tokenizer_service, tmp_path):
    """benchmarks/hostile.py --quick against the container as compose runs it (2 GiB, budget 1740 MiB): no OOM
    kill, the cgroup's peak under the limit, no 5xx, well-formed requests right."""
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks import hostile

    limit = int(tokenizer_service["mem_limit"])
    c = Container(f"gqtok-tokenizer:{TAG}", tokenizer_service)
    try:
        c.wait_healthy()
        r = hostile.main(["--quick", "--url", c.url, "--out", str(tmp_path / "hostile.json")])["hostile"]
        peak = max(int(c.exec("cat", p, check=False).stdout or 0) for p in (
            "/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"))
        state = c.state()
        assert state["Running"] and not state["OOMKilled"], state
        assert 0 < peak < limit, f"peak {peak / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB"
        assert r["server_errors"] == 0 and r["probe_failures"] == {}, r
        assert set(r["well_formed"]["statuses"]) <= {"200", "429"} and r["well_formed"]["wrong_tokens"] == 0
        print(f"hostile --quick in the container: peak {peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB")
    finally:
        c.remove()


def test_docker_stop_drains_what_is_in_flight(tokenizer_service, photos_dir):
    """SIGTERM (docker stop) lets the requests already in flight finish with 200, then the server exits 0."""
    c = Container(f"gqtok-tokenizer:{TAG}", tokenizer_service, {"GQTOK_THREADS": "1"})
    try:
        c.wait_healthy()
        big = png(np.tile(crops(photos_dir, 1, 256)[0], (3, 3, 1)))  # 768x768: a second or more of work
        answers: list = []

        def send():
            try:
                answers.append(httpx.post(f"{c.url}/v1/tokenize", content=big,
                                          headers={"content-type": "image/png"}, timeout=120).status_code)
            except httpx.HTTPError as e:
                answers.append(repr(e))

        senders = [threading.Thread(target=send) for _ in range(3)]
        for t in senders:
            t.start()
        time.sleep(0.5)  # in flight
        t0 = time.monotonic()
        docker("stop", "-t", "40", c.id, timeout=60)
        stopped_after = time.monotonic() - t0
        for t in senders:
            t.join(60)
        state = c.state()
        assert answers == [200, 200, 200], answers
        assert state["ExitCode"] == 0 and not state["OOMKilled"], c.logs()
        assert stopped_after < 40, "docker stop waited for its grace period: SIGTERM did not end the server"
    finally:
        c.remove()


def test_the_gpu_image_falls_back_to_the_cpu_saying_so(photos_dir):
    """The GPU image (onnxruntime-gpu with CUDA and cuDNN from pip wheels, no CUDA base) on a machine where the
    container sees no GPU: it starts on the CPU provider, says why in a warning, and gives the CPU image's tokens."""
    from gqtok.service.client import TokenizerClient
    from gqtok.service.tokenizer import Tokenizer

    c = Container(f"gqtok-tokenizer-gpu:{TAG}", None, {"GQTOK_THREADS": "1"})
    try:
        c.wait_healthy()
        info = httpx.get(f"{c.url}/info").json()
        assert info["providers"] == {"gqtok-default": "CPUExecutionProvider"}, info
        assert "WARNING gqtok.runtime: onnxruntime offers CUDAExecutionProvider but could not use it" in c.logs()
        images = crops(photos_dir, 2)
        with TokenizerClient(c.url) as client:
            served = client.tokenize([png(a) for a in images])
        local = Tokenizer.load(str(REPO / "models" / "default"), device="cpu", threads=1)
        assert np.array_equal(served.astype(np.int64), local.encode(images))
    finally:
        c.remove()


# -- compose: replicas behind the balancer ------------------------------------------------------------------------
def test_compose_replicas_behind_the_balancer_lose_nothing_when_one_is_killed(photos_dir, small_photos):
    """`docker compose up --wait --scale tokenizer=3`, a steady load through HAProxy, one replica killed in the
    middle: every request is answered 200 (the balancer's checks and redispatch, the client's retries). Then the
    generator, trained through the balancer, serves /generate through it too."""
    project = f"gqtok-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    run = folder_for_containers(project) / "generator"  # bind-mounted into the generator
    run.mkdir()
    env = {"GQTOK_TAG": TAG, "GQTOK_PUBLISH": f"127.0.0.1:{port}", "GQTOK_THREADS": "1",
           "GENERATOR_RUN": str(run), "GENERATOR_PUBLISH": f"127.0.0.1:{free_port()}"}

    def up(*args: str) -> None:
        out = compose("-p", project, "up", "-d", "--wait", "--no-build", "--pull", "never", *args, env=env,
                      timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr

    url = f"http://127.0.0.1:{port}"
    try:
        up("--scale", "tokenizer=3", "tokenizer", "balancer")
        replicas = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                          "--filter", "label=com.docker.compose.service=tokenizer").split()
        assert len(replicas) == 3
        wait_for(lambda: httpx.get(f"{url}/health/ready", timeout=2).status_code == 200, 30)

        # 256x256: with four senders on three replicas each replica is nearly always busy, so the kill cuts
        # requests in flight (their bodies, about 150 KB, are past what HAProxy buffers to retry by itself)
        images = [png(a) for a in crops(photos_dir, 4, 256)]
        served: list[int] = []

        def before_kill():  # every replica served its share before one goes
            served.extend(replica_requests(replicas))
            assert all(n > 0 for n in served), f"a replica was not in the rotation: {served}"

        load = KillUnderLoad(url, images, lambda: docker("kill", replicas[0]), at_kill=before_kill)
        print(f"compose kill: {load.summary()}; requests per replica before the kill {served}, after it "
              f"{replica_requests(replicas[1:])} on the other two")
        load.check()

        # the generator: trained through the balancer, then served beside it, decoding through it
        from gqtok.generator.train import train_generator

        train_generator(run, url, small_photos, {"grid": (4, 4), "n_layer": 1, "n_embd": 32},
                        {"steps": 10, "batch_size": 8, "eval_every": 10}, progress=False)
        up("--no-deps", "generator")
        gen_url = "http://" + env["GENERATOR_PUBLISH"]
        r = httpx.post(f"{gen_url}/generate", json={"n": 2, "seed": 1}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        info = httpx.get(f"{gen_url}/info", timeout=10).json()
        assert info["tokenizer"]["url"] == "http://balancer:8000"
    finally:
        compose("-p", project, "down", "-v", "--timeout", "10", env=env, timeout=180)
        shutil.rmtree(run.parent, ignore_errors=True)


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not within {timeout:g} s"
        time.sleep(0.2)


def replica_requests(containers: list[str]) -> list[int]:
    """Requests each replica has answered, from its own /metrics (replicas publish no port: ask from inside)."""
    ask = ("import urllib.request as r; print(sum(float(l.split()[-1]) for l in r.urlopen('http://127.0.0.1:8000/metrics')"
           ".read().decode().splitlines() if l.startswith('gqtok_requests_total{')))")
    return [int(float(docker("exec", c, "python", "-c", ask))) for c in containers]
