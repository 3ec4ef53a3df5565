"""The docs hold: every Python example in README.md and docs/ runs against a live server, every `gqtok` command
line in their shell blocks parses with the real CLI, and the generated references are up to date."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(kind: str) -> list[tuple[str, int, str]]:
    """(page name, index, code) of every fenced block of this kind."""
    out = []
    for page in PAGES:
        for i, code in enumerate(re.findall(rf"```{kind}\n(.*?)```", page.read_text(), flags=re.S)):
            out.append((page.relative_to(REPO).as_posix(), i, code))
    return out


def gqtok_commands(code: str) -> list[list[str]]:
    """The argv of each gqtok command in a shell block (env prefixes, comments, `&`, `&&`, pipes and redirections
    stripped; `torchrun ... -m gqtok.cli ARGS` counts as gqtok ARGS)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        for part in re.split(r"&&|\|", line):
            part = re.split(r"\s\d?>>?\s|\s<\s", part)[0]  # redirections are the shell's, not gqtok's
            words = shlex.split(part.strip().rstrip("&").strip())
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words[:1] == ["gqtok"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"] and "gqtok.cli" in words:
                commands.append(words[words.index("gqtok.cli") + 1 :])
    return commands


def test_relative_links_and_images_resolve():
    """Every relative link and image in README.md and docs/ names a file that exists, seen from its page's folder
    (a docs page that writes benchmarks/... instead of ../benchmarks/... shows a broken image)."""
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if path and not re.match(r"^[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_every_page_has_examples():
    assert blocks("python") and sum(len(gqtok_commands(c)) for _, _, c in blocks("bash")) >= 20


@pytest.mark.slow
@pytest.mark.parametrize("page,index,code", blocks("python"), ids=lambda v: str(v)[:40])
def test_python_example_runs(page, index, code, live_server, photos_dir, tmp_path):
    # Examples address the default URL; here it is the tiny model's live server. photo.jpg is a real photo.
    (tmp_path / "photo.jpg").write_bytes(next(photos_dir.glob("*.jpg")).read_bytes())
    script = tmp_path / "example.py"
    script.write_text(code.replace("http://127.0.0.1:8000", live_server))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "GQTOK_URL": live_server})
    assert proc.returncode == 0, f"{page} python block {index}:\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("page,index,code", [b for b in blocks("bash") if gqtok_commands(b[2])],
                         ids=lambda v: str(v)[:40])
def test_shell_commands_parse(page, index, code):
    """Commands that train for hours are not run here; each must still be a valid gqtok command line."""
    from gqtok.cli import build_parser

    for argv in gqtok_commands(code):
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{page} bash block {index}: `gqtok {' '.join(argv)}` does not parse ({e})")


def is_http_example(code: str) -> bool:
    """A shell block of curl calls (and python one-liners between them): runnable against a live server."""
    lines = [ln.strip() for ln in code.replace("\\\n", " ").splitlines() if ln.strip()]
    return bool(lines) and any(ln.startswith("curl") for ln in lines) and all(
        ln.startswith(("curl", "python -c", "|")) for ln in lines)


@pytest.mark.slow
@pytest.mark.parametrize("page,index,code", [b for b in blocks("bash") if is_http_example(b[2])],
                         ids=lambda v: str(v)[:40])
def test_curl_example_runs(page, index, code, live_server, photos_dir, tmp_path):
    from PIL import Image

    Image.open(next(photos_dir.glob("*.jpg"))).crop((0, 0, 96, 64)).save(tmp_path / "photo.png")
    script = "set -euo pipefail\n" + code.replace("localhost:8000", live_server.removeprefix("http://"))
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, f"{page} bash block {index}:\n{proc.stderr[-2000:]}"
    for out in re.findall(r"> (\S+)", code):  # every file the example writes is there and not an error body
        data = (tmp_path / out).read_bytes()
        assert data and b'"error_type"' not in data, (out, data[:200])


def test_generated_references_are_up_to_date():
    proc = subprocess.run([sys.executable, "-m", "gqtok.service.apidoc", "--check", "--docs", str(REPO / "docs")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_docs_render_offline(live_server):
    """/docs loads Swagger UI from this server only: every script and stylesheet it names is served here."""
    import httpx

    html = httpx.get(f"{live_server}/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        assert asset.startswith("/"), f"/docs loads {asset} from elsewhere"
        r = httpx.get(f"{live_server}{asset}")
        assert r.status_code == 200 and len(r.content) > 1000, asset
    assert "/openapi.json" in html


def test_readme_headline_tables_are_the_committed_results():
    """The README's two headline tables, rebuilt from the result files they quote (a re-measured file that the
    README does not follow fails here)."""
    import json

    results = REPO / "benchmarks" / "results"
    colour = json.loads((results / "colour_default_0.5.0.json").read_text())
    readme = (REPO / "README.md").read_text()
    full, small = colour["512x768"], colour["256x256"]
    for label, key in (("gqtok GQ tokens (16 bits per token)", "tokens"), ("JPEG", "jpeg"), ("WebP", "webp")):
        row = (f"| {label} | {full[key]['psnr']:.2f} | {small[key]['psnr']:.2f} | {full[key]['ms_ssim']:.3f} | "
               f"{full[key]['colour_shift']:.2f} |")
        assert row in readme, row
    for label, name in (("`gqtok-default` (f=8)", "colour_default_0.5.0.json"), ("`gqtok-f16` (f=16)", "f16_256.json")):
        r = json.loads((results / name).read_text())["256x256"]
        tokens = round(256 * 256 * r["bpp"] / r["bits_per_token"])
        row = (f"| {label} | {tokens:,} | {r['bpp']:g} | {r['tokens']['psnr']:.2f} | {r['tokens']['ms_ssim']:.3f} | "
               f"{r['fd_effnet_lite0']['tokens']:.1f} | {r['tokens']['colour_shift']:.2f} |")
        assert row in readme, row


def test_quality_study_tables_are_the_committed_results():
    """docs/results.md quotes issue 32's tables as benchmarks/quality.py wrote them (quality.md, beside
    quality.json): a re-run whose figures the docs do not follow fails here."""
    tables = (REPO / "benchmarks" / "results" / "quality.md").read_text().strip().splitlines()
    results = (REPO / "docs" / "results.md").read_text()
    assert len(tables) > 4
    missing = [line for line in tables if line.strip() and line not in results]
    assert not missing, missing
