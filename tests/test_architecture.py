"""The package's shape: one import name, layers that only point down (import-linter), small service modules."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def installed_tree(dest: Path) -> Path:
    """The gqtok package as an install lays it out (pyproject's package-dir mapping), Python files only."""
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        target = dest.joinpath(*package.split("."))
        shutil.copytree(REPO / folder, target, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir()
                                                 or n == "__pycache__"])
    return dest


def test_import_linter_contracts_hold(tmp_path):
    # import-linter reads the package from disk, so it gets the installed layout, not the repository's folders
    tree = installed_tree(tmp_path / "site")
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(REPO / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_a_broken_layer_is_caught(tmp_path):
    tree = installed_tree(tmp_path / "site")
    (tree / "gqtok" / "core" / "bad.py").write_text("import gqtok.service.app\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(REPO / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert proc.returncode != 0 and "gqtok.core.bad -> gqtok.service.app" in proc.stdout


def test_one_import_name(tmp_path):
    """From outside the repository, the stages import as gqtok.* and not under their folder names."""
    code = ("import importlib.util as u, gqtok.service.app, gqtok.training.gq, gqtok.export.exporter, "
            "gqtok.generator.model, gqtok.core.select; "
            "print([n for n in ('service', 'training', 'export', 'generator', 'models') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_service_module_is_over_400_lines():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in (REPO / "service").rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_every_package_on_disk_is_installed():
    """pyproject lists the packages by hand (the folders are mapped); a new subpackage must be added there."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(REPO / folder).parts
            assert ".".join((package, *sub)) in listed, f"{init.parent} is not in [tool.setuptools] packages"


def test_a_missing_extra_is_named():
    from gqtok.cli import missing_extra_message

    message = missing_extra_message("train", ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert "pip install 'gqtok[train]'" in message
    message = missing_extra_message("generator serve", ModuleNotFoundError("x", name="fastapi"))
    assert "gqtok[generator]" in message
