"""`gqtok serve --engine ray`: the tokenizer app as a Ray Serve deployment, two replicas on a local Ray cluster.

Same answers as the plain server, byte for byte; a replica killed under load loses no request (Ray restarts it;
the request that was on it comes back as Ray's bare 500, which the client retries).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import KillUnderLoad, center_crop, free_port, png, wait_until_ready

pytestmark = pytest.mark.slow
REPLICA = "ServeReplica:gqtok:tokenizer"  # the replica actors' process title


def test_the_deployment_takes_its_scaling_from_the_settings():
    """Fixed replicas, or autoscaling between --replicas and --max-replicas; CPUs and admission per replica."""
    pytest.importorskip("ray.serve", reason="the ray extra with Ray Serve (pip install -e '.[ray]')")
    from gqtok.service.ray_serve import TARGET_ONGOING_REQUESTS, deployment
    from gqtok.service.settings import ServiceSettings

    fixed = deployment(ServiceSettings(replicas=3))
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    scaled = deployment(ServiceSettings(replicas=1, max_replicas=4, threads=2, max_concurrent_requests=16))
    auto = scaled._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, TARGET_ONGOING_REQUESTS)
    assert scaled.ray_actor_options["num_cpus"] == 2 and scaled._deployment_config.max_ongoing_requests == 16


@pytest.fixture(scope="module")
def ray_server(tiny_model):
    pytest.importorskip("ray.serve", reason="the ray extra with Ray Serve (pip install -e '.[ray]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gqtok.cli", "serve", "--engine", "ray", "--replicas", "2",
                             "--threads", "1", "--port", str(port), "--model", str(tiny_model)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def alive():
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{proc.stdout.read()}")

    try:
        wait_until_ready(url, 180, alive)
        yield url, proc
    finally:
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        for p in family:  # what Ray left behind, if its shutdown did not finish
            if p.is_running():
                p.kill()


def replicas(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any(REPLICA in part for part in p.cmdline())]


def photo_pngs(small_photos, size: int) -> list[bytes]:
    from gqtok.photos import list_images

    return [png(center_crop(photo, size)) for photo in list_images(small_photos)[:3]]


def test_same_answers_as_the_plain_server(ray_server, live_server, small_photos):
    """Tokenize, detokenize and an error, each sent to both servers: the same bytes back."""
    url, proc = ray_server
    assert len(replicas(proc)) == 2
    for body in photo_pngs(small_photos, 96):
        answers = [httpx.post(f"{u}/v1/tokenize", content=body, timeout=60,
                              headers={"content-type": "image/png", "accept": "application/x-npy"})
                   for u in (url, live_server)]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].content == answers[1].content
        images = [httpx.post(f"{u}/v1/detokenize", content=answers[0].content, timeout=60,
                             headers={"content-type": "application/x-npy", "accept": "image/png"})
                  for u in (url, live_server)]
        assert [i.status_code for i in images] == [200, 200] and images[0].content == images[1].content
    bad = [httpx.post(f"{u}/v1/tokenize", content=b"not an image", headers={"content-type": "image/png"})
           for u in (url, live_server)]
    assert [b.status_code for b in bad] == [422, 422] and bad[0].json() == bad[1].json()
    info = [httpx.get(f"{u}/info").json() for u in (url, live_server)]
    assert info[0]["models"] == info[1]["models"] == ["tiny"]


def test_a_replica_killed_under_load_loses_no_request(ray_server, small_photos):
    url, proc = ray_server
    victim = replicas(proc)[0]
    load = KillUnderLoad(url, photo_pngs(small_photos, 128), victim.kill, senders=3, before_s=3, after_s=8)
    print(f"ray kill: {load.summary()}")
    load.check()
    deadline = time.monotonic() + 60  # Ray brings the replica count back
    while len(replicas(proc)) < 2:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    assert victim.pid not in [p.pid for p in replicas(proc)]
